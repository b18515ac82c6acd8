"""Ensembles of expert denoisers: sigma intervals, splitting, routing, and the manifest."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ediffi.checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, load_checkpoint, read_json_file
from ediffi.conditioning import Cond
from ediffi.edm import Denoiser, NoiseDistribution

# eDiff-I's three-expert base model: the lowest-noise 1/8 of the training distribution's mass,
# the highest-noise 1/512, and one expert for everything between.
EDIFFI_BASE_QUANTILES = (1 / 8, 511 / 512)
MANIFEST_FORMAT, MANIFEST_VERSION = "ediffi-ensemble", 1


@dataclass(frozen=True)
class Interval:
    """A half-open noise interval [lo, hi)."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.lo < self.hi:
            raise ValueError(f"interval must satisfy 0 <= lo < hi, got [{self.lo}, {self.hi})")

    def contains(self, sigma: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the sigmas in [lo, hi)."""
        return (sigma >= self.lo) & (sigma < self.hi)


def intervals_from_boundaries(boundaries: Sequence[float]) -> list[Interval]:
    """[0, b1), [b1, b2), ..., [bn, inf) from strictly increasing inner boundaries."""
    b = [0.0, *map(float, boundaries), math.inf]
    if any(x >= y for x, y in itertools.pairwise(b)):
        raise ValueError(f"sigma boundaries must be positive and strictly increasing, got {list(boundaries)}")
    return [Interval(lo, hi) for lo, hi in itertools.pairwise(b)]


def boundaries_from_quantiles(
    quantiles: Sequence[float], noise: NoiseDistribution = NoiseDistribution()
) -> list[float]:
    """Sigma boundaries at quantiles (0 < q < 1) of the training noise distribution."""
    if any(not 0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie strictly between 0 and 1, got {list(quantiles)}")
    return [noise.quantile(q) for q in quantiles]


def tree_quantiles(depth: int) -> list[float]:
    """Inner quantiles of a binary tree of the given depth over the noise distribution's mass."""
    if depth < 0:
        raise ValueError(f"tree depth must be >= 0, got {depth}")
    return [k / 2**depth for k in range(1, 2**depth)]


def split_interval(
    interval: Interval, noise: NoiseDistribution = NoiseDistribution(), fraction: float = 0.5
) -> tuple[Interval, Interval]:
    """Split an interval where `fraction` of its probability mass lies below (binary-tree split)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    u_lo, u_hi = noise.cdf(interval.lo), noise.cdf(interval.hi)
    mid = noise.quantile(u_lo + fraction * (u_hi - u_lo))
    return Interval(interval.lo, mid), Interval(mid, interval.hi)


def spawn_children(parent: nn.Module, n: int) -> list[nn.Module]:
    """n independent copies of a parent network (weights, buffers) to fine-tune as experts."""
    return [copy.deepcopy(parent) for _ in range(n)]


class ExpertEnsemble:
    """A denoiser that sends each sample to the one expert whose interval holds its sigma."""

    def __init__(self, experts: Sequence[Denoiser], intervals: Sequence[Interval]):
        if len(experts) != len(intervals) or not experts:
            raise ValueError(f"need one interval per expert, got {len(experts)} experts, {len(intervals)} intervals")
        check_coverage(intervals)
        self.experts = list(experts)
        self.intervals = list(intervals)

    def expert_index(self, sigma: float) -> int:
        """Index of the expert that serves one noise level."""
        return next(i for i, iv in enumerate(self.intervals) if iv.lo <= sigma < iv.hi)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.route(x, sigma, cond, lambda expert, idx: expert)

    def route(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        wrap: Callable[[Denoiser, torch.Tensor | None], Denoiser],
    ) -> torch.Tensor:
        """Each sample through its expert as wrap(expert, idx)(x[idx], sigma[idx], cond[idx]), idx being
        the samples' indices in the batch (None: the whole batch), so a wrapper can slice per-sample state."""
        lo, hi = torch.stack(torch.aminmax(sigma)).tolist()  # one host sync a call
        i = self.expert_index(lo)
        if hi < self.intervals[i].hi:  # the whole batch goes to one expert (samplers' usual case)
            return wrap(self.experts[i], None)(x, sigma, cond)
        out = torch.empty_like(x, dtype=torch.float32)
        for expert, iv in zip(self.experts, self.intervals, strict=True):
            idx = iv.contains(sigma).nonzero().flatten()
            if len(idx):
                out[idx] = wrap(expert, idx)(x[idx], sigma[idx], cond[idx])
        return out

    def to(self, device: torch.device | str) -> ExpertEnsemble:
        """Move every expert module to a device."""
        for e in self.experts:
            if isinstance(e, nn.Module):
                e.to(device)
        return self


def check_coverage(intervals: Sequence[Interval]) -> None:
    """Raise unless the intervals cover [0, inf) in order with no gaps or overlaps."""
    if intervals[0].lo != 0.0:
        raise ValueError(f"first expert interval must start at 0, starts at {intervals[0].lo}")
    if intervals[-1].hi != math.inf:
        raise ValueError(f"last expert interval must end at inf, ends at {intervals[-1].hi}")
    for a, b in itertools.pairwise(intervals):
        if a.hi != b.lo:
            kind = "gap" if a.hi < b.lo else "overlap"
            raise ValueError(f"expert intervals have a {kind} between [{a.lo}, {a.hi}) and [{b.lo}, {b.hi})")


# --- manifest ----------------------------------------------------------------------------------


def write_manifest(
    path: str | Path,
    intervals: Sequence[Interval],
    checkpoints: Sequence[str],
    metadata: dict | None = None,
) -> Path:
    """Write the ensemble manifest JSON (checkpoint paths may be relative to its folder)."""
    check_coverage(intervals)
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "experts": [
            {
                "sigma_lo": iv.lo,
                "sigma_hi": None if math.isinf(iv.hi) else iv.hi,
                "checkpoint": str(c),
            }
            for iv, c in zip(intervals, checkpoints, strict=True)
        ],
        "metadata": metadata or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def read_manifest(path: str | Path) -> tuple[list[Interval], list[Path], dict]:
    """Parse and validate a manifest: coverage of [0, inf), no overlaps, checkpoint files present."""
    path = Path(path)
    doc = read_json_file(path, "ensemble manifest", ValueError)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not an ediffi ensemble manifest (format != {MANIFEST_FORMAT!r})")
    entries = doc.get("experts")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'experts' must be a non-empty list")
    intervals, checkpoints = [], []
    for i, e in enumerate(entries):
        try:
            hi = math.inf if e["sigma_hi"] is None else float(e["sigma_hi"])
            intervals.append(Interval(float(e["sigma_lo"]), hi))
            ckpt = Path(e["checkpoint"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: expert {i} is malformed ({err!r})") from None
        ckpt = ckpt if ckpt.is_absolute() else path.parent / ckpt
        for f in (CONFIG_FILE, MODEL_FILE):
            if not (ckpt / f).is_file():
                raise ValueError(f"{path}: expert {i} checkpoint file {ckpt / f} not found")
        checkpoints.append(ckpt)
    try:
        check_coverage(intervals)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return intervals, checkpoints, doc.get("metadata", {})


def load_ensemble(path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu") -> ExpertEnsemble:
    """The ensemble denoiser described by a manifest (EMA weights by default, when present)."""
    intervals, checkpoints, _ = read_manifest(path)
    experts = []
    for ckpt in checkpoints:
        ema = use_ema and (ckpt / EMA_FILE).is_file()
        experts.append(load_checkpoint(ckpt, use_ema=ema, device=device)[0])
    return ExpertEnsemble(experts, intervals)
