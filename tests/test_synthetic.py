"""The synthetic captioned-shapes dataset: deterministic, labelled, captions consistent with labels."""

import io

import numpy as np
import pytest
from PIL import Image

from ediffi_platform.synthetic import (
    COLORS,
    POSITION_PHRASES,
    SyntheticConfig,
    make_shard,
    write_synthetic,
)


def test_deterministic_by_seed_and_shard():
    cfg = SyntheticConfig(rows=40, shards=2)
    assert make_shard(cfg, 0).equals(make_shard(cfg, 0))
    assert not make_shard(cfg, 0).equals(make_shard(cfg, 1))
    assert not make_shard(cfg, 0).equals(make_shard(SyntheticConfig(rows=40, shards=2, seed=1), 0))


def test_captions_carry_the_labels_and_images_show_them():
    rows = make_shard(SyntheticConfig(rows=60, shards=1), 0).to_pylist()
    assert len({r["key"] for r in rows}) == 60
    for r in rows:
        cap = r["caption"]
        assert r["color"] in cap and r["shape"] in cap and r["size"] in cap and r["background"] in cap
        assert any(p in cap for p in POSITION_PHRASES[r["position"]])
        img = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("RGB"), dtype=float)
        want = np.array(COLORS[r["color"]], dtype=float)
        assert (np.abs(img - want).sum(-1) < 60).mean() > 0.02  # the shape's colour is really there
    assert len({r["color"] for r in rows}) == 6 and len({r["shape"] for r in rows}) == 3


def test_write_synthetic_splits_rows(tmp_path):
    urls = write_synthetic(SyntheticConfig(output=str(tmp_path), rows=10, shards=3, image_format="png"))
    assert [u.rsplit("/", 1)[-1] for u in urls] == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(u).num_rows for u in urls) == 10
    with pytest.raises(ValueError, match="shards <= rows"):
        SyntheticConfig(rows=2, shards=3)
