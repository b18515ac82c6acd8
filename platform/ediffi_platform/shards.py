"""The embedding-shard format: one row per image, tensors stored as fixed-size raw bytes.

Columns: `key`, `caption`, `image` (uint8 [R, R, 3]), the conditioning fields of
`ediffi.conditioning` (embeddings in the storage dtype, masks as bool), and any pass-through
columns (strings). Shapes and dtypes come from the `CondSpec` and resolution stored in every
file's metadata, so a reader checks a shard against the model before training on it.
The precompute writer and the training reader both go through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from ediffi.conditioning import EMBEDDING_FIELDS, MASK_FIELDS, SCHEMA_VERSION, Cond, CondSpec

META_KEY = b"ediffi.shard"
IMAGE = "image"
TENSOR_COLUMNS = (IMAGE, *EMBEDDING_FIELDS, *MASK_FIELDS)
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class ShardMeta:
    """What every embedding shard records about its layout."""

    spec: CondSpec
    resolution: int
    storage_dtype: str = "float16"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and numpy dtype of every tensor column."""
        emb = np.dtype(STORAGE_DTYPES[self.storage_dtype])
        shapes = self.spec.shapes()
        out = {IMAGE: ((self.resolution, self.resolution, 3), np.dtype(np.uint8))}
        out.update({k: (shapes[k], emb) for k in EMBEDDING_FIELDS})
        out.update({k: (shapes[k], np.dtype(np.bool_)) for k in MASK_FIELDS})
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec": asdict(self.spec)}, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> ShardMeta:
        d = json.loads(text)
        return ShardMeta(CondSpec(**d["spec"]), d["resolution"], d["storage_dtype"], d["schema_version"])


def tensor_column(arr: np.ndarray) -> pa.LargeBinaryArray:
    """Rows of a contiguous array as one binary value each (no per-row Python copies)."""
    n = arr.shape[0]
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    data = np.ascontiguousarray(arr).view(np.uint8).reshape(n, row)
    offsets = np.arange(n + 1, dtype=np.int64) * row
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def column_array(col: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """A binary column back to an array [N, *shape]; a row of the wrong size is an error naming the column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.null_count:
        raise ValueError(f"column {name!r} has {col.null_count} null rows")
    col = col.cast(pa.large_binary())
    n = len(col)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + n + 1]
    row = int(np.prod(shape)) * dtype.itemsize
    if n and not np.all(np.diff(offsets) == row):
        raise ValueError(f"column {name!r}: rows are not {row} bytes (expected shape {shape}, dtype {dtype})")
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]] if n else np.empty(0, np.uint8)
    return data.view(dtype).reshape(n, *shape)


def build_table(meta: ShardMeta, columns: dict[str, np.ndarray | list]) -> pa.Table:
    """An embedding-shard table; `columns` holds key, caption, every tensor column, and extras."""
    fields, arrays = [], []
    layout = meta.layout()
    for name, value in columns.items():
        if name in layout:
            shape, dtype = layout[name]
            value = np.asarray(value)
            if value.shape[1:] != shape:
                raise ValueError(f"column {name!r} has row shape {value.shape[1:]}, expected {shape}")
            arrays.append(tensor_column(value.astype(dtype, copy=False)))
            fields.append(pa.field(name, pa.large_binary()))
        else:
            arrays.append(pa.array(value, type=pa.string()))
            fields.append(pa.field(name, pa.string()))
    missing = [c for c in ("key", "caption", *layout) if c not in columns]
    if missing:
        raise ValueError(f"embedding shard is missing columns {missing}")
    schema = pa.schema(fields, metadata={META_KEY: meta.to_json().encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def read_meta(schema: pa.Schema, where: str = "") -> ShardMeta:
    """The ShardMeta stored in a shard's schema; a file without it is an error naming the file."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{where or 'table'}: not an ediffi embedding shard (no {META_KEY.decode()} metadata)")
    meta = ShardMeta.from_json(raw)
    if meta.schema_version != SCHEMA_VERSION:
        raise ValueError(f"{where}: shard schema version {meta.schema_version}, this code reads {SCHEMA_VERSION}")
    return meta


def to_tensors(table: pa.Table, meta: ShardMeta) -> tuple[torch.Tensor, Cond]:
    """Images as float [-1, 1] [B, 3, R, R] and the float32 Cond of a batch of shard rows."""
    layout = meta.layout()
    arrays = {name: column_array(table.column(name), *layout[name], name) for name in layout}
    images = torch.from_numpy(arrays.pop(IMAGE).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    cond = Cond(**{k: torch.from_numpy(v.astype(bool if k in MASK_FIELDS else np.float32)) for k, v in arrays.items()})
    return images, cond


def check_shards_fit(meta: ShardMeta, spec: CondSpec, resolution: int, where: str = "") -> None:
    """Raise naming the first difference between the shards' layout and what a model expects."""
    if meta.resolution != resolution:
        raise ValueError(f"{where}: shards hold {meta.resolution}px images, the model expects {resolution}px")
    diff = meta.spec.first_difference(spec)
    if diff:
        name, got, want = diff
        raise ValueError(f"{where}: shards have {name}={got}, the model expects {name}={want}")
