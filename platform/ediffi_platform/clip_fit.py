"""Fit a CLIP model to image-text shards with the contrastive loss, for offline runs.

eDiff-I conditions on pretrained encoders. Offline, with no weights to download, the demo's tiny
CLIP is random: its text embeddings spread a caption's content thinly, and the denoiser spends
most of its budget learning to read them. A few hundred contrastive steps on the training pairs
(open_clip's own loss) give text embeddings that separate the captions' content, the role a
pretrained CLIP plays at full scale. The result is an ordinary open_clip checkpoint: pass its path
as `encoders.clip_pretrained` to the precompute job; checkpoints record it for generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save

from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi_platform.ingest import ImageFilter, InputConfig, clip_view, list_shards, open_image
from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem
from ediffi_platform.text import clean_text


@dataclass(frozen=True)
class ClipFitConfig:
    """Contrastive fitting of the (tiny) CLIP to image-text shards."""

    input: InputConfig = field(default_factory=InputConfig)  # image-text shards and their columns
    output: str = "data/clip.safetensors"  # the fitted weights (local path or s3://)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # the CLIP to start from (clip, clip_pretrained)
    steps: int = 600  # optimiser steps
    batch_size: int = 256  # pairs per step (the contrastive loss's negatives)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay
    max_rows: int = 50_000  # pairs held in memory (the first ones, shard by shard)
    threads: int = 2  # torch CPU threads
    seed: int = 0  # batch order
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "max_rows", "threads"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.output.endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors path, got {self.output!r}")


def read_pairs(cfg: ClipFitConfig, resolution: int) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """CLIP views of the source images (uint8 [N, 3, R, R]) and captions; undecodable or captionless
    rows skipped and counted."""
    fs, _ = filesystem(cfg.input.path, cfg.storage)
    afs = arrow_filesystem(fs)
    images, captions, skipped = [], [], {}
    filt = ImageFilter(resolution=resolution)
    for shard in list_shards(cfg.input.path, cfg.storage):
        table = pq.read_table(shard, filesystem=afs, columns=[cfg.input.image_column, cfg.input.caption_column])
        for data, text in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            text = clean_text(text or "")  # as training encodes it (text.py)
            img, why = open_image(data, filt)
            why = why or (None if text else "missing_caption")
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            images.append(clip_view(img, resolution))  # what the precompute's CLIP sees
            captions.append(text)
            if len(captions) >= cfg.max_rows:
                break
        if len(captions) >= cfg.max_rows:
            break
    if len(captions) < 2:
        raise ValueError(f"{cfg.input.path}: {len(captions)} usable image-text pairs; need at least 2")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), captions, skipped


def fit_clip(cfg: ClipFitConfig, progress=print) -> dict:
    """Fit, write the weights to cfg.output, and return what was measured."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    enc = ConditioningEncoder(cfg.encoders)
    images, captions, skipped = read_pairs(cfg, enc.image_size)
    model = enc.clip.float().train().requires_grad_(True)
    ids = enc.clip_tokenizer(captions)
    pixels = enc.clip_pixels(images)  # the same preprocessing as at encoding time
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn, g = ClipLoss(), torch.Generator().manual_seed(cfg.seed)
    B = min(cfg.batch_size, len(captions))
    losses = []
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(len(captions), generator=g)[:B]
        image_features, text_features, scale = model(pixels[idx], ids[idx])
        loss = loss_fn(image_features, text_features, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
        if step % max(1, cfg.steps // 5) == 0 or step == cfg.steps:
            progress(f"clip fit: step {step}/{cfg.steps}, contrastive loss {np.mean(losses[-20:]):.3f}")
    fs, path = filesystem(cfg.output, cfg.storage)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    return {
        "output": cfg.output,
        "pairs": len(captions),
        "skipped": skipped,
        "loss_first": float(np.mean(losses[:10])),
        "loss_last": float(np.mean(losses[-20:])),
        "chance_loss": float(np.log(B)),
        "seconds": time.time() - t0,
    }
