"""The training-side reader of embedding shards: a Ray Dataset, or a plain single-process iterator."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from ediffi.conditioning import Cond
from ediffi_platform.runs import EMBEDDINGS_MANIFEST
from ediffi_platform.shards import ShardMeta, read_meta, to_tensors
from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem, join, read_json


def shard_files(root_url: str, storage: StorageConfig = StorageConfig()) -> tuple[list[str], ShardMeta]:
    """Part files of every completed shard under an embedding folder, and their common layout."""
    # Here, not at the top: the precompute module imports the encoders (open_clip, transformers:
    # ~2 s), which a training worker or read task never needs.
    from ediffi_platform.precompute import SUCCESS

    fs, root = filesystem(root_url, storage)
    if not fs.exists(join(root, EMBEDDINGS_MANIFEST)):
        raise FileNotFoundError(f"{root_url}: no {EMBEDDINGS_MANIFEST}; run jobs/precompute_embeddings.py first")
    files = []
    for marker in sorted(fs.glob(join(root, "*", SUCCESS))):
        files += sorted(fs.glob(join(marker.rsplit("/", 1)[0], "part-*.parquet")))
    if not files:
        raise FileNotFoundError(f"{root_url}: no completed embedding shards")
    meta = read_meta(pq.read_schema(files[0], filesystem=arrow_filesystem(fs)), files[0])
    doc = read_json(fs, join(root, EMBEDDINGS_MANIFEST))
    if doc.get("meta") and ShardMeta.from_json(json.dumps(doc["meta"])) != meta:
        raise ValueError(f"{root_url}: {files[0]} disagrees with {EMBEDDINGS_MANIFEST} about the layout")
    return files, meta


def iter_batches(
    root_url: str,
    batch_size: int,
    shuffle_buffer: int = 0,
    seed: int = 0,
    storage: StorageConfig = StorageConfig(),
) -> Iterator[tuple[torch.Tensor, Cond]]:
    """Single-process: (images in [-1, 1], Cond) batches over all rows once, locally shuffled."""
    files, meta = shard_files(root_url, storage)
    afs = arrow_filesystem(filesystem(root_url, storage)[0])
    rng = random.Random(seed)
    order = files[:]
    if shuffle_buffer:
        rng.shuffle(order)
    buffer: list[pa.Table] = []
    rows = 0
    for f in order:
        for rb in pq.ParquetFile(f, filesystem=afs).iter_batches(batch_size=batch_size):
            buffer.append(pa.Table.from_batches([rb]))
            rows += rb.num_rows
            while rows >= max(batch_size, shuffle_buffer):
                table, buffer, rows = _take(buffer, batch_size, rng if shuffle_buffer else None)
                yield to_tensors(table, meta)
    while rows:
        table, buffer, rows = _take(buffer, batch_size, rng if shuffle_buffer else None)
        yield to_tensors(table, meta)


def _take(buffer: list[pa.Table], n: int, rng: random.Random | None) -> tuple[pa.Table, list[pa.Table], int]:
    table = pa.concat_tables(buffer).combine_chunks()
    if rng is not None:
        idx = list(range(table.num_rows))
        rng.shuffle(idx)
        table = table.take(idx)
    n = min(n, table.num_rows)
    rest = table.slice(n)
    return table.slice(0, n), ([rest] if rest.num_rows else []), rest.num_rows


def ray_dataset(root_url: str, storage: StorageConfig = StorageConfig()) -> tuple[ray.data.Dataset, ShardMeta]:
    """A Ray Dataset over the embedding rows (for `ray.train.get_dataset_shard`), and their layout."""
    files, meta = shard_files(root_url, storage)
    # Reading is light; a quarter CPU per part file keeps the reader scheduled when training
    # workers hold nearly every CPU (a 1-CPU request would wait forever behind them). Not
    # read_parquet: since Ray 2.60 it first lists the files in a task of a whole CPU (not settable),
    # which never started beside fits holding 1.5 of 2 CPUs.
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        _read_parts,
        fn_kwargs={"root_url": root_url, "storage": storage},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    return ds, meta


def _read_parts(batch: pa.Table, root_url: str, storage: StorageConfig) -> Iterator[pa.Table]:
    """Ray Data task: the rows of the part files a batch names, a row group at a time."""
    afs = arrow_filesystem(filesystem(root_url, storage)[0])
    for f in batch.column("file").to_pylist():
        pf = pq.ParquetFile(f, filesystem=afs)
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i)


def iter_torch(
    it: ray.data.DataIterator | ray.data.Dataset,
    meta: ShardMeta,
    batch_size: int,
    shuffle_buffer: int = 0,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, Cond]]:
    """(images, Cond) batches from a Ray dataset or dataset shard, with a local shuffle buffer."""
    for table in _tables(it, batch_size, shuffle_buffer, seed):
        yield to_tensors(table, meta)


class EpochCache:
    """A worker's dataset shard, held in memory when it fits in `max_mb`, so that an epoch's order
    depends only on its seed and the shard's rows.

    The first pass after a (re)start reads the whole shard before yielding a batch; a shard that
    fits is sorted by row key, and every epoch, that one included, is a permutation of it drawn from
    the epoch's seed. A run resumed inside an epoch therefore gets the very batches the
    uninterrupted run had, whatever order Ray Data delivered the rows in (which rows reach which
    worker is Ray Data's split: fixed for one worker, possibly dealt anew after a restart of
    several). Later epochs skip the Ray Data pipeline, which costs seconds per epoch: on 2 CPU
    cores, a 4,000-row dataset re-read every 62 steps took about a quarter of the training time.
    A shard larger than `max_mb` (0 = always stream) is streamed every epoch, in the stream's order
    with Ray Data's seeded local shuffle. `agree(fits) -> bool` makes the workers decide together
    (Ray Data's split streams an epoch only when every worker reads it, so either all cache or none
    do); every worker calls it once, before its first batch: when its shard is read, or as soon as
    it overflows.
    """

    def __init__(self, max_mb: float, agree: Callable[[bool], bool] = lambda fits: fits):
        self.max_bytes = max_mb * 2**20
        self.agree = agree
        self.data: tuple[torch.Tensor, Cond] | None = None
        self.streaming = self.max_bytes <= 0  # decided: the shard is not held in memory
        self.rows_read = 0  # rows read over every pass (image-text rows, when streamed)
        self.dropped: Counter[str] = Counter()  # of them, streamed inputs ingest dropped, by reason

    def batches(
        self,
        it: ray.data.DataIterator | ray.data.Dataset,
        meta: ShardMeta,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> Iterator[tuple[torch.Tensor, Cond]]:
        """One epoch of (images, Cond) batches: a permutation (by `seed`) of the shard held in memory,
        or, for a shard that does not fit, the stream."""
        stream = None
        if not self.streaming and self.data is None:
            stream = self._kept(_tables(it, batch_size, shuffle_buffer, seed))
            read, complete = self._read(stream, meta)
            if self.agree(complete and bool(read)):  # the whole shard fits, on every worker
                self.data = _sorted_by_key(read)
            else:
                self.streaming = True
                yield from (batch for _, *batch in read)
        if self.streaming:
            stream = stream if stream is not None else self._kept(_tables(it, batch_size, shuffle_buffer, seed))
            yield from (to_tensors(table, meta) for table in stream)
            return
        images, cond = self.data
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield images[idx], cond[idx]

    def _kept(self, stream: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """The rows to train on: rows encoded on the fly (ediffi_platform.precompute.stream_dataset)
        include the inputs ingest dropped, with their reason, which are counted here and left out."""
        for table in stream:
            self.rows_read += table.num_rows
            if "drop_reason" in table.column_names:
                reasons = table.column("drop_reason")
                self.dropped.update(r for r in reasons.to_pylist() if r)
                table = table.filter(pc.equal(reasons, "")).drop_columns(["drop_reason"])
            if table.num_rows:
                yield table

    def _read(self, stream: Iterator[pa.Table], meta: ShardMeta) -> tuple[list, bool]:
        """(key column, images, Cond) of the stream's batches until it ends (True) or they outgrow the
        budget (False; the stream then continues where this stopped)."""
        read, size = [], 0
        for table in stream:
            images, cond = to_tensors(table, meta)
            read.append((table.column("key"), images, cond))
            size += images.nbytes + sum(t.nbytes for t in cond.tensors().values())
            if size > self.max_bytes:
                return read, False
        return read, True


def _tables(it, batch_size: int, shuffle_buffer: int, seed: int | None) -> Iterator[pa.Table]:
    """Arrow batches of a Ray dataset or shard, through a seeded local shuffle buffer."""
    return iter(
        it.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed,
        )
    )


def _sorted_by_key(read: list[tuple[pa.ChunkedArray, torch.Tensor, Cond]]) -> tuple[torch.Tensor, Cond]:
    """The batches as one (images, Cond), rows sorted by key: an order independent of the stream's."""
    keys = pa.chunked_array([c for k, _, _ in read for c in k.chunks])
    order = torch.from_numpy(pc.sort_indices(keys).to_numpy().astype("int64"))
    return torch.cat([b[1] for b in read])[order], Cond.cat([b[2] for b in read])[order]
