"""EDM formulation (Karras et al. 2022): preconditioning, training noise distribution, loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ediffi.conditioning import Cond

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


@dataclass(frozen=True)
class NoiseDistribution:
    """Training noise: ln(sigma) ~ N(P_mean, P_std^2), optionally restricted to [sigma_lo, sigma_hi)."""

    P_mean: float = P_MEAN  # mean of ln(sigma)
    P_std: float = P_STD  # std of ln(sigma)
    sigma_lo: float = 0.0  # lower end of the interval (inclusive); 0 = no bound
    sigma_hi: float = math.inf  # upper end of the interval (exclusive); inf = no bound

    def __post_init__(self) -> None:
        if not self.P_std > 0:
            raise ValueError(f"NoiseDistribution.P_std must be > 0, got {self.P_std}")
        if not (0.0 <= self.sigma_lo < self.sigma_hi):
            raise ValueError(
                f"NoiseDistribution interval must satisfy 0 <= sigma_lo < sigma_hi, "
                f"got [{self.sigma_lo}, {self.sigma_hi})"
            )

    def cdf(self, sigma: float) -> float:
        """Unrestricted log-normal CDF at sigma."""
        if sigma <= 0:
            return 0.0
        if math.isinf(sigma):
            return 1.0
        return 0.5 * math.erfc(-(math.log(sigma) - self.P_mean) / (self.P_std * math.sqrt(2)))

    def quantile(self, q: float) -> float:
        """Unrestricted log-normal inverse CDF: the sigma below which a fraction q of mass lies."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if q == 0.0:
            return 0.0
        if q == 1.0:
            return math.inf
        z = torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()
        return math.exp(self.P_mean + self.P_std * z)

    def restrict(self, sigma_lo: float, sigma_hi: float) -> NoiseDistribution:
        """The same distribution restricted to [sigma_lo, sigma_hi)."""
        return NoiseDistribution(self.P_mean, self.P_std, sigma_lo, sigma_hi)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Draw n sigmas by inverse-CDF sampling of the (truncated) log-normal; no rejection."""
        u_lo, u_hi = self.cdf(self.sigma_lo), self.cdf(self.sigma_hi)
        if not u_hi > u_lo:
            raise ValueError(
                f"interval [{self.sigma_lo}, {self.sigma_hi}) holds no probability mass "
                f"(double precision) under ln(sigma) ~ N({self.P_mean}, {self.P_std}^2)"
            )
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator_device(generator))
        u = u_lo + (u_hi - u_lo) * u
        # Keep u strictly inside (0, 1) so ndtri stays finite.
        u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1.0 - torch.finfo(torch.float64).eps)
        sigma = torch.exp(self.P_mean + self.P_std * torch.special.ndtri(u))
        # Guard the half-open interval against rounding at its ends.
        hi = torch.nextafter(torch.tensor(self.sigma_hi, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
        sigma = sigma.clamp(min=self.sigma_lo, max=hi.item() if math.isfinite(self.sigma_hi) else None)
        return sigma.to(device=device, dtype=torch.float32)


def generator_device(generator: torch.Generator | None) -> torch.device:
    """The device a generator draws on (CPU when there is none)."""
    return torch.device("cpu") if generator is None else generator.device


def c_skip(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM Table 1: c_skip = sd^2 / (sigma^2 + sd^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM Table 1: c_out = sigma * sd / sqrt(sigma^2 + sd^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM Table 1: c_in = 1 / sqrt(sigma^2 + sd^2)."""
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM Table 1: c_noise = ln(sigma) / 4."""
    return sigma.log() / 4


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM Table 1: lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """Wraps a raw network F into the denoiser D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """EDM eq. 7 with Table 1 coefficients; float32 in and out."""
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        x = x.to(torch.float32)
        F_x = self.net(c_in(sigma, self.sigma_data) * x, c_noise(sigma).flatten(), cond)
        return c_skip(sigma, self.sigma_data) * x + c_out(sigma, self.sigma_data) * F_x.to(torch.float32)


Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def edm_loss(
    D: Denoiser,
    x0: torch.Tensor,
    cond: Cond,
    noise: NoiseDistribution,
    generator: torch.Generator | None = None,
    sigma_data: float = SIGMA_DATA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM eq. 8: per-sample lambda(sigma) ||D(x0 + n, sigma) - x0||^2 (mean over pixels), and sigma."""
    sigma = noise.sample(x0.shape[0], generator=generator, device=x0.device)
    n = torch.randn(x0.shape, generator=generator, device=generator_device(generator)).to(x0.device)
    x0_hat = D(x0 + n * sigma.reshape(-1, 1, 1, 1), sigma, cond)
    per_sample = loss_weight(sigma, sigma_data) * (x0_hat - x0).square().flatten(1).mean(1)
    return per_sample, sigma
