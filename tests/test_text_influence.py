"""The text-influence curve against closed forms, and boundaries placed from it (plan.auto's rule)."""

import math

import pytest
import torch

from conftest import random_cond
from ediffi.edm import NoiseDistribution, loss_weight
from ediffi.presets import get_preset
from ediffi.text_influence import boundaries_from_influence, influence_curve, log_sigmas


def test_constant_influence_gives_the_training_distributions_quantiles():
    noise = NoiseDistribution()
    sigmas = log_sigmas(400, noise, tails=1e-5)
    got = boundaries_from_influence(sigmas, [1.0] * len(sigmas), 4, noise)
    want = [noise.quantile(q) for q in (0.25, 0.5, 0.75)]
    assert got == pytest.approx(want, rel=2e-3)


def test_experts_crowd_where_the_text_matters():
    noise = NoiseDistribution()
    sigmas = log_sigmas(200, noise)
    high = [1.0 if s > 1.0 else 0.0 for s in sigmas]  # text matters only above sigma 1
    b = boundaries_from_influence(sigmas, high, 3, noise)
    assert 1.0 <= b[0] < b[1]  # every boundary in the text-dependent range
    with pytest.raises(ValueError, match="text changes the prediction at no measured noise level"):
        boundaries_from_influence(sigmas, [0.0] * len(sigmas), 2, noise)


def test_influence_and_loss_match_their_closed_forms():
    spec = get_preset("tiny").cond
    cond = random_cond(spec, 4, seed=1)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1

    def D(x, sigma, c):  # text present: predicts sigma everywhere; no text: predicts 0
        text = (c.t5_mask.any(1) | c.clip_mask.any(1)).float()
        return (text * sigma)[:, None, None, None].expand_as(x)

    curve = influence_curve(D, [(x0, cond)], [0.1, 1.0, 10.0])
    assert curve["influence"] == pytest.approx([0.01, 1.0, 100.0], rel=1e-5)
    for s, loss in zip(curve["sigma"], curve["loss"], strict=True):
        want = (loss_weight(torch.tensor(s)) * (s - x0).square().flatten(1).mean(1)).mean().item()
        assert math.isclose(loss, want, rel_tol=1e-5)
