"""The expert job's `plan.auto`: measure the base model's text-influence curve on held-out rows and
place the experts' boundaries from it (`ediffi.text_influence`), with the curve as JSON and PNG.

Runs in the job's driver without Ray (a few hundred denoiser calls on `auto_rows` rows). The chosen
boundaries go into the job's state, so a re-run trains the same experts without measuring again.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

from ediffi.checkpoint import EMA_FILE, load_checkpoint
from ediffi.edm import NoiseDistribution
from ediffi.sr import augment, degrade
from ediffi.text_influence import boundaries_from_influence, influence_curve, log_sigmas
from ediffi_platform.reader import iter_batches
from ediffi_platform.runs import fetch_model
from ediffi_platform.storage import StorageConfig, join

CURVE_JSON, CURVE_PNG = "auto_plan.json", "auto_plan.png"


def measure(
    base: str,
    data: str,
    *,
    experts: int,
    rows: int,
    levels: int,
    noise: NoiseDistribution,
    lowres: int,
    storage: StorageConfig,
) -> dict:
    """The base checkpoint's (EMA) influence and loss curve on the first `rows` rows of `data`, and the
    `experts - 1` boundaries placed from it."""
    local = fetch_model(base, storage)
    D, _ = load_checkpoint(local, use_ema=os.path.isfile(os.path.join(local, EMA_FILE)))
    D.eval()
    batches, n = [], 0
    for x0, cond in iter_batches(data, min(rows, 32), storage=storage):
        take = min(len(x0), rows - n)
        x0, cond = x0[:take], cond[:take]
        if lowres:  # an SR stage predicts from its degraded input, at augmentation level 0
            cond = augment(cond, degrade(x0, lowres), torch.zeros(take))
        batches.append((x0, cond))
        n += take
        if n >= rows:
            break
    if not batches:
        raise ValueError(f"plan.auto: {data} has no rows to measure the base model on")
    curve = influence_curve(D, batches, log_sigmas(levels, noise))
    curve["boundaries"] = boundaries_from_influence(curve["sigma"], curve["influence"], experts, noise)
    curve["rows"] = n
    return curve


def plot(curve: dict, path: str) -> None:
    """The curve as a PNG: text influence and loss per noise level, the boundaries as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    s = np.asarray(curve["sigma"])
    ax.plot(s, np.asarray(curve["influence"]) / max(curve["influence"]), label="text influence (of its max)")
    ax.plot(s, np.asarray(curve["loss"]) / max(curve["loss"]), label="EDM loss (of its max)")
    for b in curve["boundaries"]:
        ax.axvline(b, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_title(f"plan.auto on {curve['rows']} rows: boundaries " + ", ".join(f"{b:.3g}" for b in curve["boundaries"]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save(curve: dict, fs, root: str) -> list[str]:
    """Write the curve's JSON and PNG into the job's output folder; returns local copies (for MLflow)."""
    d = tempfile.mkdtemp(prefix="ediffi-auto-plan-")
    local_json, local_png = os.path.join(d, CURVE_JSON), os.path.join(d, CURVE_PNG)
    with open(local_json, "w") as f:
        json.dump(curve, f, indent=1)
    plot(curve, local_png)
    fs.makedirs(root, exist_ok=True)
    for p in (local_json, local_png):
        fs.put(p, join(root, os.path.basename(p)))
    return [local_json, local_png]
