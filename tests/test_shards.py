"""The embedding-shard format: round trip, layout checks, compatibility with a model."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import random_cond
from ediffi.conditioning import CondSpec, cond_to_numpy
from ediffi.presets import TINY_COND
from ediffi_platform.shards import (
    ShardMeta,
    build_table,
    check_shards_fit,
    column_array,
    read_meta,
    to_tensors,
)

META = ShardMeta(TINY_COND, 8, "float16")


def _table(n=3):
    cond = random_cond(TINY_COND, n)
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    cols = {
        "key": [f"k{i}" for i in range(n)],
        "caption": ["c"] * n,
        "image": images,
        **cond_to_numpy(cond),
    }
    return build_table(META, cols), cond, images


def test_round_trip():
    table, cond, images = _table()
    assert read_meta(table.schema) == META
    imgs, back = to_tensors(table, META)
    torch.testing.assert_close(imgs, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(back.t5, cond.t5.half().float())
    assert torch.equal(back.clip_mask, cond.clip_mask)
    # slices (as Ray hands out) decode too
    imgs2, _ = to_tensors(table.slice(1, 2), META)
    torch.testing.assert_close(imgs2, imgs[1:])


def test_layout_errors():
    table, _, _ = _table()
    with pytest.raises(ValueError, match="'t5': rows are not"):
        column_array(table.column("t5"), (5,), np.dtype(np.float16), "t5")
    with pytest.raises(ValueError, match="not an ediffi embedding shard"):
        read_meta(pa.schema([("a", pa.int64())]), "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        build_table(META, {"key": ["a"], "caption": ["b"]})


def test_compatibility_with_a_model():
    check_shards_fit(META, TINY_COND, 8)
    with pytest.raises(ValueError, match="shards hold 8px images, the model expects 32px"):
        check_shards_fit(META, TINY_COND, 32)
    with pytest.raises(ValueError, match="shards have t5_dim=32, the model expects t5_dim=4096"):
        check_shards_fit(META, CondSpec(t5_len=128, t5_dim=4096, clip_dim=32, clip_embed_dim=32), 8)
