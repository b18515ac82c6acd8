"""Reading image-text Parquet shards: schema checks, decoding, resizing, filtering with counted drops."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem
from ediffi_platform.text import clean_text, was_cleaned

DROP_REASONS = (
    "empty_caption",
    "missing_image",
    "decode_error",
    "too_large",
    "too_small",
    "bad_aspect",
)


@dataclass(frozen=True)
class InputConfig:
    """Where the image-text shards are and what their columns are called (img2dataset defaults)."""

    path: str = "data/synthetic"  # folder of .parquet files, a glob, one file, or s3:// of any of these
    image_column: str = "jpg"  # encoded image bytes (JPEG, PNG or WebP)
    caption_column: str = "caption"  # text
    key_column: str = "key"  # unique id of a row
    keep_columns: tuple[str, ...] = ()  # extra string columns copied to the output (e.g. labels)


@dataclass(frozen=True)
class ImageFilter:
    """Target size and the filters applied before resizing."""

    resolution: int = 32  # output side: shorter side resized to this, then center-cropped
    min_size: int = 0  # drop images whose shorter side is below this (0 = keep all)
    max_aspect: float = 2.0  # drop images whose long/short side ratio is above this

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")


def list_shards(path: str, storage: StorageConfig = StorageConfig()) -> list[str]:
    """Input shard paths (inside their filesystem), sorted; an empty match is an error."""
    fs, p = filesystem(path, storage)
    if any(c in p for c in "*?["):
        files = fs.glob(p)
    elif fs.isdir(p):
        files = [f for f in fs.find(p) if f.endswith(".parquet")]
    elif fs.isfile(p):
        files = [p]
    else:
        raise FileNotFoundError(f"input path {path} does not exist")
    files = sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"no .parquet shards found at {path}")
    return files


def shard_name(path: str) -> str:
    """The shard's file name without directory and .parquet suffix (names its output)."""
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def check_schema(path: str, cfg: InputConfig, storage: StorageConfig = StorageConfig()) -> int:
    """Check a shard's columns and types from its footer; returns its row count."""
    fs, _ = filesystem(cfg.path, storage)
    try:
        md = pq.ParquetFile(path, filesystem=arrow_filesystem(fs)).metadata
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = md.schema.to_arrow_schema()
    want = {
        cfg.image_column: (pa.binary(), pa.large_binary()),
        cfg.caption_column: (pa.string(), pa.large_string()),
        cfg.key_column: (pa.string(), pa.large_string()),
        **{c: (pa.string(), pa.large_string()) for c in cfg.keep_columns},
    }
    for col, types in want.items():
        if col not in schema.names:
            raise ValueError(f"{path}: column {col!r} not found (columns: {schema.names}); set input.*_column")
        if schema.field(col).type not in types:
            raise ValueError(
                f"{path}: column {col!r} has type {schema.field(col).type}, expected {' or '.join(map(str, types))}"
            )
    return md.num_rows


def _to_8bit(img: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits (16-bit PNG / TIFF, 32-bit int, float) scaled to 0-255;
    Pillow's convert("RGB") would clip it (a 16-bit PNG comes out almost white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64) / 257.0  # 0-65535 -> 0-255
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a  # float images in [0, 1]
    else:
        return img
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), mode="L")


def open_image(data: bytes | None, f: ImageFilter) -> tuple[Image.Image | None, str | None]:
    """The RGB image at its own size (EXIF orientation applied, deep greyscale scaled to 8 bits,
    transparency composited on white) if it passes the filters, or (None, drop reason)."""
    if not data:
        return None, "missing_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)  # a photo stored sideways with an orientation tag
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception:
        return None, "decode_error"
    img = _to_8bit(img)
    w, h = img.size
    if min(w, h) < max(f.min_size, 1):
        return None, "too_small"
    if max(w, h) / min(w, h) > f.max_aspect:
        return None, "bad_aspect"
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB"), None


def square(img: Image.Image, resolution: int) -> np.ndarray:
    """The training view: shorter side resized to `resolution`, centre-cropped, uint8 [R, R, 3]."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def clip_view(img: Image.Image, size: int) -> np.ndarray:
    """What CLIP sees of an RGB image: open_clip's evaluation preprocessing up to normalisation
    (torchvision's Resize(size, bicubic) of the shorter side, then CenterCrop(size)), uint8
    [size, size, 3]. Precompute gives it the source image, generation a style reference."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    other = int(size * long / short)  # Resize truncates the longer side
    nw, nh = (size, other) if w <= h else (other, size)
    img = img.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_image(data: bytes | None, f: ImageFilter) -> tuple[np.ndarray | None, str | None]:
    """RGB uint8 [R, R, 3] (shorter side resized, center-cropped), or (None, drop reason)."""
    img, why = open_image(data, f)
    return (None, why) if img is None else (square(img, f.resolution), None)


def read_and_decode(
    batch: pa.Table, cfg: InputConfig, filt: ImageFilter, storage: StorageConfig, batch_size: int, clip_size: int = 0
) -> Iterator[pa.Table]:
    """Ray Data stage: for each input shard path, stream its rows in batches, decoded (one task per shard)."""
    fs, _ = filesystem(cfg.path, storage)
    afs = arrow_filesystem(fs)
    columns = [cfg.key_column, cfg.caption_column, cfg.image_column, *cfg.keep_columns]
    for path in batch.column("path").to_pylist():
        for rb in pq.ParquetFile(path, filesystem=afs).iter_batches(batch_size=batch_size, columns=columns):
            yield decode_batch(pa.Table.from_batches([rb]), cfg, filt, shard_name(path), clip_size)


def decode_batch(table: pa.Table, cfg: InputConfig, filt: ImageFilter, shard: str, clip_size: int = 0) -> pa.Table:
    """Decode a batch of one shard; every input row comes out, dropped ones with a reason, captions
    normalised (text.clean_text; `normalized` marks those it changed) before the empty check. With a
    `clip_size`, the `clip_view` column holds what CLIP sees of the source image (encoders.clip_view)."""
    keys = table.column(cfg.key_column).to_pylist()
    raw = table.column(cfg.caption_column).to_pylist()
    captions = [clean_text(c or "") for c in raw]
    blobs = table.column(cfg.image_column).to_pylist()
    images, views, reasons = [], [], []
    for cap, blob in zip(captions, blobs, strict=True):
        img, why = (None, "empty_caption") if not cap else open_image(blob, filt)
        images.append(None if img is None else square(img, filt.resolution).tobytes())
        views.append(None if img is None or not clip_size else clip_view(img, clip_size).tobytes())
        reasons.append(why or "")
    out = {
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "normalized": pa.array([was_cleaned(r or "", c) for r, c in zip(raw, captions, strict=True)], pa.bool_()),
        "image": pa.array(images, pa.large_binary()),
        **({"clip_view": pa.array(views, pa.large_binary())} if clip_size else {}),
        "drop_reason": pa.array(reasons, pa.string()),
        "shard": pa.array([shard] * table.num_rows, pa.string()),
    }
    out.update({c: table.column(c).cast(pa.string()) for c in cfg.keep_columns})
    return pa.table(out)
