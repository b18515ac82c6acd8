"""A programmatic judge of text alignment for the synthetic dataset: reads an image's background,
object color, shape, size and position back from its pixels and compares with the prompt's labels.

Rules (numpy + scipy.ndimage): the background is the median border color; the object is the
largest connected region far from it (stray specks elsewhere are ignored), grown to every connected
pixel nearer the object's median color than the background's (the midpoint of an anti-aliased
edge); color = nearest palette color to that median; position = nearest anchor to the bounding
box's centre; size = nearest extent to the box's longer side; shape = the ideal circle, square or
upward triangle drawn in the same box that overlaps the object best (intersection over union).
On the dataset's own images at 32 px every label but shape reads 100 % right, shape ~97 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ediffi_platform.synthetic import BACKGROUNDS, COLORS, LABELS, POSITIONS, SIZES

NONE = "none"  # no object found
SHAPE_BY_SIZE = {size: f"shape_{size}" for size in SIZES}  # alignment()'s keys for shape accuracy per asked size


def _nearest(value: np.ndarray, table: dict) -> str:
    names = list(table)
    d = [np.linalg.norm(np.asarray(table[n], dtype=np.float64) - value) for n in names]
    return names[int(np.argmin(d))]


def shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape as drawn in an h x w box (pixel centres inside the shape)."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w, (y + 0.5) / h
    return {
        "square": np.ones((h, w), dtype=bool),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(u - 0.5) <= v / 2,  # apex up, as the dataset draws it
    }


def read_labels(image: np.ndarray) -> dict[str, str]:
    """The labels an image shows (uint8 [H, W, 3]); every object label is 'none' when no object is found."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {tuple(img.shape)}")
    h, w, _ = img.shape
    # 1. Background: the median border color.
    bg = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    background = _nearest(bg, BACKGROUNDS)
    dist_bg = np.linalg.norm(img - bg, axis=2)
    rough = dist_bg > 60.0
    if rough.sum() < max(2, 0.01 * h * w):
        return {k: NONE for k in LABELS} | {"background": background}
    # 2. The object: the largest region far from the background, then its full extent.
    regions, n = ndimage.label(rough)
    main = regions == 1 + int(np.argmax(ndimage.sum(rough, regions, range(1, n + 1))))
    color = np.median(img[main], axis=0)
    regions, _ = ndimage.label(np.linalg.norm(img - color, axis=2) < dist_bg)
    mask = np.isin(regions, np.setdiff1d(np.unique(regions[main]), [0]))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # 3. Labels from its color, box and outline.
    box = mask[y0:y1, x0:x1]
    iou = {s: (box & t).sum() / (box | t).sum() for s, t in shape_templates(y1 - y0, x1 - x0).items()}
    centre = np.array([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h])
    return {
        "color": _nearest(color, COLORS),
        "shape": max(iou, key=iou.get),
        "size": min(SIZES, key=lambda s: abs(SIZES[s] - max(x1 - x0, y1 - y0) / max(h, w))),
        "position": _nearest(centre, POSITIONS),
        "background": background,
    }


def right_per_image(images: Sequence[np.ndarray], labels: Sequence[dict[str, str]]) -> dict[str, np.ndarray]:
    """Per image, whether each label (and all five at once) reads as asked: one bool array per key."""
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"need one label set per image, got {len(images)} images and {len(labels)} label sets")
    seen = [read_labels(im) for im in images]
    out = {k: np.array([s[k] == want[k] for s, want in zip(seen, labels, strict=True)]) for k in LABELS}
    out["all"] = np.logical_and.reduce([out[k] for k in LABELS])
    return out


def alignment(images: Sequence[np.ndarray], labels: Sequence[dict[str, str]]) -> dict[str, float]:
    """Accuracy per label (and all five right at once) of images against the labels they were asked for,
    plus shape accuracy per asked size (`shape_small`, `shape_big`: small shapes are ~8 px at 32 px)."""
    right = right_per_image(images, labels)
    out = {k: float(v.mean()) for k, v in right.items()}
    for size, key in SHAPE_BY_SIZE.items():
        asked = np.array([want["size"] == size for want in labels])
        if asked.any():
            out[key] = float(right["shape"][asked].mean())
    return out
