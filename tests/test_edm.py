"""EDM preconditioning, loss weight, loss, and the (truncated) training noise distribution."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ediffi.conditioning import empty_cond
from ediffi.edm import (
    P_MEAN,
    P_STD,
    SIGMA_DATA,
    EDMPrecond,
    NoiseDistribution,
    c_in,
    c_noise,
    c_out,
    c_skip,
    edm_loss,
    loss_weight,
)
from ediffi.ensemble import (
    EDIFFI_BASE_QUANTILES,
    boundaries_from_quantiles,
    intervals_from_boundaries,
)
from ediffi.presets import TINY_COND

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)


def test_coefficients_match_design_formulas():
    s, sd = SIGMAS.numpy(), 0.5
    np.testing.assert_allclose(c_skip(SIGMAS).numpy(), sd**2 / (s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_out(SIGMAS).numpy(), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_in(SIGMAS).numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_noise(SIGMAS).numpy(), np.log(s) / 4, rtol=1e-12)
    np.testing.assert_allclose(loss_weight(SIGMAS).numpy(), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-12)


def test_preconditioning_identities():
    s, sd = SIGMAS, SIGMA_DATA
    # Network input has unit variance: c_in^2 (sd^2 + sigma^2) = 1.
    torch.testing.assert_close(c_in(s) ** 2 * (sd**2 + s**2), torch.ones_like(s))
    # Effective training target has unit variance: ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1.
    target_var = ((1 - c_skip(s)) ** 2 * sd**2 + c_skip(s) ** 2 * s**2) / c_out(s) ** 2
    torch.testing.assert_close(target_var, torch.ones_like(s))
    # The loss weight makes the effective weight uniform: lambda * c_out^2 = 1.
    torch.testing.assert_close(loss_weight(s) * c_out(s) ** 2, torch.ones_like(s))


class _Probe(torch.nn.Module):
    """F(x_in, c_noise) = x_in + c_noise, recording its inputs."""

    def forward(self, x, noise, cond):
        self.seen = (x.clone(), noise.clone())
        return x + noise.reshape(-1, 1, 1, 1)


def test_precond_wrapper_applies_all_four_coefficients():
    D = EDMPrecond(_Probe())
    x = torch.randn(3, 3, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = D(x, sigma, empty_cond(TINY_COND, 3))
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(D.net.seen[0], c_in(s) * x)
    torch.testing.assert_close(D.net.seen[1], c_noise(sigma))
    torch.testing.assert_close(out, c_skip(s) * x + c_out(s) * (c_in(s) * x + c_noise(s)))


def test_full_distribution_is_the_edm_log_normal():
    sig = NoiseDistribution().sample(20000, torch.Generator().manual_seed(0)).double()
    res = stats.kstest(sig.log().numpy(), stats.norm(P_MEAN, P_STD).cdf)
    assert res.pvalue > 0.01


@pytest.mark.parametrize("interval", intervals_from_boundaries(boundaries_from_quantiles(EDIFFI_BASE_QUANTILES)))
def test_truncated_sampler_matches_restricted_distribution(interval):
    noise = NoiseDistribution().restrict(interval.lo, interval.hi)
    sig = noise.sample(20000, torch.Generator().manual_seed(1)).double()
    assert bool(((sig >= interval.lo) & (sig < interval.hi)).all())
    a = -np.inf if interval.lo == 0 else (math.log(interval.lo) - P_MEAN) / P_STD
    b = np.inf if math.isinf(interval.hi) else (math.log(interval.hi) - P_MEAN) / P_STD
    ref = stats.truncnorm(a, b, loc=P_MEAN, scale=P_STD)
    assert stats.kstest(sig.log().numpy(), ref.cdf).pvalue > 0.01
    # The same KS test rejects the unrestricted distribution: the test can tell them apart.
    assert stats.kstest(sig.log().numpy(), stats.norm(P_MEAN, P_STD).cdf).pvalue < 1e-6


def test_quantile_and_cdf_are_inverse():
    n = NoiseDistribution()
    for q in (1 / 512, 1 / 8, 0.5, 511 / 512):
        assert n.cdf(n.quantile(q)) == pytest.approx(q, rel=1e-9)
    assert n.quantile(0.5) == pytest.approx(math.exp(P_MEAN))


def test_bad_intervals_are_errors():
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        NoiseDistribution(sigma_lo=2.0, sigma_hi=1.0)
    with pytest.raises(ValueError, match="no probability mass"):
        NoiseDistribution(sigma_lo=1e30, sigma_hi=1e31).sample(4)


def test_loss_is_per_sample_weighted_error():
    x0 = torch.randn(5, 3, 8, 8)
    zero = lambda x, sigma, cond: torch.zeros_like(x)
    loss, sigma = edm_loss(zero, x0, empty_cond(TINY_COND, 5), NoiseDistribution(), torch.Generator().manual_seed(0))
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, loss_weight(sigma) * x0.square().flatten(1).mean(1))
    perfect = lambda x, sigma, cond: x0
    loss, _ = edm_loss(perfect, x0, empty_cond(TINY_COND, 5), NoiseDistribution())
    assert torch.all(loss == 0)
