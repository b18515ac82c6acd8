"""Super-resolution: degrade + noise-conditioning augmentation in training, fixed level in the cascade."""

from dataclasses import replace

import pytest
import torch

from conftest import random_cond, randomize
from ediffi.conditioning import DropoutConfig
from ediffi.pipeline import SamplerConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi.sr import SRConfig, Stage, augment, cascade, degrade
from ediffi.training import train_step


class Spy:
    """A denoiser that records what conditions it."""

    def __init__(self, D):
        self.D, self.seen = D, []

    def __call__(self, x, sigma, cond):
        self.seen.append((cond.lowres.clone() if cond.lowres is not None else None, cond.aug_sigma))
        return self.D(x, sigma, cond)

    def parameters(self):
        return self.D.parameters()


def test_degrade_and_augment():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lo = degrade(x, 16)
    assert lo.shape == (2, 3, 16, 16)
    torch.testing.assert_close(lo.mean(), x.mean(), atol=1e-2, rtol=0)
    cond = random_cond(get_preset("tiny_sr").cond, 2)
    c = augment(cond, torch.zeros(2, 3, 64, 64), torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(0))
    assert c.lowres[0].abs().max() == 0 and abs(c.lowres[1].std().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="larger"):
        degrade(x, 64)


def test_sr_training_draws_augmentation_levels_and_learns_to_use_them():
    cfg = get_preset("tiny_sr")
    torch.manual_seed(0)
    D = Spy(build_denoiser(cfg))
    opt = torch.optim.AdamW(D.parameters(), lr=1e-3)
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    sr = SRConfig(lowres=16, aug_sigma_max=0.4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_step(
            D, opt, [(x0, random_cond(cfg.cond, 8))], dropout=DropoutConfig(0, 0, 0, joint=0), generator=g, sr=sr
        )
    levels = torch.cat([a for _, a in D.seen])
    assert levels.min() >= 0 and levels.max() <= 0.4 and levels.std() > 0.05  # drawn per sample
    lowres = D.seen[0][0]
    assert lowres.shape == (8, 3, 16, 16)
    noise = lowres - degrade(x0, 16)
    per_sample = noise.flatten(1).std(dim=1)
    torch.testing.assert_close(per_sample, D.seen[0][1], atol=0.05, rtol=0.1)  # noised at its own level
    grads = [p.grad for p in D.D.net.aug_mlp.parameters()]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    with pytest.raises(ValueError, match=r"needs cond\.lowres"):
        train_step(D, opt, [(x0, random_cond(cfg.cond, 8))])  # an SR network without its input


def test_cascade_sizes_and_fixed_augmentation_level():
    base = randomize(build_denoiser(get_preset("tiny")), seed=1).eval()
    sr = Spy(randomize(build_denoiser(get_preset("tiny_sr")), seed=2).eval())
    cond = random_cond(get_preset("tiny").cond, 3)
    stages = [Stage(base, 16, SamplerConfig(steps=3, guidance=2.0)), Stage(sr, 32, SamplerConfig(steps=3), 0.25)]
    with torch.no_grad():
        outs = cascade(stages, cond, [0, 1, 2])
    assert [tuple(o.shape) for o in outs] == [(3, 3, 16, 16), (3, 3, 32, 32)]
    assert all(torch.equal(a, torch.full((3,), 0.25)) for _, a in sr.seen)  # the fixed level, every call
    noise = sr.seen[0][0] - outs[0].clamp(-1, 1)
    assert abs(noise.std().item() - 0.25) < 0.03  # the base output, noised at that level
    with torch.no_grad():
        again = cascade(stages, cond, [0, 1, 2])
    assert torch.equal(again[-1], outs[-1])  # deterministic by seed
    with pytest.raises(ValueError, match="needs aug_sigma"):
        cascade([stages[0], replace(stages[1], aug_sigma=None)], cond, [0, 1, 2])
