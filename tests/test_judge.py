"""The synthetic judge reads the dataset's own images back, ignores specks, and reports nothing for an empty canvas."""

import numpy as np
import pytest

from ediffi_platform.ingest import ImageFilter, decode_image
from ediffi_platform.judge import NONE, alignment, read_labels
from ediffi_platform.synthetic import LABELS, SHAPES, SyntheticConfig, draw, make_shard


def test_reads_the_datasets_own_images_at_32px():
    rows = make_shard(SyntheticConfig(rows=300, shards=1, seed=3), 0).to_pylist()
    images = [decode_image(r["jpg"], ImageFilter(resolution=32))[0] for r in rows]  # JPEG, resized like training data
    acc = alignment(images, [{k: r[k] for k in LABELS} for r in rows])
    assert all(acc[k] == 1.0 for k in ("color", "size", "position", "background")), acc
    assert acc["shape"] >= 0.93, acc  # small shapes are ~8 px wide at 32 px
    assert acc["shape_big"] == 1.0 and 0.85 <= acc["shape_small"] < 1.0, acc  # the misses are all small shapes


def test_shape_accuracy_per_size_counts_only_that_size():
    circle = lambda size: np.asarray(draw("red", "circle", size, "center", "white", image_size=32))
    images = [circle("small"), circle("small"), circle("big")]
    labels = [
        dict(color="red", shape=s, size=z, position="center", background="white")
        for s, z in (("circle", "small"), ("square", "small"), ("triangle", "big"))
    ]
    acc = alignment(images, labels)
    assert (acc["shape_small"], acc["shape_big"]) == (0.5, 0.0) and acc["shape"] == pytest.approx(1 / 3)
    assert "shape_big" not in alignment(images[:1], labels[:1])  # no big shape asked for: no figure


@pytest.mark.parametrize("shape", SHAPES)
def test_specks_and_soft_edges_do_not_change_the_reading(shape):
    img = np.asarray(draw("blue", shape, "big", "top left", "white", image_size=32)).copy()
    img[28, 29] = img[2, 30] = (200, 30, 30)  # two stray pixels far from the object
    blurred = (img.astype(float) + np.roll(img, 1, 0) + np.roll(img, 1, 1)) / 3  # softened edges
    for im in (img, blurred.astype(np.uint8)):
        seen = read_labels(im)
        assert (seen["shape"], seen["position"], seen["size"], seen["color"]) == (shape, "top left", "big", "blue")


def test_empty_canvas_and_bad_input():
    seen = read_labels(np.full((32, 32, 3), 12, np.uint8))
    assert seen["background"] == "black" and all(seen[k] == NONE for k in LABELS if k != "background")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        read_labels(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="one label set per image"):
        alignment([np.zeros((8, 8, 3))], [])
