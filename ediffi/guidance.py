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
        both = _once(self, cond, lambda c: Cond.cat([c, self.uncond(c)]))
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        c, u = out[:B], out[B:]
        return u + self.scale * (c - u)


class StyleGuided:
    """Two guidance scales, one for the text and one for the style (CLIP image) embedding:

        D = D(null) + text_scale * (D(text) - D(null)) + style_scale * (D(text + style) - D(text))

    where "text" is `cond` without its image embedding and "null" has every embedding dropped.
    With no text in `cond` (style-only), D(text) = D(null) and this is plain guidance toward the
    style. The three branches go through the network as one batch of 3B.
    """

    def __init__(self, denoiser: Denoiser, text_scale: float, style_scale: float):
        self.denoiser, self.text_scale, self.style_scale = denoiser, float(text_scale), float(style_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        B = x.shape[0]
        three = _once(self, cond, lambda c: Cond.cat([c, c.drop("clip_image", False), c.null()]))
        out = self.denoiser(torch.cat([x] * 3), torch.cat([sigma] * 3), three)
        full, t, n = out[:B], out[B : 2 * B], out[2 * B :]
        return n + self.text_scale * (t - n) + self.style_scale * (full - t)


def _once(owner, cond: Cond, make) -> Cond:
    """make(cond), built once for the cond a sampler passes at every step (not again each step)."""
    if getattr(owner, "_cond_key", None) is not cond:
        owner._cond_key, owner._cond_value = cond, make(cond)
    return owner._cond_value


STYLE_MODES = ("text", "style", "text+style")


def style_cond(cond: Cond, mode: str) -> Cond:
    """Select what conditions generation: "text" (image embedding dropped), "style" (text
    embeddings dropped, the reference image's embedding kept) or "text+style" (both)."""
    if mode not in STYLE_MODES:
        raise ValueError(f"style mode must be one of {STYLE_MODES}, got {mode!r}")
    if mode == "text":
        return cond.drop("clip_image", False)
    if mode == "style":
        if not bool(cond.clip_image_mask.any()):
            raise ValueError("style-only generation needs a style reference image (no image embedding given)")
        return cond.drop("t5", False).drop("clip_text", False)
    return cond
