"""Exponential moving average of weights, kept in fp32: constant decay or EDM2-style power EMA.

Under FSDP2 the average is sharded like the weights it follows (DTensors); `full_state_dict`
gathers it for checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def power_gamma(sigma_rel: float) -> float:
    """EDM2 (Karras et al. 2024, eq. 3): the exponent gamma whose power EMA has relative std sigma_rel."""
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28), got {sigma_rel}")
    f = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel  # decreasing in g
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


class EMA:
    """fp32 shadow weights of a module, updated after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, sigma_rel: float | None = None):
        if sigma_rel is None and not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.gamma = power_gamma(sigma_rel) if sigma_rel is not None else None
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def beta(self, t: int) -> float:
        """Weight of the old average at update t (1-based)."""
        if self.gamma is not None:
            return (1 - 1 / t) ** (self.gamma + 1)  # power EMA: averages over a fixed fraction of training
        return min(self.decay, (1 + t) / (10 + t))  # constant decay, warmed up

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        beta = self.beta(self.updates)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.lerp_(v.detach().float(), 1 - beta)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's state dict (sharded under FSDP2)."""
        return self.shadow

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, unsharded, on CPU (under FSDP2 a collective: every rank calls it)."""
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in self.shadow.items()}

    def load(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        """Restore from full (unsharded) weights, e.g. a checkpoint's; sharded again like the model."""
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise ValueError(f"EMA weights do not match the model: {sorted(missing)[:3]}")
        self.shadow = {k: _like(self.shadow[k], v.float()) for k, v in shadow.items()}
        self.updates = updates


def _like(current: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` placed like `current`: same device, and the same shards when `current` is a DTensor."""
    if isinstance(current, DTensor):
        # Every rank holds the same full tensor (each read the checkpoint): keep the local shard,
        # no scatter from rank 0 (one collective fewer per tensor at every resume).
        return distribute_tensor(full.to(current.device), current.device_mesh, current.placements, src_data_rank=None)
    return torch.empty_like(current).copy_(full)  # keeps the model's layout (e.g. channels_last)
