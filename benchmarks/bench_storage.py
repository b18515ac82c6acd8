"""Bytes per embedding-shard row on disk: sequences padded to the context vs their present tokens only.

    python benchmarks/bench_storage.py                 # demo encoders and T5-XXL + ViT-L/14 shapes
    python benchmarks/bench_storage.py --t5-tokenizer PATH   # real T5 token counts (a local tokenizer folder)

Two caption sets: the synthetic dataset's and `photo_captions.txt` (ordinary photo captions, 8-21
words). Two layouts:
- demo: the tiny offline encoders (byte-level T5, 32 wide; CLIP 32 wide), run on the captions, 32 px.
- T5-XXL + ViT-L/14 (128 x 4096, 77 x 768, 768), 64 px (eDiff-I's base resolution): encoders of that
  size do not fit this machine, so each row holds random float16 values (embeddings are dense: they
  compress about as little) at the captions' real token counts. CLIP counts come from CLIP's own BPE
  tokenizer; T5 counts from `--t5-tokenizer`, or else are estimated as the CLIP count minus one (the
  start token; T5 adds only its end token; its SentencePiece vocabulary splits English text about as finely).
Every row is written with this project's shard writer (the present-tokens format) and, for
comparison, with every tensor padded to its full shape as format version 1 stored it, both as
Parquet with pyarrow's default compression. "Unpadded" is the bytes of the tensors' present values
(image, present tokens, pooled and image embeddings): the least any layout could store uncompressed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ediffi.conditioning import CondSpec, cond_to_numpy
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi_platform.shards import FIXED, META_KEY, SEQUENCES, ShardMeta, build_table, tensor_column
from ediffi_platform.synthetic import SyntheticConfig, make_shard

PHOTO = Path(__file__).with_name("photo_captions.txt")
XXL = CondSpec(t5_len=128, t5_dim=4096, clip_len=77, clip_dim=768, clip_embed_dim=768)


def padded_table(meta: ShardMeta, columns: dict) -> pa.Table:
    """The rows as format version 1 stored them: every tensor, masks included, at its full shape."""
    layout = meta.layout()
    arrays = {k: tensor_column(np.asarray(columns[k]).astype(d, copy=False)) for k, (_, d) in layout.items()}
    strings = {k: pa.array(columns[k], pa.string()) for k in ("key", "caption")}
    return pa.table({**strings, **arrays}).replace_schema_metadata({META_KEY: meta.to_json().encode()})


def on_disk(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.tell()


def unpadded(meta: ShardMeta, columns: dict) -> int:
    """Bytes of the present values: fixed tensors whole, sequences' present vectors only."""
    layout = meta.layout()
    total = sum(np.asarray(columns[k]).astype(layout[k][1], copy=False).nbytes for k in FIXED)
    for name, mask in SEQUENCES.items():
        _, vector = meta.sequence(name)
        total += int(np.asarray(columns[mask]).sum()) * int(np.prod(vector)) * layout[name][1].itemsize
    return total


def demo_rows(captions: list[str], resolution: int = 32) -> tuple[ShardMeta, dict]:
    """The tiny encoders' real outputs for the captions (random images: their embedding is present)."""
    enc = ConditioningEncoder(EncoderConfig()).eval()
    images = np.random.default_rng(0).integers(0, 256, (len(captions), resolution, resolution, 3), dtype=np.uint8)
    with torch.no_grad():
        cond, _ = enc.encode(captions, torch.from_numpy(images).permute(0, 3, 1, 2))
    meta = ShardMeta(enc.spec, resolution)
    return meta, {"image": images, **cond_to_numpy(cond)}


def xxl_rows(t5_tokens: np.ndarray, clip_tokens: np.ndarray, resolution: int = 64) -> tuple[ShardMeta, dict]:
    """Random float16 rows of the T5-XXL + ViT-L/14 shapes with the given token counts."""
    rng, n, s = np.random.default_rng(0), len(t5_tokens), XXL
    t5_mask = np.arange(s.t5_len) < np.minimum(t5_tokens, s.t5_len)[:, None]
    clip_mask = np.arange(s.clip_len) < np.minimum(clip_tokens, s.clip_len)[:, None]
    vec = lambda *shape: rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16)
    cols = {
        "image": rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8),
        "t5": vec(s.t5_len, s.t5_dim) * t5_mask[..., None],
        "t5_mask": t5_mask,
        "clip": vec(s.clip_len, s.clip_dim) * clip_mask[..., None],
        "clip_mask": clip_mask,
        "clip_pooled": vec(s.clip_embed_dim),
        "clip_image": vec(s.clip_embed_dim),
        "clip_image_mask": np.ones(n, bool),
    }
    return ShardMeta(s, resolution), cols


def clip_token_counts(captions: list[str]) -> np.ndarray:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-L-14")
    return (tok(captions) != 0).sum(1).numpy()  # start + BPE pieces + end (0 pads)


def t5_token_counts(captions: list[str], tokenizer: str | None, clip: np.ndarray) -> tuple[np.ndarray, str]:
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        return np.array([len(ids) for ids in tok(captions)["input_ids"]]), f"T5 tokenizer {tokenizer}"
    return clip - 1, "estimated from CLIP's BPE"


def report(layout: str, captions_name: str, meta: ShardMeta, cols: dict, captions: list[str]) -> str:
    n = len(captions)
    cols = {"key": [f"{i:06d}" for i in range(n)], "caption": captions, **cols}
    least = unpadded(meta, cols) / n
    padded = padded_table(meta, cols)
    variable = build_table(meta, cols)
    raw_padded = sum(padded.column(k).nbytes for k in meta.layout()) / n
    disk_p, disk_v = on_disk(padded) / n, on_disk(variable) / n
    tokens = f"{cols['t5_mask'].sum(1).mean():.1f} / {cols['clip_mask'].sum(1).mean():.1f}"
    kib = lambda b: f"{b / 1024:,.1f} KiB"
    return (
        f"| {layout} | {captions_name} ({n}) | {tokens} | {kib(least)} | {kib(raw_padded)} | "
        f"{kib(disk_p)} ({disk_p / least:.2f}x) | {kib(disk_v)} ({disk_v / least:.2f}x) |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="synthetic captions")
    p.add_argument("--t5-tokenizer", default=None, help="a local T5 tokenizer folder for real T5 token counts")
    a = p.parse_args()
    sets = {
        "synthetic": make_shard(SyntheticConfig(rows=a.rows, shards=1), 0).column("caption").to_pylist(),
        "photo captions": [line.strip() for line in PHOTO.read_text().splitlines() if line.strip()],
    }
    print(
        "| layout | captions (rows) | mean T5 / CLIP tokens | unpadded | padded, raw | padded on disk | present tokens on disk |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, caps in sets.items():
        print(report("demo encoders, 32 px", name, *demo_rows(caps), caps), flush=True)
    for name, caps in sets.items():
        clip = clip_token_counts(caps)
        t5, how = t5_token_counts(caps, a.t5_tokenizer, clip)
        print(report(f"T5-XXL + ViT-L/14, 64 px (T5 {how})", name, *xxl_rows(t5, clip), caps), flush=True)


if __name__ == "__main__":
    main()
