"""Samplers on a closed-form case: Gaussian data N(0, s^2 I) with its exact ideal denoiser."""

import math

import pytest
import torch

from ediffi.conditioning import empty_cond
from ediffi.pipeline import SamplerConfig, sample, seed_generators
from ediffi.presets import TINY_COND
from ediffi.samplers import (
    karras_sigmas,
    network_evaluations,
    randn,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)

S = 0.5  # data std


def ideal(x, sigma, cond):
    """Exact denoiser of N(0, S^2 I): E[x0 | x] = x S^2 / (S^2 + sigma^2)."""
    return x * S**2 / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


COND = empty_cond(TINY_COND, 1)


def _noise(seed=0):
    return torch.randn(4096, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_karras_schedule_matches_formula():
    n, smin, smax, rho = 10, 0.002, 80.0, 7.0
    sig = karras_sigmas(n, smin, smax, rho).double()
    assert len(sig) == n + 1 and sig[-1] == 0
    ref = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    torch.testing.assert_close(sig[:-1], torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)
    assert sig[0] == pytest.approx(smax) and sig[-2] == pytest.approx(smin)


@pytest.mark.parametrize("steps", [40, 64])
def test_heun_reaches_data_std(steps):
    sig = karras_sigmas(steps)
    out = sample_heun(ideal, _noise() * sig[0], sig, COND)
    assert out.std().item() == pytest.approx(S, rel=0.01)


def test_heun_is_second_order():
    # Deterministic map for one scalar: the exact flow scales x by sqrt((S^2+0)/(S^2+smax^2)).
    exact = S / math.sqrt(S**2 + 80.0**2)
    err = {}
    for n in (16, 32):
        sig = karras_sigmas(n)
        out = sample_heun(ideal, torch.full((1, 1, 1, 1), 80.0), sig, COND).item()
        err[n] = abs(out / (80.0 * exact) - 1)
    assert 3.0 < err[16] / err[32] < 5.0  # halving the step size cuts the error ~4x


def test_euler_and_multistep_converge_with_more_steps():
    errs = {}
    for name, fn, steps in [
        ("euler", sample_euler, 64),
        ("euler", sample_euler, 1024),
        ("dpmpp_2m", sample_dpmpp_2m, 16),
        ("dpmpp_2m", sample_dpmpp_2m, 64),
    ]:
        sig = karras_sigmas(steps)
        errs[(name, steps)] = abs(fn(ideal, _noise() * sig[0], sig, COND).std().item() / S - 1)
    assert errs[("euler", 1024)] < 0.01 and errs[("euler", 1024)] < errs[("euler", 64)]
    assert errs[("dpmpp_2m", 64)] < 0.01 and errs[("dpmpp_2m", 64)] < errs[("dpmpp_2m", 16)]


def test_stochastic_heun_reaches_data_std_and_is_seeded():
    sig = karras_sigmas(128)
    kw = dict(S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.0)
    out = sample_heun(ideal, _noise() * sig[0], sig, COND, generator=torch.Generator().manual_seed(3), **kw)
    assert out.std().item() == pytest.approx(S, rel=0.015)
    again = sample_heun(ideal, _noise() * sig[0], sig, COND, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, again)
    other = sample_heun(ideal, _noise() * sig[0], sig, COND, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(out, other)


def test_per_sample_generators_make_results_batch_independent():
    seeds = [11, 12, 13, 14]
    cond4 = empty_cond(TINY_COND, 4)
    cfg = SamplerConfig(sampler="heun", steps=8, S_churn=10)
    batched = sample(ideal, cond4, (1, 4, 4), seeds, cfg)
    single = torch.cat([sample(ideal, cond4[i : i + 1], (1, 4, 4), [s], cfg) for i, s in enumerate(seeds)])
    torch.testing.assert_close(batched, single, rtol=0, atol=0)
    torch.testing.assert_close(randn((2, 3), seed_generators([5, 6]))[1], randn((1, 3), seed_generators([6]))[0])


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_network_evaluation_counts(sampler):
    calls = []
    D = lambda x, s, c: calls.append(1) or ideal(x, s, c)
    sample(D, COND, (1, 2, 2), [0], SamplerConfig(sampler=sampler, steps=10))
    assert len(calls) == network_evaluations(sampler, 10)


def test_bad_sigma_arrays_and_configs_are_errors():
    with pytest.raises(ValueError, match="end with 0"):
        sample_euler(ideal, _noise(), torch.tensor([80.0, 1.0]), COND)
    with pytest.raises(ValueError, match="sampler"):
        SamplerConfig(sampler="ddim")
    with pytest.raises(ValueError, match="steps"):
        karras_sigmas(0)
