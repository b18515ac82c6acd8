"""Paint-with-words: phrase -> token alignment on both tokenizers, masks, and the attention bias."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import absent_filled, randomize
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import ExpertEnsemble, intervals_from_boundaries
from ediffi.guidance import Guided
from ediffi.paint import Layout, PaintWithWords, paint_masks, phrase_tokens, rasterize
from ediffi.presets import build_denoiser, get_preset


@pytest.fixture(scope="module")
def enc():
    return ConditioningEncoder(EncoderConfig())


def _split(enc, positions):
    """Context positions -> (T5 token texts, CLIP token texts)."""
    L = Layout.for_spec(enc.spec)
    t5 = [p - L.t5_start for p in positions if p < L.clip_start]
    clip = [p - L.clip_start for p in positions if p >= L.clip_start]
    return t5, clip


def _texts(enc, prompt, positions):
    t5, clip = _split(enc, positions)
    t5_ids = enc.t5_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    clip_ids = [None, *enc.clip_tokenizer.encode(prompt)]  # position 0 is the start token
    t5_text = enc.t5_tokenizer.decode([t5_ids[i] for i in t5])
    clip_text = "".join(enc.clip_tokenizer.decoder[clip_ids[i]] for i in clip).replace("</w>", " ").strip()
    return t5_text, clip_text


def test_phrase_alignment_multi_token_and_repeated_words(enc):
    prompt = "a red rhinoceros beside a red square, hippopotamus-like"
    assert _texts(enc, prompt, phrase_tokens(enc, prompt, "rhinoceros")) == ("rhinoceros", "rhinoceros")
    t5, clip = _split(enc, phrase_tokens(enc, prompt, "rhinoceros"))
    assert len(t5) == 10 and len(clip) >= 1  # ByT5: one token per byte
    # a repeated word belongs to the phrase it is in: only the second "red" for "red square"
    assert _texts(enc, prompt, phrase_tokens(enc, prompt, "red square")) == ("red square", "red square")
    both = _split(enc, phrase_tokens(enc, prompt, "red"))
    assert len(both[0]) == 6 and len(both[1]) == 2  # "red" twice on both tokenizers
    # edge punctuation stays out; case is ignored; a hyphenated word splits into several CLIP tokens
    assert _texts(enc, prompt, phrase_tokens(enc, prompt, "SQUARE"))[1] == "square"
    hip = _split(enc, phrase_tokens(enc, prompt, "hippopotamus-like"))[1]
    assert len(hip) >= 3 and hip == list(range(hip[0], hip[0] + len(hip)))


def test_alignment_errors(enc):
    with pytest.raises(ValueError, match=r"phrase 'blue' not found in prompt"):
        phrase_tokens(enc, "a red circle", "blue")
    with pytest.raises(ValueError, match="not found"):
        phrase_tokens(enc, "a red circle", "red circles")  # whole words only
    long = " ".join(["filler"] * 100) + " zebra"
    with pytest.raises(ValueError, match="beyond the encoders' context"):
        phrase_tokens(enc, long, "zebra")


def test_masks(tmp_path):
    r = rasterize({"rect": [0.0, 0.0, 0.5, 0.5]}, 8)
    assert r.sum() == 16 and r[:4, :4].all()
    tri = rasterize({"polygon": [[0, 0], [1, 0], [0, 1]]}, 16)
    assert 100 <= tri.sum() <= 156 and tri[0, 0] == 1 and tri[15, 15] == 0
    img = np.zeros((32, 32), np.uint8)
    img[16:, 16:] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    assert torch.equal(
        rasterize(str(tmp_path / "m.png"), 4), torch.tensor([[0, 0, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2).float()
    )
    for bad, msg in (
        ({"rect": [0.5, 0, 0.2, 1]}, "x0 < x1"),
        ({"polygon": [[0, 0], [2, 0], [0, 1]]}, "inside"),
        ({"circle": [0.5]}, "a mask is"),
        ({"rect": "abc"}, "malformed"),
        (str(tmp_path / "missing.png"), "cannot read mask image"),
    ):
        with pytest.raises(ValueError, match=msg):
            rasterize(bad, 8)


def _setup(enc, strength, record=None):
    cfg = get_preset("tiny")
    D = randomize(build_denoiser(cfg), seed=3, std=0.2).eval()
    prompts = ["a red circle in the top left", "a blue square"]
    masks = paint_masks(
        enc, prompts, [{"red circle": {"rect": [0, 0, 0.5, 0.5]}}, {"square": {"rect": [0.5, 0.5, 1, 1]}}], 16
    )
    cond, _ = enc.encode(prompts)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return D, PaintWithWords(D, masks, strength, record), x, cond


def test_zero_strength_is_the_plain_denoiser(enc):
    D, P, x, cond = _setup(enc, 0.0)
    sigma = torch.tensor([2.0, 0.5])
    with torch.no_grad():
        assert torch.equal(P(x, sigma, cond), D(x, sigma, cond))  # bit for bit
        _, explicit, _, _ = _setup(enc, 0.0, record=[])  # the explicit biased path, w = 0
        torch.testing.assert_close(explicit(x, sigma, cond), D(x, sigma, cond), atol=1e-5, rtol=1e-5)


def test_painting_moves_attention_into_the_mask_and_spares_the_unconditional_half(enc):
    sigma = torch.tensor([2.0, 2.0])
    fractions = {}
    for w in (0.0, 0.5, 2.0):
        rec = []
        _, P, x, cond = _setup(enc, w, record=rec)
        with torch.no_grad():
            P(x, sigma, cond)
        fractions[w] = sum(rec) / len(rec)
    assert fractions[0.0] < fractions[0.5] < fractions[2.0], fractions
    assert abs(fractions[0.0] - 0.25) < 0.05  # unbiased: about the masks' share of the image
    assert fractions[2.0] > fractions[0.0] + 0.1

    D, P, x, cond = _setup(enc, 2.0)
    G = Guided(D, 3.0)
    uncond = G.uncond(cond)
    with torch.no_grad():  # rows without text (guidance's unconditional half) are not biased
        assert torch.equal(P(x, sigma, uncond), D(x, sigma, uncond))
        assert not torch.allclose(P(x, sigma, cond), D(x, sigma, cond))
        out = Guided(P, 3.0)(x, sigma, cond)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_painted_attention_ignores_masked_out_values(enc):
    _, P, x, cond = _setup(enc, 2.0)
    cond = cond.drop("clip_text", torch.tensor([True, False]))  # row 1: T5 only (and no image in either)
    junk = absent_filled(cond)
    sigma = torch.tensor([2.0, 0.5])
    with torch.no_grad():
        for W in (P, Guided(P, 3.0)):
            gap = (W(x, sigma, junk) - W(x, sigma, cond)).abs().amax(dim=(1, 2, 3)).tolist()
            assert gap == [0.0, 0.0], gap


def test_paint_through_an_ensemble_equals_each_sample_alone_through_its_expert(enc):
    cfg = get_preset("tiny")
    experts = [randomize(build_denoiser(cfg), seed=s, std=0.2).eval() for s in (3, 4)]
    ens = ExpertEnsemble(experts, intervals_from_boundaries([1.0]))
    prompts = ["a red circle in the top left", "a blue square", "a green circle", "a red square"]
    masks = paint_masks(
        enc,
        prompts,
        [
            {"red circle": {"rect": [0, 0, 0.5, 0.5]}},
            {"square": {"rect": [0.5, 0.5, 1, 1]}},
            {"circle": {"rect": [0, 0.5, 1, 1]}},
            {"red": {"rect": [0.25, 0.25, 0.75, 0.75]}},
        ],
        16,
    )
    cond, _ = enc.encode(prompts)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0, 0.5, 0.8, 5.0])  # experts 1, 0, 0, 1: one batch spans both
    with torch.no_grad():
        painted = PaintWithWords(ens, masks, 2.0)(x, sigma, cond)
        guided = Guided(PaintWithWords(ens, masks, 2.0), 3.0)(x, sigma, cond)  # as sampling composes them
        assert (painted - ens(x, sigma, cond)).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # the bias acts
        for i in range(4):
            alone = PaintWithWords(experts[ens.expert_index(sigma[i].item())], masks[i : i + 1], 2.0)
            one = (x[i : i + 1], sigma[i : i + 1], cond[i : i + 1])
            torch.testing.assert_close(painted[i : i + 1], alone(*one), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(guided[i : i + 1], Guided(alone, 3.0)(*one), rtol=1e-5, atol=1e-5)
