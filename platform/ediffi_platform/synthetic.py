"""The embedded default dataset: captioned images of simple shapes, as img2dataset-style Parquet shards.

Each row holds `key`, `jpg` (image bytes), `caption`, and the attribute labels the caption was made
from (`color`, `shape`, `size`, `position`, `background`), so a model's text alignment can later
be judged programmatically. Deterministic by seed: shard i of seed s is the same everywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem, join

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.24, "big": 0.44}  # shape extent as a fraction of the image side
POSITIONS = {  # centre of the shape, as fractions of width and height
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (12, 12, 12), "gray": (128, 128, 128)}
POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "at the center"),
    **{p: (f"in the {p} corner", f"at the {p}", f"in the {p}") for p in POSITIONS if p != "center"},
}
TEMPLATES = (
    "a {size} {color} {shape} {where} on a {bg} background",
    "{size} {color} {shape} {where}, {bg} background",
    "a picture of a {size} {color} {shape} {where} on {bg}",
    "there is a {size} {color} {shape} {where} of a {bg} canvas",
)
LABELS = ("color", "shape", "size", "position", "background")


@dataclass(frozen=True)
class SyntheticConfig:
    """How much synthetic data to write, and where."""

    output: str = "data/synthetic"  # folder or s3:// prefix for the Parquet shards
    rows: int = 2000  # total rows over all shards
    shards: int = 4  # number of Parquet shards
    image_size: int = 64  # side of the square source images
    seed: int = 0  # everything is determined by (seed, shard)
    image_format: str = "jpg"  # jpg, png or webp

    def __post_init__(self) -> None:
        if self.rows < 1 or self.shards < 1 or self.shards > self.rows:
            raise ValueError(f"need 1 <= shards <= rows, got rows={self.rows}, shards={self.shards}")
        if self.image_format not in ("jpg", "png", "webp"):
            raise ValueError(f"image_format must be jpg, png or webp, got {self.image_format!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")


@dataclass(frozen=True)
class SyntheticJob:
    """The synthetic-data job: what to write, and the object store's settings."""

    data: SyntheticConfig = field(default_factory=SyntheticConfig)  # what to write
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials


def draw(
    color: str,
    shape: str,
    size: str,
    position: str,
    background: str,
    *,
    image_size: int,
    jitter: tuple[float, float] = (0.0, 0.0),
) -> Image.Image:
    """Render one shape image."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx, cy = (cx + jitter[0]) * image_size, (cy + jitter[1]) * image_size
    r = SIZES[size] * image_size / 2
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def caption(labels: dict[str, str], rng: np.random.Generator) -> str:
    """A caption for the labels, from one of several templates and phrasings."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    phrases = POSITION_PHRASES[labels["position"]]
    return template.format(
        size=labels["size"],
        color=labels["color"],
        shape=labels["shape"],
        where=phrases[rng.integers(len(phrases))],
        bg=labels["background"],
    )


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """Image bytes in jpg, png or webp."""
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=95)
    return buf.getvalue()


def make_shard(cfg: SyntheticConfig, shard: int) -> pa.Table:
    """The rows of one shard, deterministic in (cfg.seed, shard)."""
    rng = np.random.default_rng([cfg.seed, shard])
    n = cfg.rows // cfg.shards + (1 if shard < cfg.rows % cfg.shards else 0)
    cols: dict[str, list] = {"key": [], "jpg": [], "caption": [], **{k: [] for k in LABELS}}
    for i in range(n):
        labels = {
            "color": list(COLORS)[rng.integers(len(COLORS))],
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "size": list(SIZES)[rng.integers(len(SIZES))],
            "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
            "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        }
        jitter = tuple(rng.uniform(-0.04, 0.04, size=2))
        img = draw(**labels, image_size=cfg.image_size, jitter=jitter)
        cols["key"].append(f"{shard:05d}{i:04d}")
        cols["jpg"].append(encode_image(img, cfg.image_format))
        cols["caption"].append(caption(labels, rng))
        for k in LABELS:
            cols[k].append(labels[k])
    return pa.table({k: pa.array(v, type=pa.binary() if k == "jpg" else pa.string()) for k, v in cols.items()})


def write_synthetic(cfg: SyntheticConfig, storage: StorageConfig = StorageConfig(), progress=None) -> list[str]:
    """Write all shards (`{output}/{shard:05d}.parquet`) and return their URLs; `progress` hears of each."""
    fs, root = filesystem(cfg.output, storage)
    fs.makedirs(root, exist_ok=True)
    afs = arrow_filesystem(fs)
    urls = []
    for s in range(cfg.shards):
        path = join(root, f"{s:05d}.parquet")
        pq.write_table(make_shard(cfg, s), path, filesystem=afs)
        urls.append(join(cfg.output, f"{s:05d}.parquet"))
        if progress:
            progress(f"synthetic data: {s + 1}/{cfg.shards} shards, {cfg.rows} rows in all")
    return urls
