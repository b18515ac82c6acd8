"""The embedding-shard format: one row per image, each sequence stored as its present tokens only.

Columns: `key`, `caption`, `image` (uint8 [R, R, 3]), the conditioning embeddings of
`ediffi.conditioning` in the storage dtype, and any pass-through columns (strings). Fixed-size
tensors (`image`, `clip_pooled`) are one raw binary value per row. The sequences (`t5`, `clip`, and
`clip_image`, a sequence of at most one vector) keep only the vectors their mask marks present,
which come first in every row: a row's value is n x width values, and its mask is "the first n".
A caption of 12 tokens stores 12 T5 vectors, not the 128 of the network's context; the reader pads
back to the `CondSpec`'s lengths. Shapes and dtypes come from the `CondSpec` and resolution stored
in every file's metadata, so a reader checks a shard against the model before training on it.
The precompute writer and the training reader both go through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from ediffi.conditioning import Cond, CondSpec

META_KEY = b"ediffi.shard"
IMAGE = "image"
# Version 1 stored every tensor padded to its full shape, masks as columns; 2 stores the sequences'
# present vectors only (masks follow from their lengths).
SHARD_VERSION = 2
SEQUENCES = {"t5": "t5_mask", "clip": "clip_mask", "clip_image": "clip_image_mask"}  # field -> its mask
FIXED = (IMAGE, "clip_pooled")
TENSOR_COLUMNS = (*FIXED, *SEQUENCES)  # what a shard stores (masks are not columns: they follow from lengths)
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class ShardMeta:
    """What every embedding shard records about its layout."""

    spec: CondSpec
    resolution: int
    storage_dtype: str = "float16"
    schema_version: int = SHARD_VERSION

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and numpy dtype of every tensor field as the network sees it (padded), masks included."""
        emb = np.dtype(STORAGE_DTYPES[self.storage_dtype])
        shapes = self.spec.shapes()
        out = {
            IMAGE: ((self.resolution, self.resolution, 3), np.dtype(np.uint8)),
            "clip_pooled": (shapes["clip_pooled"], emb),
        }
        for name, mask in SEQUENCES.items():
            out[name], out[mask] = (shapes[name], emb), (shapes[mask], np.dtype(np.bool_))
        return out

    def sequence(self, name: str) -> tuple[int, tuple[int, ...]]:
        """A sequence field's most vectors per row and the shape of one vector."""
        shape = self.spec.shapes()[name]
        return (shape[0], shape[1:]) if len(shape) > 1 else (1, shape)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec": asdict(self.spec)}, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> ShardMeta:
        d = json.loads(text)
        return ShardMeta(CondSpec(**d["spec"]), d["resolution"], d["storage_dtype"], d["schema_version"])


def _binary(offsets: np.ndarray, data: np.ndarray) -> pa.LargeBinaryArray:
    """A binary array from its int64 offsets [N + 1] and the bytes they index (no per-row copies)."""
    n = len(offsets) - 1
    buffers = [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(np.ascontiguousarray(data).view(np.uint8))]
    return pa.Array.from_buffers(pa.large_binary(), n, buffers)


def tensor_column(arr: np.ndarray) -> pa.LargeBinaryArray:
    """Rows of a contiguous array as one binary value each."""
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    return _binary(np.arange(arr.shape[0] + 1, dtype=np.int64) * row, arr.reshape(-1))


def sequence_column(values: np.ndarray, mask: np.ndarray, name: str) -> pa.LargeBinaryArray:
    """Rows of `values` [N, T, *vector] keeping only the vectors `mask` [N, T] marks present, which
    must come first in each row; a row with a gap is an error naming it."""
    n_present = mask.sum(axis=1)
    gaps = np.flatnonzero((mask != (np.arange(mask.shape[1]) < n_present[:, None])).any(axis=1))
    if len(gaps):
        raise ValueError(f"column {name!r} row {gaps[0]}: present entries must come first (stored as the first n)")
    vector = int(np.prod(values.shape[2:], dtype=np.int64)) * values.dtype.itemsize
    offsets = np.concatenate([[0], np.cumsum(n_present)]) * vector
    return _binary(offsets, values[mask])


def _buffers(col: pa.Array | pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's offsets [N + 1] (from 0) and bytes; null rows are an error naming the column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.null_count:
        raise ValueError(f"column {name!r} has {col.null_count} null rows")
    col = col.cast(pa.large_binary())
    n = len(col)
    if not n:
        return np.zeros(1, np.int64), np.empty(0, np.uint8)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + n + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], data


