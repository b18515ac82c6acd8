"""Paint-with-words and style references on a model trained on the synthetic dataset.

    python benchmarks/bench_paint_style.py --model runs/base --n 120

Paint-with-words: prompts name color, shape and background but no position; the "{color} {shape}"
phrase is painted into a random corner box. The synthetic judge reads the object's position back;
printed: how often it lands in the painted corner with and without painting.
Style: prompts name shape, size, position and background but no color; a reference image of a
random color conditions text+style generation. Printed: how often the judged color is the
reference's, with and without the reference.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from ediffi.checkpoint import load_checkpoint, read_config
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import load_ensemble, read_manifest
from ediffi.paint import PaintWithWords, paint_masks
from ediffi.pipeline import SamplerConfig, sample, to_uint8
from ediffi_platform.judge import read_labels
from ediffi_platform.runs import resolve_checkpoint
from ediffi_platform.synthetic import BACKGROUNDS, COLORS, SHAPES, draw

CORNERS = {  # painted boxes, as fractions of the image
    "top left": [0.0, 0.0, 0.5, 0.5],
    "top right": [0.5, 0.0, 1.0, 0.5],
    "bottom left": [0.0, 0.5, 0.5, 1.0],
    "bottom right": [0.5, 0.5, 1.0, 1.0],
}


def load(model: str):
    if model.endswith(".json"):
        return load_ensemble(model), read_config(read_manifest(model)[1][0])
    ck = resolve_checkpoint(model)
    return load_checkpoint(ck, use_ema=True)[0], read_config(ck)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="manifest, checkpoint or training run folder")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--strength", default="1", help="paint-with-words w' (a comma-separated list sweeps it)")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--style-guidance", type=float, default=3.0)
    a = p.parse_args()
    torch.set_num_threads(2)
    D, (net_cfg, meta) = load(a.model)
    enc = ConditioningEncoder(EncoderConfig(**(meta.get("encoders") or {}))).eval()
    R = net_cfg.img_resolution
    rng = random.Random(0)
    scfg = SamplerConfig(steps=a.steps, guidance=a.guidance)

    # Paint-with-words: position accuracy in the painted corner.
    prompts, targets, masks = [], [], []
    for _ in range(a.n):
        color, shape, bg = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(["white", "black", "gray"])
        corner = rng.choice(list(CORNERS))
        prompts.append(f"a big {color} {shape} on a {bg} background")
        targets.append(corner)
        masks.append({f"{color} {shape}": {"rect": CORNERS[corner]}})
    cond, _ = enc.encode(prompts)
    seeds = list(range(a.n))
    token_masks = paint_masks(enc, prompts, masks, R)
    with torch.no_grad():
        plain = to_uint8(sample(D, cond, (3, R, R), seeds, scfg)).numpy()
    acc = lambda imgs: np.mean([read_labels(im)["position"] == t for im, t in zip(imgs, targets, strict=True)])
    print(f"model {a.model} ({R}px), {a.n} prompts without a position, heun {a.steps} steps, guidance {a.guidance}")
    print(f"paint-with-words: object in the painted corner {100 * acc(plain):.1f}% without painting (chance 25%)")
    for w in (float(v) for v in a.strength.split(",")):
        with torch.no_grad():
            painted = to_uint8(sample(PaintWithWords(D, token_masks, w), cond, (3, R, R), seeds, scfg)).numpy()
        print(f"paint-with-words: {100 * acc(painted):.1f}% with w'={w:g}")

    # Style: color of the output vs the reference's color.
    prompts, refs, want = [], [], []
    for _ in range(a.n):
        shape, bg = rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        color = rng.choice(list(COLORS))
        prompts.append(f"a big {shape} in the center on a {bg} background")
        refs.append(np.asarray(draw(color, shape, "big", "center", bg, image_size=64)))
        want.append(color)
    images = torch.from_numpy(np.stack(refs)).permute(0, 3, 1, 2)
    cond, _ = enc.encode(prompts, images)
    text_only = cond.drop("clip_image", False)
    with torch.no_grad():
        without = to_uint8(sample(D, text_only, (3, R, R), seeds, scfg)).numpy()
        styled = to_uint8(
            sample(
                D,
                cond,
                (3, R, R),
                seeds,
                SamplerConfig(steps=a.steps, guidance=a.guidance, style_guidance=a.style_guidance),
            )
        ).numpy()
    match = lambda imgs: np.mean([read_labels(im)["color"] == c for im, c in zip(imgs, want, strict=True)])
    print(
        f"style: output color = reference color {100 * match(without):.1f}% without the reference "
        f"(chance {100 / len(COLORS):.0f}%), {100 * match(styled):.1f}% with it (style guidance {a.style_guidance})"
    )


if __name__ == "__main__":
    main()
