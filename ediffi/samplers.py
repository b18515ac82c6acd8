"""Stateless samplers over any denoiser D(x, sigma, cond) and an explicit sigma array.

`sigmas` runs from sigma_max down to a final 0; `x` is the initial noise already scaled by
sigmas[0]. Randomness (stochastic Heun only) comes from `generator`: one torch.Generator, or one
per sample so a sample's result does not depend on the batch it runs in.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser

Generators = torch.Generator | Sequence[torch.Generator] | None


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device="cpu"
) -> torch.Tensor:
    """EDM eq. 5: n noise levels from sigma_max to sigma_min spaced in sigma^(1/rho), then 0."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=torch.float32)


def randn(shape: Sequence[int], generator: Generators, device="cpu") -> torch.Tensor:
    """Standard normal noise; with a list of generators, sample i is drawn from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = "cpu" if generator is None else generator.device
        return torch.randn(tuple(shape), generator=generator, device=dev).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]).to(device)


def _denoise(D: Denoiser, x: torch.Tensor, sigma: float, cond: Cond) -> torch.Tensor:
    return D(x, torch.full((x.shape[0],), sigma, device=x.device), cond)


def _levels(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Noise levels as Python floats, so control flow never waits on the device."""
    levels = [float(s) for s in sigmas]
    if len(levels) < 2 or levels[-1] != 0 or any(a <= b for a, b in itertools.pairwise(levels)):
        raise ValueError("sigmas must be strictly decreasing and end with 0")
    return levels


@torch.no_grad()
def sample_euler(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
    """First-order Euler steps of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma."""
    levels = _levels(sigmas)
    for s, s_next in itertools.pairwise(levels):
        d = (x - _denoise(D, x, s, cond)) / s
        x = x + (s_next - s) * d
    return x


@torch.no_grad()
def sample_heun(
    D: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: Generators = None,
) -> torch.Tensor:
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0): Heun steps with optional noise churn."""
    levels = _levels(sigmas)
    n = len(levels) - 1
    for s, s_next in itertools.pairwise(levels):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = randn(x.shape, generator, x.device) * S_noise
            x = x + math.sqrt(s_hat**2 - s**2) * eps
        d = (x - _denoise(D, x, s_hat, cond)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x_next - _denoise(D, x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in log-sigma time, one network call per step."""
    levels = _levels(sigmas)
    x0_prev, h_prev = None, None
    for s, s_next in itertools.pairwise(levels):
        x0 = _denoise(D, x, s, cond)
        if s_next == 0:
            x = x0
            break
        h = math.log(s) - math.log(s_next)  # t = -ln(sigma)
        if x0_prev is None:
            x0_d = x0
        else:
            r = h_prev / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s_next / s) * x - math.expm1(-h) * x0_d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def network_evaluations(sampler: str, n_steps: int) -> int:
    """Network evaluations a sampler makes over a Karras schedule of n_steps (trailing 0 included)."""
    if sampler not in SAMPLERS:
        raise KeyError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
    return 2 * n_steps - 1 if sampler == "heun" else n_steps