def column_array(col: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """A fixed-size binary column back to an array [N, *shape]; a row of another size is an error
    naming the column and row."""
    offsets, data = _buffers(col, name)
    row = int(np.prod(shape)) * dtype.itemsize
    bad = np.flatnonzero(np.diff(offsets) != row)
    if len(bad):
        raise ValueError(f"column {name!r} row {bad[0]}: not {row} bytes (expected shape {shape}, dtype {dtype})")
    return data.view(dtype).reshape(len(offsets) - 1, *shape)


def sequence_array(
    col: pa.Array | pa.ChunkedArray, length: int, vector: tuple[int, ...], dtype: np.dtype, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """A sequence column back to (values [N, length, *vector] zero-padded, mask [N, length]); a row
    that is not whole vectors, or holds more than `length`, is an error naming the column and row."""
    offsets, data = _buffers(col, name)
    size = int(np.prod(vector)) * dtype.itemsize
    nbytes = np.diff(offsets)
    n_present = nbytes // size
    bad = np.flatnonzero((nbytes % size != 0) | (n_present > length))
    if len(bad):
        raise ValueError(
            f"column {name!r} row {bad[0]}: {nbytes[bad[0]]} bytes is not up to {length} vectors of "
            f"{size} bytes (shape {vector}, dtype {dtype})"
        )
    mask = np.arange(length) < n_present[:, None]
    values = np.zeros((len(nbytes), length, *vector), dtype)
    values[mask] = data.view(dtype).reshape(-1, *vector)
    return values, mask


def build_table(meta: ShardMeta, columns: dict[str, np.ndarray | list]) -> pa.Table:
    """An embedding-shard table; `columns` holds key, caption, every tensor field of `meta.layout()`
    (sequences padded, with their masks) and extras (strings)."""
    layout = meta.layout()
    missing = [c for c in ("key", "caption", *layout) if c not in columns]
    if missing:
        raise ValueError(f"embedding shard is missing columns {missing}")
    arrays = {}
    for name, (shape, dtype) in layout.items():
        value = np.asarray(columns[name])
        if value.shape[1:] != shape:
            raise ValueError(f"column {name!r} has row shape {value.shape[1:]}, expected {shape}")
        arrays[name] = value.astype(dtype, copy=False)
    fields, out = [], []
    for name, value in columns.items():
        if name in SEQUENCES:
            length, vector = meta.sequence(name)
            mask = arrays[SEQUENCES[name]].reshape(-1, length)
            out.append(sequence_column(arrays[name].reshape(-1, length, *vector), mask, SEQUENCES[name]))
        elif name in FIXED:
            out.append(tensor_column(arrays[name]))
        elif name in layout:
            continue  # a mask: it is the length of its sequence's row
        else:
            out.append(pa.array(value, type=pa.string()))
        fields.append(pa.field(name, out[-1].type))
    schema = pa.schema(fields, metadata={META_KEY: meta.to_json().encode()})
    return pa.Table.from_arrays(out, schema=schema)


def read_meta(schema: pa.Schema, where: str = "") -> ShardMeta:
    """The ShardMeta stored in a shard's schema; a file without it, or of another format version,
    is an error naming the file."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{where or 'table'}: not an ediffi embedding shard (no {META_KEY.decode()} metadata)")
    meta = ShardMeta.from_json(raw)
    if meta.schema_version != SHARD_VERSION:
        raise ValueError(
            f"{where or 'table'}: embedding shards of format version {meta.schema_version}; this ediffi reads "
            f"version {SHARD_VERSION} (sequences stored unpadded): re-run jobs/precompute_embeddings.py into a new output folder"
        )
    return meta


def to_tensors(table: pa.Table, meta: ShardMeta) -> tuple[torch.Tensor, Cond]:
    """Images as float [-1, 1] [B, 3, R, R] and the float32 Cond of a batch of shard rows (sequences
    padded back to the spec's lengths)."""
    layout = meta.layout()
    fixed = {name: column_array(table.column(name), *layout[name], name) for name in FIXED}
    images = torch.from_numpy(fixed.pop(IMAGE).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in fixed.items()}
    for name, mask_name in SEQUENCES.items():
        values, mask = sequence_array(table.column(name), *meta.sequence(name), layout[name][1], name)
        shape = (len(values), *layout[name][0])
        tensors[name] = torch.from_numpy(values.astype(np.float32).reshape(shape))
        tensors[mask_name] = torch.from_numpy(mask.reshape(shape[: 1 + len(layout[mask_name][0])]))
    return images, Cond(**tensors)


def check_shards_fit(meta: ShardMeta, spec: CondSpec, resolution: int, where: str = "") -> None:
    """Raise naming the first difference between the shards' layout and what a model expects."""
    if meta.resolution != resolution:
        raise ValueError(f"{where}: shards hold {meta.resolution}px images, the model expects {resolution}px")
    diff = meta.spec.first_difference(spec)
    if diff:
        name, got, want = diff
        raise ValueError(f"{where}: shards have {name}={got}, the model expects {name}={want}")
