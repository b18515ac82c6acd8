"""A programmatic judge of text alignment for the synthetic dataset: reads an image's background,
object color, shape, size and position back from its pixels and compares with the prompt's labels.

Rules (numpy only): the background is the median border color; the object is every pixel far from
it; color = nearest palette color to the object's median; position = nearest anchor to the
object's centroid; size = nearest extent to its bounding box; shape = nearest fill ratio of the
bounding box (square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ediffi_platform.synthetic import BACKGROUNDS, COLORS, LABELS, POSITIONS, SIZES

FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
NONE = "none"  # no object found


def _nearest(value: np.ndarray, table: dict) -> str:
    names = list(table)
    d = [np.linalg.norm(np.asarray(table[n], dtype=np.float64) - value) for n in names]
    return names[int(np.argmin(d))]


def read_labels(image: np.ndarray) -> dict[str, str]:
    """The labels an image shows (uint8 [H, W, 3]); every label is 'none' when no object is found."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {tuple(img.shape)}")
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=2)
    mask = dist > 60.0
    if mask.sum() < max(2, 0.01 * h * w):
        return {k: NONE for k in LABELS} | {"background": _nearest(bg, BACKGROUNDS)}
    ys, xs = np.nonzero(mask)
    extent_x, extent_y = (xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    centroid = np.array([(xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h])
    return {
        "color": _nearest(np.median(img[mask], axis=0), COLORS),
        "shape": min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill)),
        "size": min(SIZES, key=lambda s: abs(SIZES[s] - max(extent_x, extent_y))),
        "position": _nearest(centroid, POSITIONS),
        "background": _nearest(bg, BACKGROUNDS),
    }


def alignment(images: Sequence[np.ndarray], labels: Sequence[dict[str, str]]) -> dict[str, float]:
    """Accuracy per label (and all five right at once) of images against the labels they were asked for."""
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"need one label set per image, got {len(images)} images and {len(labels)} label sets")
    seen = [read_labels(im) for im in images]
    out = {k: float(np.mean([s[k] == want[k] for s, want in zip(seen, labels, strict=True)])) for k in LABELS}
    out["all"] = float(np.mean([all(s[k] == want[k] for k in LABELS) for s, want in zip(seen, labels, strict=True)]))
    return out
