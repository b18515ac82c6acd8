"""Batch-generation throughput: the whole job (prompt file -> Ray Data actor -> PNGs + metadata)
vs the pure sampling loop in one process, same model (a 2-expert ensemble), settings and threads.

    python benchmarks/bench_generate.py --preset demo --images 64

Prints images/s for the plain loop (encode + sample) and the job at 1 actor, end to end (job
start to summary, actor start-up included) and after the actor is up (target: >= 90% of plain),
and the share of the actor's busy time spent inside the network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ediffi.checkpoint import save_checkpoint
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import intervals_from_boundaries, load_ensemble, write_manifest
from ediffi.pipeline import SamplerConfig, sample, to_uint8
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import to_dict
from ediffi_platform.generate import GenerateConfig, run_generate
from ediffi_platform.synthetic import LABELS, SyntheticConfig, make_shard
from ediffi_platform.tracking import TrackingConfig


def make_ensemble(d: Path, preset: str) -> Path:
    cfg = get_preset(preset)
    names = []
    for i in range(2):
        torch.manual_seed(i)
        D = build_denoiser(cfg)
        with torch.no_grad():  # untrained but not degenerate: throughput does not depend on training
            for p in D.parameters():
                p.add_(0.02 * torch.randn_like(p))
        save_checkpoint(d / f"e{i}", cfg, D, ema=D, metadata={"encoders": to_dict(EncoderConfig())})
        names.append(f"e{i}")
    return write_manifest(d / "manifest.json", intervals_from_boundaries([1.0]), names)


def plain_loop(manifest: Path, prompts: list[str], scfg: SamplerConfig, batch: int, threads: int, R: int) -> float:
    torch.set_num_threads(threads)
    D, enc = load_ensemble(manifest), ConditioningEncoder(EncoderConfig()).eval()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        cond, _ = enc.encode(chunk)
        np.asarray(to_uint8(sample(D, cond, (3, R, R), list(range(i, i + len(chunk))), scfg)))
    return len(prompts) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    manifest = make_ensemble(d / "ens", a.preset)
    rows = make_shard(SyntheticConfig(rows=a.images, shards=1), 0).select(["caption", *LABELS]).to_pylist()
    prompts = [r["caption"] for r in rows]
    (d / "prompts.txt").write_text("\n".join(prompts))
    scfg = SamplerConfig(steps=a.steps, guidance=2.0)
    R = get_preset(a.preset).img_resolution
    plain = plain_loop(manifest, prompts, scfg, a.batch, a.threads, R)
    ensure_ray(num_cpus=2)
    cfg = GenerateConfig(
        prompts=str(d / "prompts.txt"),
        out=str(d / "out"),
        model=str(manifest),
        sampler=scfg,
        batch_size=a.batch,
        num_cpus=1.5,
        threads_per_actor=a.threads,
        tracking=TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri()),
    )
    s = run_generate(cfg, progress=lambda *_: None)
    run = s["run"]
    print(
        f"preset {a.preset} ({R}px), 2-expert ensemble, {a.images} images, batch {a.batch}, heun {a.steps} steps, cfg 2"
    )
    print(f"plain loop (encode + sample):   {plain:7.2f} img/s")
    e2e, up = run["images_per_s"], run["images_per_s_after_startup"]
    print(f"job, 1 actor, end to end:       {e2e:7.2f} img/s  ({100 * e2e / plain:.0f}% of plain)")
    print(f"job, 1 actor, after start-up:   {up:7.2f} img/s  ({100 * up / plain:.0f}% of plain)")
    spi = run["seconds_per_image"]
    print(
        f"actor time per image: encode {spi['encode']:.4f} s, sample {spi['sample']:.4f} s "
        f"(network {spi['network']:.4f} s), write {spi['write']:.4f} s; network share {100 * run['network_share']:.1f}%"
    )


if __name__ == "__main__":
    main()
