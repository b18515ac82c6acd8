"""Sample images from a checkpoint, an expert ensemble, or (smoke run) an untrained preset.

python jobs/sample.py --prompts "a small red circle" "a big blue square" --out outputs/sample
python jobs/sample.py --manifest runs/experts/manifest.json --prompts "..." --steps 32 --guidance 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from ediffi.checkpoint import EMA_FILE, load_checkpoint, read_config
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import load_ensemble, read_manifest
from ediffi.pipeline import SamplerConfig, check_compatible, grid, text_to_image
from ediffi.presets import PRESETS, build_denoiser, get_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    src.add_argument("--manifest", help="expert ensemble manifest (JSON)")
    src.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="untrained preset (smoke run)")
    p.add_argument("--prompts", nargs="+", default=["a small red circle in the top left corner"])
    p.add_argument("--out", default="outputs/sample", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--sampler", default="heun", help="euler, heun or dpmpp_2m")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--t5", default="tiny", help="T5 encoder: 'tiny', a local path or a hub id")
    p.add_argument("--clip", default="tiny", help="CLIP model: 'tiny' or an open_clip name")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    cfg = SamplerConfig(sampler=a.sampler, steps=a.steps, guidance=a.guidance)
    if a.checkpoint:
        D, _ = load_checkpoint(a.checkpoint, use_ema=Path(a.checkpoint, EMA_FILE).is_file(), device=a.device)
        net_cfg = D.net.cfg
    elif a.manifest:
        net_cfg = read_config(read_manifest(a.manifest)[1][0])[0]
        D = load_ensemble(a.manifest, device=a.device)
    else:
        print(f"note: no --checkpoint or --manifest given; sampling the untrained '{a.preset}' preset (smoke run)")
        net_cfg = get_preset(a.preset)
        D = build_denoiser(net_cfg, a.device).eval()
    encoder = ConditioningEncoder(EncoderConfig(t5=a.t5, clip=a.clip, clip_pretrained=a.clip_pretrained)).to(a.device)
    check_compatible(encoder.spec, net_cfg.cond)

    t0 = time.perf_counter()
    seeds = [a.seed + i for i in range(len(a.prompts))]
    images = text_to_image(D, encoder, a.prompts, seeds, net_cfg.img_resolution, cfg, a.device)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, seed) in enumerate(zip(images, seeds, strict=True)):
        Image.fromarray(img.numpy()).save(out / f"{i:05d}_seed{seed}.png")
    Image.fromarray(grid(images).numpy()).save(out / "grid.png")
    print(
        f"{len(images)} images ({net_cfg.img_resolution}x{net_cfg.img_resolution}, {a.sampler}, {a.steps} steps) "
        f"in {seconds:.2f}s -> {out}/ (grid: {out / 'grid.png'})"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # bad checkpoint, manifest or settings: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
