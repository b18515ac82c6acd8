"""Text-to-image sampling as numbered steps over any denoiser: seeds -> noise -> sampler -> images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser
from ediffi.guidance import Guided, StyleGuided
from ediffi.samplers import SAMPLERS, karras_sigmas, randn


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: solver, Karras schedule, stochasticity, guidance."""

    sampler: str = "heun"  # one of ediffi.samplers.SAMPLERS: euler, heun, dpmpp_2m
    steps: int = 32  # noise levels in the Karras schedule (plus the final 0)
    sigma_min: float = 0.002  # lowest nonzero noise level
    sigma_max: float = 80.0  # starting noise level
    rho: float = 7.0  # Karras schedule exponent
    S_churn: float = 0.0  # stochastic Heun: total noise churn (0 = deterministic Algorithm 1)
    S_tmin: float = 0.0  # stochastic Heun: churn only at sigma >= S_tmin
    S_tmax: float = math.inf  # stochastic Heun: churn only at sigma <= S_tmax
    S_noise: float = 1.0  # stochastic Heun: scale of the added noise
    guidance: float = 1.0  # classifier-free guidance scale (1 = none)
    guidance_mode: str = "all"  # embeddings guidance pushes toward: text, image, all
    style_guidance: float | None = None  # a separate scale for the style (image) embedding; None = one scale

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SamplerConfig.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be >= 1, got {self.steps}")
        if self.S_churn and self.sampler != "heun":
            raise ValueError("SamplerConfig.S_churn applies only to sampler='heun'")
        if self.guidance < 0:
            raise ValueError(f"SamplerConfig.guidance must be >= 0, got {self.guidance}")
        if self.style_guidance is not None and self.style_guidance < 0:
            raise ValueError(f"SamplerConfig.style_guidance must be >= 0, got {self.style_guidance}")


def seed_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, so a sample's noise does not depend on its batch."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample(
    D: Denoiser,
    cond: Cond,
    shape: tuple[int, int, int],
    seeds: Sequence[int],
    cfg: SamplerConfig = SamplerConfig(),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images [B, C, H, W] in about [-1, 1] for a batch of conditions and per-sample seeds."""
    if len(seeds) != len(cond):
        raise ValueError(f"got {len(seeds)} seeds for {len(cond)} conditions")
    # 1. Per-sample generators and initial noise at sigma_max.
    gens = seed_generators(seeds)
    sigmas = karras_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    x = randn((len(seeds), *shape), gens, device) * sigmas[0].item()
    # 2. Guidance wraps the denoiser with the same contract.
    if cfg.style_guidance is not None and bool(cond.clip_image_mask.any()):
        D = StyleGuided(D, cfg.guidance, cfg.style_guidance)
    elif cfg.guidance != 1.0:
        D = Guided(D, cfg.guidance, cfg.guidance_mode)
    # 3. Solve from sigma_max to 0.
    cond = cond.to(device)
    if cfg.sampler == "heun":
        return SAMPLERS["heun"](
            D,
            x,
            sigmas,
            cond,
            S_churn=cfg.S_churn,
            S_tmin=cfg.S_tmin,
            S_tmax=cfg.S_tmax,
            S_noise=cfg.S_noise,
            generator=gens,
        )
    return SAMPLERS[cfg.sampler](D, x, sigmas, cond)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [B, H, W, C] on the CPU."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def grid(images_uint8: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Tile uint8 images [B, H, W, C] into one [rows*H, cols*W, C] image."""
    B, H, W, C = images_uint8.shape
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    out = torch.zeros(rows * H, cols * W, C, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        out[r * H : (r + 1) * H, c * W : (c + 1) * W] = images_uint8[i]
    return out


def text_to_image(
    D: Denoiser,
    encoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    cfg: SamplerConfig = SamplerConfig(),
    device: torch.device | str = "cpu",
    channels: int = 3,
) -> torch.Tensor:
    """Prompts -> uint8 images [B, H, W, C]: encode once, sample, convert."""
    # 1. Encode the prompts (an ediffi.encoders.ConditioningEncoder).
    cond, _ = encoder.encode(list(prompts))
    # 2. Sample with per-sample seeds; 3. convert to uint8.
    return to_uint8(sample(D, cond, (channels, resolution, resolution), seeds, cfg, device))


def check_compatible(encoder_spec, network_spec) -> None:
    """Raise naming the first field where the encoders' outputs disagree with what the network expects."""
    diff = encoder_spec.first_difference(network_spec)
    if diff:
        name, got, want = diff
        raise ValueError(f"encoders produce {name}={got} but the network expects {name}={want}")
