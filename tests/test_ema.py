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


def test_power_ema_gamma_and_uniform_limit():
    # sigma_rel of the power EMA profile t^gamma (EDM2): check the closed form at the solved gamma.
    for s in (0.05, 0.1, 0.2):
        g = power_gamma(s)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=1e-9)
    # gamma = 0 (sigma_rel = sqrt(1/12)) would be a plain running mean; a small gamma is close to it.
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(lin, sigma_rel=0.27)
    vals = []
    for t in range(1, 101):
        with torch.no_grad():
            lin.weight.fill_(float(t))
        vals.append(float(t))
        ema.update(lin)
    assert ema.state_dict()["weight"].item() > sum(vals) / len(vals)  # weighted toward recent values
    with pytest.raises(ValueError, match="sigma_rel"):
        power_gamma(0.5)


def test_bf16_model_keeps_fp32_average():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(lin, decay=0.5)
    ema.update(lin)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
