"""Classifier-free guidance as a denoiser wrapper: one batched network call per evaluation."""

from __future__ import annotations

import torch

from ediffi.conditioning import EMBEDDINGS, GUIDANCE_MODES, Cond
from ediffi.edm import Denoiser


class Guided:
    """D_guided = D(x, s, uncond) + scale * (D(x, s, cond) - D(x, s, uncond)).

    `mode` picks the embeddings guidance pushes toward ("text", "image", "all", or a tuple of
    names from conditioning.EMBEDDINGS): the unconditional half is `cond` with those dropped.
    Conditional and unconditional halves go through the network as one batch of 2B.
    """

    def __init__(self, denoiser: Denoiser, scale: float, mode: str | tuple[str, ...] = "all"):
        names = GUIDANCE_MODES.get(mode) if isinstance(mode, str) else tuple(mode)
        if names is None or not names or any(n not in EMBEDDINGS for n in names):
            raise ValueError(
                f"guidance mode must be one of {sorted(GUIDANCE_MODES)} or a tuple of {sorted(EMBEDDINGS)}, "
                f"got {mode!r}"
            )
        self.denoiser = denoiser
        self.scale = float(scale)
        self.guided = names

    def uncond(self, cond: Cond) -> Cond:
        """The unconditional branch: cond with the guided embeddings dropped."""
        for which in self.guided:
            cond = cond.drop(which, False)
        return cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.scale == 1.0:  # no guidance: skip the unconditional half entirely
            return self.denoiser(x, sigma, cond)
        B = x.shape[0]
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([cond, self.uncond(cond)]))
        c, u = out[:B], out[B:]
        return u + self.scale * (c - u)
