"""Training from precomputed embedding shards vs streaming from image-text shards (encoded on the fly).

    python benchmarks/bench_stream.py --preset tiny32 --steps 120
    python benchmarks/bench_stream.py --preset demo --steps 60 --encoder-cpus 0.5

The same short training twice in one Ray session, one worker: from embedding shards made
beforehand, and with `stream` (read, decode and encode on Ray Data's own actor pool, nothing
written, cache_mb=0 so every epoch is encoded anew). Prints each run's steady-state images/s (the
run's own per-window metrics, first window dropped), the ratio streaming / precomputed (design
goal on a cluster, where the encoders have their own GPUs: >= 95 %), and where the streamed
worker's time went: the share spent waiting for data (`data_wait_frac`). On a 2-core machine the
encoders and the trainer share the cores, so the stream costs training time here.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow

from ediffi.conditioning import DropoutConfig
from ediffi.presets import get_preset
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.synthetic import SyntheticConfig, write_synthetic
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import OptimConfig, TrainConfig, run_training


def steady(uri: str, run_id: str, metric: str) -> float:
    """The mean of a metric over the run's log windows, the first (start-up) dropped."""
    hist = sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, metric), key=lambda m: m.step)[1:]
    return sum(m.value for m in hist) / max(1, len(hist))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny32")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--encoder-cpus", type=float, default=0.5, help="CPUs of the stream's encoder actor")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs of the stream's decode tasks")
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    ensure_ray(num_cpus=2)
    write_synthetic(SyntheticConfig(output=str(d / "in"), rows=a.rows, shards=4))
    image = ImageFilter(resolution=get_preset(a.preset).img_resolution)
    pre = PrecomputeConfig(input=InputConfig(path=str(d / "in")), output=str(d / "emb"), image=image)
    run_precompute(pre, progress=lambda *_: None)
    tracking = TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri())
    base = TrainConfig(
        data=str(d / "emb"),
        preset=a.preset,
        steps=a.steps,
        batch_size=a.batch,
        num_workers=1,
        cpus_per_worker=a.cpus_per_worker,
        threads_per_worker=a.threads,
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        dropout=DropoutConfig(0.1, 0.1, 0.1),
        cache_mb=0,  # both read every epoch: the stream encodes every epoch anew
        checkpoint_every=a.steps,
        log_every=10,
        sample_images=0,
        output=str(d / "runs"),
        tracking=tracking,
    )
    runs = {
        "precomputed": replace(base, name="precomputed"),
        "streaming": replace(
            base, name="streaming", stream=replace(pre, num_cpus=a.encoder_cpus, decode_cpus=a.decode_cpus)
        ),
    }
    figures = {}
    for name, cfg in runs.items():
        out = run_training(cfg, progress=lambda *_: None)
        figures[name] = {m: steady(tracking.uri, out["mlflow_run_id"], m) for m in ("images_per_s", "data_wait_frac")}
    print(
        f"preset {a.preset}, batch {a.batch}, {a.steps} steps, 1 worker ({a.cpus_per_worker} CPU, {a.threads} threads)"
    )
    for name, f in figures.items():
        print(
            f"{name:12s} {f['images_per_s']:8.1f} img/s, {100 * f['data_wait_frac']:4.1f} % of the time waiting for data"
        )
    ratio = figures["streaming"]["images_per_s"] / figures["precomputed"]["images_per_s"]
    print(f"streaming / precomputed: {100 * ratio:.0f} %")


if __name__ == "__main__":
    main()
