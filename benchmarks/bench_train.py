"""Training throughput: the whole Ray path (Ray Data shard -> Ray Train worker -> train_step ->
EMA -> checkpoints) vs the same step loop in one plain process on in-memory tensors.

    python benchmarks/bench_train.py --preset demo --steps 60
    python benchmarks/bench_train.py --preset tiny32 --threads 1 --memory-format contiguous   # vs auto

Prints images/s for the plain loop and for Ray Train with 1 worker (target: >= 90% of plain),
steady state (from the run's own per-window metrics, first window dropped) and end to end (fit()
wall time, worker start included). Same preset, batch, optimiser, dropout and thread count.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution
from ediffi.ema import EMA
from ediffi.presets import MEMORY_FORMATS, build_denoiser, get_preset, memory_format
from ediffi.training import train_step
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.reader import iter_batches
from ediffi_platform.synthetic import SyntheticConfig, write_synthetic
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import OptimConfig, TrainConfig, run_training


def plain_loop(cfg: TrainConfig, warmup: int) -> float:
    """images/s of train_step + EMA over in-memory batches, after `warmup` steps."""
    torch.set_num_threads(cfg.threads_per_worker)
    batches = [(x, c) for x, c in iter_batches(cfg.data, cfg.batch_size) if len(x) == cfg.batch_size]
    torch.manual_seed(cfg.seed)
    D = build_denoiser(get_preset(cfg.preset)).to(memory_format=memory_format(cfg.memory_format, "cpu"))
    ema = EMA(D.net, cfg.ema_decay)
    opt = torch.optim.AdamW(D.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator().manual_seed(0)
    t0 = None
    for step in range(cfg.steps):
        if step == warmup:
            t0 = time.perf_counter()
        train_step(D, opt, [batches[step % len(batches)]], NoiseDistribution(), cfg.dropout, 1.0, "float32", gen)
        ema.update(D.net)
    return (cfg.steps - warmup) * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="torch threads in both paths")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs for the worker (rest: data)")
    p.add_argument("--memory-format", default="auto", choices=MEMORY_FORMATS, help="conv layout in both paths")
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_train_"))
    res = get_preset(a.preset).img_resolution
    ensure_ray(num_cpus=2)
    write_synthetic(SyntheticConfig(output=str(d / "in"), rows=a.rows, shards=4))
    run_precompute(
        PrecomputeConfig(
            input=InputConfig(path=str(d / "in")), output=str(d / "emb"), image=ImageFilter(resolution=res)
        ),
        progress=lambda *_: None,
    )
    log_every = 10
    cfg = TrainConfig(
        data=str(d / "emb"),
        preset=a.preset,
        steps=a.steps,
        batch_size=a.batch,
        num_workers=1,
        cpus_per_worker=a.cpus_per_worker,
        threads_per_worker=a.threads,
        memory_format=a.memory_format,
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        dropout=DropoutConfig(0.1, 0.1, 0.1),
        checkpoint_every=a.steps,  # one checkpoint, at the end, as a real run's last
        log_every=log_every,
        sample_images=0,
        output=str(d / "runs"),
        tracking=TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri()),
    )
    plain = plain_loop(cfg, warmup=log_every)
    t0 = time.perf_counter()
    out = run_training(cfg, progress=lambda *_: None)
    wall = time.perf_counter() - t0
    hist = mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(out["mlflow_run_id"], "images_per_s")
    steady = [m.value for m in sorted(hist, key=lambda m: m.step)][1:]  # the first window holds start-up
    ray_steady = len(steady) / sum(1 / v for v in steady)  # equal-image windows: harmonic mean
    e2e = a.steps * a.batch / wall
    print(
        f"preset {a.preset}, batch {a.batch}, {a.steps} steps, {a.threads} torch threads, 1 worker, {a.memory_format}"
    )
    print(f"plain loop (in-memory tensors):  {plain:8.1f} img/s")
    print(f"Ray Train, steady state:         {ray_steady:8.1f} img/s  ({100 * ray_steady / plain:.0f}% of plain)")
    print(f"Ray Train, end to end (fit()):   {e2e:8.1f} img/s  ({100 * e2e / plain:.0f}%; {wall:.0f} s incl. start-up)")
    assert math.isfinite(ray_steady)


if __name__ == "__main__":
    main()
