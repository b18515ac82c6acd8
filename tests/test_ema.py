"""EMA: fp32, warm-up, power EMA's exponent, and the average it computes."""

import math

import pytest
import torch

from ediffi.ema import EMA, power_gamma


def test_constant_decay_matches_the_recurrence():
    lin = torch.nn.Linear(3, 1)
    ema = EMA(lin, decay=0.9)
    ref = lin.weight.detach().clone()
    for t in range(1, 30):
        with torch.no_grad():
            lin.weight.add_(1.0)
        ema.update(lin)
        beta = min(0.9, (1 + t) / (10 + t))
        ref = beta * ref + (1 - beta) * lin.weight.detach()
    torch.testing.assert_close(ema.state_dict()["weight"], ref)
    assert ema.state_dict()["weight"].dtype == torch.float32


def power_weights(T: int, gamma: float) -> torch.Tensor:
    """Exact weight of update t = 1..T in the power EMA after T updates (float64).

    beta_t = (1 - 1/t)^(gamma+1) gives w_t = (1 - beta_t) prod_{s>t} beta_s, and prod_{s=t+1..T} (1 - 1/s)
    telescopes to t/T, so w_t = (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1): the profile t^gamma.
    """
    t = torch.arange(1, T + 1, dtype=torch.float64)
    return (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / T ** (gamma + 1)


def test_power_ema_is_the_exact_power_weighted_average():
    # sigma_rel of the power EMA profile t^gamma (EDM2 eq. 3) at the solved gamma.
    for s in (0.05, 0.1, 0.2):
        g = power_gamma(s)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=1e-9)
    # After T updates the average is sum_t w_t x_t with the closed-form weights (the start is forgotten).
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    for sigma_rel in (0.05, 0.2):
        ema = EMA(lin, sigma_rel=sigma_rel)
        history = []
        for _ in range(60):
            with torch.no_grad():
                for p in lin.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))
            history.append(torch.cat([p.detach().double().flatten() for p in lin.parameters()]))
            ema.update(lin)
        want = power_weights(60, ema.gamma) @ torch.stack(history)
        got = torch.cat([ema.state_dict()[k].double().flatten() for k in ("weight", "bias")])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Those weights spread over t/T with the relative std asked for (EDM2's definition of sigma_rel).
    for sigma_rel in (0.05, 0.1, 0.2):
        w, u = power_weights(10_000, power_gamma(sigma_rel)), torch.arange(1, 10_001, dtype=torch.float64) / 10_000
        assert w.sum().item() == pytest.approx(1.0, rel=1e-12)
        var = (w * u**2).sum() - (w * u).sum() ** 2
        assert math.sqrt(var) == pytest.approx(sigma_rel, rel=1e-3)
    with pytest.raises(ValueError, match="sigma_rel"):
        power_gamma(0.5)


def test_bf16_model_keeps_fp32_average():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(lin, decay=0.5)
    ema.update(lin)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
