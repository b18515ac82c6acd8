"""The training reader's epoch cache: an epoch's order depends on (seed, epoch) and the rows only,
never on the order the stream delivered them in or on whether the epoch came from memory."""

import random

import numpy as np
import pyarrow as pa

from ediffi.conditioning import CondSpec
from ediffi_platform.reader import EpochCache
from ediffi_platform.shards import ShardMeta, build_table, to_tensors

META = ShardMeta(CondSpec(t5_len=2, t5_dim=2, clip_len=2, clip_dim=2, clip_embed_dim=2), resolution=2)


def _rows(n: int) -> pa.Table:
    """n shard rows; row i's image pixels all hold i, so a batch tells which rows it holds."""
    layout = META.layout()
    cols = {name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in layout.items()}
    cols["image"][:] = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    return build_table(META, {"key": [f"k{i:03d}" for i in range(n)], "caption": [""] * n, **cols})


class Stream:
    """A Ray-Data-like shard whose rows arrive in an order of its own (as blocks do after a restart)."""

    def __init__(self, table: pa.Table, order_seed: int):
        self.table, self.order_seed = table, order_seed
        self.passes = 0

    def iter_batches(self, batch_size: int, batch_format: str, local_shuffle_buffer_size=None, local_shuffle_seed=None):
        assert batch_format == "pyarrow"
        self.passes += 1
        idx = list(range(self.table.num_rows))
        random.Random(self.order_seed).shuffle(idx)
        rows = self.table.take(idx)
        for i in range(0, rows.num_rows, batch_size):
            yield rows.slice(i, batch_size)


def _ids(batches) -> list[list[int]]:
    return [((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist() for images, _ in batches]


def _all(epoch: list[list[int]]) -> list[int]:
    return sorted(i for batch in epoch for i in batch)


def _epoch(cache: EpochCache, stream: Stream, epoch: int) -> list[list[int]]:
    return _ids(cache.batches(stream, META, batch_size=6, shuffle_buffer=8, seed=epoch))


def test_an_epoch_has_the_same_order_from_memory_or_from_a_stream_in_any_order():
    table = _rows(20)
    warm, stream = EpochCache(max_mb=1), Stream(table, order_seed=0)
    e0, e1 = _epoch(warm, stream, 0), _epoch(warm, stream, 1)  # epoch 1 from memory
    assert stream.passes == 1 and warm.data is not None
    assert _all(e0) == _all(e1) == list(range(20)) and e0 != e1
    assert [len(b) for b in e0] == [6, 6, 6, 2]
    # After a restart the cache is empty and the stream delivers the rows in another order.
    for epoch, want in ((0, e0), (1, e1)):
        assert _epoch(EpochCache(max_mb=1), Stream(table, order_seed=10 + epoch), epoch) == want


def test_a_shard_too_big_for_the_cache_streams_every_row_once_per_epoch():
    table = _rows(20)
    images, cond = to_tensors(_rows(6), META)
    one_batch = (images.nbytes + sum(t.nbytes for t in cond.tensors().values())) / 2**20  # MB in memory
    as_streamed = _ids(to_tensors(t, META) for t in Stream(table, order_seed=3).iter_batches(6, "pyarrow"))
    asked = []
    ask = lambda others: lambda fits: asked.append(fits) or (fits and others)  # as all_reduce(MIN)
    # No cache; one that overflows after a batch; one whose workers do not all fit.
    caches = (EpochCache(0, ask(True)), EpochCache(one_batch, ask(True)), EpochCache(1, ask(False)))
    for cache in caches:
        stream = Stream(table, order_seed=3)
        assert [_epoch(cache, stream, epoch) for epoch in (0, 1)] == [as_streamed] * 2
        assert stream.passes == 2 and cache.data is None
    assert asked == [False, True]  # once per cache that tried, before its first batch
