"""Text alignment per second of CPU training, on the synthetic dataset, in one process (no Ray).

    python benchmarks/bench_alignment.py --preset tiny32 --seconds 600 --evals 300
    python benchmarks/bench_alignment.py --preset tiny32 --clip data/clip.safetensors   # a fitted CLIP
    python benchmarks/bench_alignment.py --preset tiny32 --oracle                        # labels, not text
    python benchmarks/bench_alignment.py --clip CLIP --init BASE --sigma-range 0.4,3 --lr 2e-3 --seconds 240
                                                                      # an expert on top of a --save'd base

Trains a preset on 4,000 synthetic rows for a wall-clock budget and judges 100 held-out captions
(Heun 18 steps) at the given times. `--from-real 0.5,1,2` also starts the sampler from the held-out
images themselves noised to each sigma: where the labels survive and where they are lost. `--oracle` replaces the pooled CLIP text embedding by a one-hot
code of the caption's labels (training and sampling): an upper bound on what the network can learn
in the budget when the text features are perfect, which separates "the network is too slow" from
"the text features are hard to read". `--init` continues from a `--save`d model's EMA weights;
with `--sigma-range` it trains only on that noise interval (an expert) and judges the ensemble: the
`--init` model outside the interval, the expert inside. All figures printed; nothing asserted.
"""

from __future__ import annotations

import argparse
import ast
import math
import time

import numpy as np
import torch

from ediffi.checkpoint import load_checkpoint
from ediffi.conditioning import Cond, DropoutConfig
from ediffi.edm import NoiseDistribution
from ediffi.ema import EMA
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import ExpertEnsemble, intervals_from_boundaries
from ediffi.guidance import Guided
from ediffi.pipeline import SamplerConfig, grid, sample, to_uint8
from ediffi.presets import build_denoiser, get_preset, memory_format
from ediffi.samplers import SAMPLERS, karras_sigmas
from ediffi.training import train_step
from ediffi_platform.ingest import ImageFilter, decode_image
from ediffi_platform.judge import alignment
from ediffi_platform.synthetic import BACKGROUNDS, COLORS, LABELS, POSITIONS, SHAPES, SIZES, SyntheticConfig, make_shard

TABLES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
TABLES["background"] = list(BACKGROUNDS)


