"""Classifier-free guidance: formula, one batched network call, which embeddings are dropped."""

import pytest
import torch

from conftest import Counting, random_cond
from ediffi.guidance import Guided

SIGMA = torch.tensor([0.3, 2.0])


def _x(cfg, b=2):
    return torch.randn(b, 3, cfg.img_resolution, cfg.img_resolution, generator=torch.Generator().manual_seed(0))


def test_scale_one_equals_plain_conditional(tiny_D, tiny_cfg):
    cond, x = random_cond(tiny_cfg.cond, 2), _x(tiny_cfg)
    torch.testing.assert_close(Guided(tiny_D, 1.0)(x, SIGMA, cond), tiny_D(x, SIGMA, cond), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_formula_with_one_network_call(tiny_D, tiny_cfg, scale):
    cond, x = random_cond(tiny_cfg.cond, 2), _x(tiny_cfg)
    counted = Counting(tiny_D)
    out = Guided(counted, scale)(x, SIGMA, cond)
    assert len(counted.calls) == 1 and len(counted.calls[0]) == 4  # cond and uncond in one batch
    c, u = tiny_D(x, SIGMA, cond), tiny_D(x, SIGMA, cond.null())
    torch.testing.assert_close(out, u + scale * (c - u), rtol=1e-4, atol=1e-5)
    if scale == 0.0:
        torch.testing.assert_close(out, u, rtol=1e-4, atol=1e-5)


def test_modes_choose_the_guided_embeddings(tiny_cfg):
    cond = random_cond(tiny_cfg.cond, 2)
    text = Guided(lambda *a: None, 2.0, "text").uncond(cond)
    assert not text.t5_mask.any() and not text.clip_mask.any() and not text.clip_pooled.any()
    assert text.clip_image_mask.all() and torch.equal(text.clip_image, cond.clip_image)
    image = Guided(lambda *a: None, 2.0, "image").uncond(cond)
    assert not image.clip_image_mask.any() and torch.equal(image.t5, cond.t5)
    every = Guided(lambda *a: None, 2.0, "all").uncond(cond)
    assert not (every.t5_mask.any() or every.clip_mask.any() or every.clip_image_mask.any())
    with pytest.raises(ValueError, match="guidance mode"):
        Guided(lambda *a: None, 2.0, "style")
