"""Style conditioning: a reference image's CLIP embedding; text, style and text+style modes."""

import pytest
import torch

from conftest import randomize
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.guidance import Guided, StyleGuided, style_cond
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, get_preset


@pytest.fixture(scope="module")
def setup():
    enc = ConditioningEncoder(EncoderConfig())
    D = randomize(build_denoiser(get_preset("tiny")), seed=5, std=0.2).eval()
    ref = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    ref[:, 0] = 220  # a red reference
    cond, _ = enc.encode(["a circle", "a square"], ref)
    return enc, D, cond


def test_style_embedding_changes_output_and_modes_run(setup):
    _, D, cond = setup
    cfg = SamplerConfig(steps=4, guidance=2.0)
    with torch.no_grad():
        text = sample(D, style_cond(cond, "text"), (3, 16, 16), [0, 1], cfg)
        both = sample(D, style_cond(cond, "text+style"), (3, 16, 16), [0, 1], cfg)
        only = sample(D, style_cond(cond, "style"), (3, 16, 16), [0, 1], cfg)
        styled = sample(D, cond, (3, 16, 16), [0, 1], SamplerConfig(steps=4, guidance=2.0, style_guidance=4.0))
    assert not torch.allclose(text, both) and not torch.allclose(both, only) and not torch.allclose(both, styled)
    assert all(torch.isfinite(t).all() for t in (text, both, only, styled))
    assert not style_cond(cond, "style").t5_mask.any() and style_cond(cond, "style").clip_image_mask.all()
    with pytest.raises(ValueError, match="needs a style reference"):
        style_cond(style_cond(cond, "text"), "style")
    with pytest.raises(ValueError, match="style mode"):
        style_cond(cond, "painting")


def test_style_guidance_algebra(setup):
    _, D, cond = setup
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.5, 0.3])
    with torch.no_grad():
        # equal scales collapse to ordinary guidance toward all embeddings
        torch.testing.assert_close(
            StyleGuided(D, 3.0, 3.0)(x, s, cond), Guided(D, 3.0)(x, s, cond), atol=1e-5, rtol=1e-4
        )
        # style scale 0 ignores the reference: text-only guidance of the text-only condition
        text = style_cond(cond, "text")
        torch.testing.assert_close(
            StyleGuided(D, 3.0, 0.0)(x, s, cond), Guided(D, 3.0)(x, s, text), atol=1e-5, rtol=1e-4
        )
