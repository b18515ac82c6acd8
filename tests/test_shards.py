"""The embedding-shard format: round trip, layout checks, compatibility with a model."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import random_cond
from ediffi.conditioning import CondSpec, cond_to_numpy
from ediffi.presets import TINY_COND
from ediffi_platform.shards import (
    META_KEY,
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
    for name in ("t5", "clip", "clip_pooled", "clip_image"):
        torch.testing.assert_close(getattr(back, name), getattr(cond, name).half().float())
    for name in ("t5_mask", "clip_mask", "clip_image_mask"):
        assert torch.equal(getattr(back, name), getattr(cond, name)), name
    # slices (as Ray hands out) decode too
    imgs2, back2 = to_tensors(table.slice(1, 2), META)
    torch.testing.assert_close(imgs2, imgs[1:])
    assert torch.equal(back2.t5_mask, cond.t5_mask[1:])


def test_sequences_store_their_present_tokens_only():
    table, cond, _ = _table(4)
    lengths = lambda name: [len(v) for v in table.column(name).to_pylist()]
    assert lengths("t5") == (cond.t5_mask.sum(1) * TINY_COND.t5_dim * 2).tolist()
    assert lengths("clip") == (cond.clip_mask.sum(1) * TINY_COND.clip_dim * 2).tolist()
    assert not {"t5_mask", "clip_mask", "clip_image_mask"} & set(table.column_names)
    # an absent image embedding stores nothing and reads back absent and zero
    no_image = random_cond(TINY_COND, 2, image=False)
    cols = {
        "key": ["a", "b"],
        "caption": ["", ""],
        "image": np.zeros((2, 8, 8, 3), np.uint8),
        **cond_to_numpy(no_image),
    }
    t = build_table(META, cols)
    assert [len(v) for v in t.column("clip_image").to_pylist()] == [0, 0]
    _, back = to_tensors(t, META)
    assert not back.clip_image_mask.any() and not back.clip_image.any()


def test_layout_errors():
    table, _, _ = _table()
    with pytest.raises(ValueError, match="column 'image' row 0: not 10 bytes"):
        column_array(table.column("image"), (5,), np.dtype(np.float16), "image")
    too_long = ShardMeta(replace(TINY_COND, t5_len=1), 8, "float16")
    with pytest.raises(ValueError, match=r"column 't5' row \d+: \d+ bytes is not up to 1 vectors"):
        to_tensors(table, too_long)
    with pytest.raises(ValueError, match="not an ediffi embedding shard"):
        read_meta(pa.schema([("a", pa.int64())]), "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        build_table(META, {"key": ["a"], "caption": ["b"]})
    gap = random_cond(TINY_COND, 2)
    gap.t5_mask[1, 0] = False  # a present token after an absent one
    cols = {"key": ["a", "b"], "caption": ["", ""], "image": np.zeros((2, 8, 8, 3), np.uint8), **cond_to_numpy(gap)}
    with pytest.raises(ValueError, match="column 't5_mask' row 1: present entries must come first"):
        build_table(META, cols)


def test_shards_of_the_padded_format_are_refused_with_how_to_redo_them():
    old = replace(META, schema_version=1)
    schema = pa.schema([("key", pa.string())], metadata={META_KEY: old.to_json().encode()})
    with pytest.raises(ValueError, match=r"old\.parquet: embedding shards of format version 1.*re-run jobs/precompute"):
        read_meta(schema, "old.parquet")


def test_compatibility_with_a_model():
    check_shards_fit(META, TINY_COND, 8)
    with pytest.raises(ValueError, match="shards hold 8px images, the model expects 32px"):
        check_shards_fit(META, TINY_COND, 32)
    with pytest.raises(ValueError, match="shards have t5_dim=32, the model expects t5_dim=4096"):
        check_shards_fit(META, CondSpec(t5_len=128, t5_dim=4096, clip_dim=32, clip_embed_dim=32), 8)
