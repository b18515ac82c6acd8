"""Single model vs expert ensemble at equal total training steps, on the synthetic dataset.

    python benchmarks/bench_experts.py --preset tiny --base-steps 1500 --expert-steps 500

1. Train a base model for B steps (Ray Train, 1 worker).
2. Arm "single": continue the base run for 2E more steps (same optimiser state).
3. Arm "ensemble": two experts split at the median of the training noise distribution, each
   fine-tuned E steps from the base (jobs/finetune_experts.py's code, run concurrently).
Both arms have B + 2E optimiser steps of the same batch size in total. Then both generate images
for the same held-out captions and seeds; the synthetic judge reads color / shape / size /
position / background back from the pixels. Also prints the EDM loss on held-out rows per noise
bucket. All figures printed; nothing asserted.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ediffi.checkpoint import load_checkpoint
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import load_ensemble
from ediffi.pipeline import SamplerConfig, sample, to_uint8
from ediffi.presets import get_preset
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, run_finetune
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.judge import alignment
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.reader import iter_batches
from ediffi_platform.synthetic import LABELS, SyntheticConfig, make_shard, write_synthetic
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import SIGMA_BUCKETS, OptimConfig, TrainConfig, run_training


def generate(D, prompts: list[str], R: int, scfg: SamplerConfig, batch: int = 50) -> list:
    enc = ConditioningEncoder(EncoderConfig()).eval()
    out = []
    for i in range(0, len(prompts), batch):
        cond, _ = enc.encode(prompts[i : i + batch])
        with torch.no_grad():
            out += list(to_uint8(sample(D, cond, (3, R, R), list(range(i, i + len(cond))), scfg)).numpy())
    return out


def heldout_loss(D, data: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    per, sig = [], []
    with torch.no_grad():
        for _ in range(4):  # 4 noise draws per row
            for x, c in iter_batches(data, 256):
                loss, sigma = edm_loss(D, x, c, NoiseDistribution(), g)
                per.append(loss)
                sig.append(sigma)
    per, sig = torch.cat(per), torch.cat(sig)
    out = {"all": per.mean().item()}
    for lo, hi in itertools.pairwise(SIGMA_BUCKETS):
        m = (sig >= lo) & (sig < hi)
        out[f"{lo:g}-{hi:g}"] = per[m].mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--expert-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval", type=int, default=300, help="held-out prompts to generate per arm")
    p.add_argument("--sampling-steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    d = Path(a.out or tempfile.mkdtemp(prefix="bench_experts_"))
    R = get_preset(a.preset).img_resolution
    ensure_ray(num_cpus=2)
    t0 = time.time()
    write_synthetic(SyntheticConfig(output=str(d / "in"), rows=a.rows, shards=4))
    write_synthetic(SyntheticConfig(output=str(d / "held_in"), rows=512, shards=1, seed=1))
    for src, dst in (("in", "emb"), ("held_in", "held_emb")):
        run_precompute(
            PrecomputeConfig(
                input=InputConfig(path=str(d / src)), output=str(d / dst), image=ImageFilter(resolution=R)
            ),
            progress=lambda *_: None,
        )
    base = TrainConfig(
        data=str(d / "emb"),
        preset=a.preset,
        steps=a.base_steps,
        batch_size=a.batch,
        num_workers=1,
        cpus_per_worker=1.0,
        threads_per_worker=2,
        optim=OptimConfig(lr=1e-3, warmup_steps=100),
        dropout=DropoutConfig(0.1, 0.1, 0.5),  # text-only sampling below: the image embedding often absent
        ema_decay=0.995,
        checkpoint_every=500,
        log_every=100,
        sample_images=0,
        output=str(d / "runs"),
        name="base",
        tracking=TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri()),
    )
    log = lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True)
    b = run_training(base, progress=log)
    single = run_training(
        replace(base, name="single", steps=a.base_steps + 2 * a.expert_steps, resume=b["checkpoint"]), progress=log
    )
    ens = run_finetune(
        FinetuneConfig(
            base=b["checkpoint"],
            plan=ExpertPlan(quantiles=(0.5,)),
            train=replace(base, steps=a.expert_steps, cpus_per_worker=0.5, threads_per_worker=1, name="x"),
            output=str(d / "experts"),
        ),
        progress=log,
    )
    held = make_shard(SyntheticConfig(rows=a.eval, shards=1, seed=2), 0).select(["caption", *LABELS]).to_pylist()
    prompts, labels = [r["caption"] for r in held], [{k: r[k] for k in LABELS} for r in held]
    scfg = SamplerConfig(steps=a.sampling_steps, guidance=a.guidance)
    arms = {
        "base (B steps)": load_checkpoint(b["checkpoint"], use_ema=True)[0],
        "single (B+2E steps)": load_checkpoint(single["checkpoint"], use_ema=True)[0],
        "2 experts (B + E each)": load_ensemble(ens["manifest"]),
    }
    print(
        f"\npreset {a.preset} ({R}px), batch {a.batch}, B={a.base_steps}, E={a.expert_steps}; judged on {a.eval} "
        f"held-out captions, heun {a.sampling_steps} steps, guidance {a.guidance}"
    )
    print(f"{'arm':26s} " + " ".join(f"{k:>10s}" for k in (*LABELS, "all")))
    losses = {}
    for name, D in arms.items():
        acc = alignment(generate(D, prompts, R, scfg), labels)
        print(f"{name:26s} " + " ".join(f"{100 * acc[k]:9.1f}%" for k in (*LABELS, "all")))
        losses[name] = heldout_loss(D, str(d / "held_emb"))
    print("\nheld-out EDM loss by sigma bucket")
    keys = list(next(iter(losses.values())))
    print(f"{'arm':26s} " + " ".join(f"{k:>10s}" for k in keys))
    for name, lo in losses.items():
        print(f"{name:26s} " + " ".join(f"{lo[k]:10.4f}" for k in keys))
    print(f"\ntotal {time.time() - t0:.0f} s; outputs in {d}")


if __name__ == "__main__":
    main()