def onehot(rows: list[dict], dim: int) -> torch.Tensor:
    """Labels as a scaled one-hot code in the pooled-CLIP slot (the oracle)."""
    v, o = torch.zeros(len(rows), dim), 0
    for k, tab in TABLES.items():
        for i, r in enumerate(rows):
            v[i, o + tab.index(r[k])] = 5.0
        o += len(tab)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny32")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--evals", default="300", help="comma-separated training times (s) to judge at, besides the end")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--P-mean", type=float, default=0.0, help="training noise centre ln(sigma) (the demo's)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training autocast dtype")
    p.add_argument("--clip", default=None, help="fitted CLIP weights (ediffi_platform.clip_fit); default random")
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--grid", default=None, help="write the first 40 judged samples here as a PNG grid")
    p.add_argument("--save", default=None, help="write the final EMA model here as a checkpoint folder")
    p.add_argument(
        "--from-real",
        default="",
        help="comma-separated sigmas: at the end, also judge samples that start from the held-out images "
        "noised to each sigma (where along the noise levels the labels are lost)",
    )
    p.add_argument("--set", action="append", default=[], help="override a preset field, e.g. channel_mult=(1,2,2)")
    p.add_argument("--init", default=None, help="start from this checkpoint folder's EMA weights (and its network)")
    p.add_argument(
        "--sigma-range",
        default=None,
        help="LO,HI: train only on sigma in [LO, HI) (an expert; needs --init) and judge the ensemble of the "
        "--init model outside the interval and this one inside",
    )
    p.add_argument("--held", type=int, default=100, help="held-out captions judged")
    a = p.parse_args()
    if a.sigma_range and not a.init:
        p.error("--sigma-range needs --init (the model that serves the rest of the noise range)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = get_preset(a.preset, **{k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)})
    if a.init:
        parent, meta = load_checkpoint(a.init, use_ema=True)
        cfg = parent.net.cfg
        if a.clip is None and meta.get("encoders", {}).get("clip_pretrained"):
            a.clip = meta["encoders"]["clip_pretrained"]  # the encoders the parent was trained with
    R = cfg.img_resolution
    enc = ConditioningEncoder(EncoderConfig(clip_pretrained=a.clip)).eval()
    rows = [r for s in range(4) for r in make_shard(SyntheticConfig(rows=4000, shards=4), s).to_pylist()]
    images = np.stack([decode_image(r["jpg"], ImageFilter(resolution=R))[0] for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    parts = [
        enc.encode(
            [r["caption"] for r in rows[i : i + 250]], torch.from_numpy(images[i : i + 250]).permute(0, 3, 1, 2)
        )[0]
        for i in range(0, len(rows), 250)
    ]
    cond = Cond(**{k: torch.cat([c.tensors()[k] for c in parts]) for k in parts[0].tensors()})
    if a.oracle:
        cond.clip_pooled = onehot(rows, cond.clip_pooled.shape[1])
    held = make_shard(SyntheticConfig(rows=a.held, shards=1, seed=12345), 0).to_pylist()
    D = build_denoiser(cfg).to(memory_format=memory_format("auto", "cpu"))  # as training does
    if a.init:
        D.load_state_dict(parent.state_dict())
    opt = torch.optim.AdamW(D.parameters(), lr=a.lr)
    ema = EMA(D, 0.99)
    noise, drop = NoiseDistribution(a.P_mean, 1.2), DropoutConfig(0.1, 0.1, 0.5)
    if a.sigma_range:
        lo, hi = (float(v) for v in a.sigma_range.split(","))
        noise = noise.restrict(lo, hi)

    def ema_model():
        Dm = build_denoiser(cfg).to(memory_format=memory_format("auto", "cpu"))
        Dm.load_state_dict(ema.state_dict())
        return Dm.eval()

    def judged():
        """The model judged: the EMA model, or with --sigma-range the ensemble it makes with --init's."""
        if not a.sigma_range:
            return ema_model()
        intervals = intervals_from_boundaries([b for b in (lo, hi) if 0 < b < math.inf])
        return ExpertEnsemble([ema_model() if iv.lo == lo else parent.eval() for iv in intervals], intervals)

    def judge(step: int, t: float) -> None:
        Dm, out = judged(), []
        for i in range(0, len(held), 50):
            c, _ = enc.encode([r["caption"] for r in held[i : i + 50]])
            if a.oracle:
                c.clip_pooled = onehot(held[i : i + 50], c.clip_pooled.shape[1])
            with torch.no_grad():
                seeds = list(range(i, i + len(c)))
                out += list(to_uint8(sample(Dm, c, (3, R, R), seeds, SamplerConfig(steps=18, guidance=a.guidance))))
        acc = alignment([o.numpy() for o in out], [{k: r[k] for k in LABELS} for r in held])
        if a.grid:
            from PIL import Image

            Image.fromarray(grid(torch.stack(out[:40]), cols=8).numpy()).resize((8 * 4 * R, 5 * 4 * R)).save(a.grid)
        print(f"{t:5.0f} s  step {step:5d}  " + "  ".join(f"{k} {100 * v:3.0f}%" for k, v in acc.items()), flush=True)

    def from_real(sigma0: float) -> None:
        Dm = Guided(judged(), a.guidance)
        x0 = torch.from_numpy(np.stack([decode_image(r["jpg"], ImageFilter(resolution=R))[0] for r in held]))
        x0 = x0.permute(0, 3, 1, 2).float() / 127.5 - 1
        c, _ = enc.encode([r["caption"] for r in held])
        if a.oracle:
            c.clip_pooled = onehot(held, c.clip_pooled.shape[1])
        full = karras_sigmas(18, 0.002, 80.0, 7.0)
        sigmas = torch.cat([torch.tensor([sigma0]), full[full < sigma0]])
        start = x0 + sigma0 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = to_uint8(SAMPLERS["heun"](Dm, start, sigmas, c))
        acc = alignment([o.numpy() for o in out], [{k: r[k] for k in LABELS} for r in held])
        print(
            f"from the held-out images at sigma {sigma0:g}: "
            + "  ".join(f"{k} {100 * v:3.0f}%" for k, v in acc.items())
        )

    evals = [float(v) for v in a.evals.split(",") if v]
    g, step, t0, paused = torch.Generator().manual_seed(0), 0, time.time(), 0.0
    print(
        f"preset {a.preset} ({R}px), batch {a.batch}, lr {a.lr}, {a.dtype}, P_mean {a.P_mean}, clip {a.clip or 'random'}, "
        f"oracle {a.oracle}, overrides {a.set}, init {a.init}, sigma range {a.sigma_range or 'all'}, "
        f"{sum(p.numel() for p in D.parameters()):,} parameters; "
        f"judged on {len(held)} held-out captions, heun 18, guidance {a.guidance}"
    )
    while (elapsed := time.time() - t0 - paused) < a.seconds:
        if evals and elapsed >= evals[0]:
            evals.pop(0)
            tp = time.time()
            judge(step, elapsed)
            paused += time.time() - tp
        idx = torch.randint(len(x), (a.batch,), generator=g)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 100)
        train_step(D, opt, [(x[idx], cond[idx])], noise, drop, dtype=a.dtype)
        ema.update(D)
        step += 1
    print(f"{step * a.batch / (time.time() - t0 - paused):.0f} img/s")
    judge(step, time.time() - t0 - paused)
    for sigma0 in (float(v) for v in a.from_real.split(",") if v):
        from_real(sigma0)
    if a.save:
        from ediffi.checkpoint import save_checkpoint
        from ediffi_platform.config import to_dict

        save_checkpoint(a.save, cfg, D, ema=ema_model(), metadata={"encoders": to_dict(enc.cfg)})


if __name__ == "__main__":
    main()
