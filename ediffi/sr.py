"""Super-resolution stages: degrade, noise-conditioning augmentation, and the cascade sampler.

An SR network is conditioned on the low-resolution image (upsampled inside the U-Net) and on the
augmentation level `aug_sigma`: Gaussian noise of that standard deviation is added to the
low-resolution image. In training the level is drawn uniformly from [0, aug_sigma_max] per
sample, so the stage learns to tolerate the base model's artefacts; at sampling it is fixed
(`aug_sigma`), and the cascade runs text -> base -> SR -> SR, encoding the prompt once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser
from ediffi.samplers import randn


@dataclass(frozen=True)
class SRConfig:
    """How an SR stage sees its low-resolution input."""

    lowres: int  # the low resolution it upsamples from (training degrades to this size)
    aug_sigma_max: float = 0.5  # training: augmentation level ~ U[0, aug_sigma_max]
    aug_sigma: float = 0.1  # sampling: the fixed augmentation level

    def __post_init__(self) -> None:
        if self.lowres < 1:
            raise ValueError(f"SRConfig.lowres must be >= 1, got {self.lowres}")
        if self.aug_sigma_max < 0 or self.aug_sigma < 0:
            raise ValueError(f"augmentation levels must be >= 0, got {self.aug_sigma_max}, {self.aug_sigma}")


def degrade(x0: torch.Tensor, lowres: int) -> torch.Tensor:
    """High-resolution images [B, C, H, W] -> their low-resolution version (antialiased)."""
    if x0.shape[-1] < lowres:
        raise ValueError(f"cannot degrade {x0.shape[-1]}px images to a larger {lowres}px")
    return F.interpolate(x0.float(), size=(lowres, lowres), mode="bilinear", antialias=True, align_corners=False)


def augment(
    cond: Cond,
    lowres: torch.Tensor,
    aug_sigma: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Cond:
    """cond with the low-resolution image noised at per-sample levels aug_sigma [B] attached."""
    noise = randn(tuple(lowres.shape), generator, lowres.device)
    noisy = lowres + aug_sigma.to(lowres.device).view(-1, 1, 1, 1) * noise
    return replace(cond, lowres=noisy, aug_sigma=aug_sigma.to(lowres.device).float())


def training_condition(cond: Cond, x0: torch.Tensor, cfg: SRConfig, generator: torch.Generator | None = None) -> Cond:
    """Training input of an SR stage: x0 degraded to cfg.lowres, noised at a level drawn per sample."""
    u = torch.rand(len(x0), generator=generator, device=generator.device if generator else "cpu")
    return augment(cond, degrade(x0, cfg.lowres), (u * cfg.aug_sigma_max).to(x0.device), generator)


@dataclass
class Stage:
    """One stage of a cascade: a denoiser, its output resolution and how to sample it."""

    denoiser: Denoiser
    resolution: int
    sampler: object  # ediffi.pipeline.SamplerConfig
    aug_sigma: float | None = None  # SR stages: the fixed augmentation level (None for the base)


def cascade(
    stages: Sequence[Stage],
    cond: Cond,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    channels: int = 3,
) -> list[torch.Tensor]:
    """Run base -> SR -> ... for one encoded batch; returns each stage's images in [-1, 1]."""
    from ediffi.pipeline import sample, seed_generators

    if not stages or stages[0].aug_sigma is not None:
        raise ValueError("a cascade starts with a base stage (aug_sigma None)")
    outs: list[torch.Tensor] = []
    x = None
    for k, st in enumerate(stages):
        c = cond
        if k > 0:
            if st.aug_sigma is None:
                raise ValueError(f"cascade stage {k} is a super-resolution stage and needs aug_sigma")
            gens = seed_generators([s + 104729 * k for s in seeds], device)  # per-sample, per-stage noise
            lowres = x.clamp(-1, 1)
            c = augment(cond, lowres, torch.full((len(seeds),), float(st.aug_sigma)), gens)
        stage_seeds = [s + 7919 * k for s in seeds]
        x = sample(st.denoiser, c, (channels, st.resolution, st.resolution), stage_seeds, st.sampler, device)
        outs.append(x)
    return outs
