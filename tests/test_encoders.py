"""Encoders: tiny offline T5/CLIP produce the schema, deterministically; truncation is counted."""

import pytest
import torch

from ediffi.encoders import ConditioningEncoder, EncoderConfig

PROMPTS = ["a small red circle in the top left corner on a white background", "a big blue square"]


@pytest.fixture(scope="module")
def enc():
    return ConditioningEncoder(EncoderConfig())


def test_tiny_encoders_follow_the_schema(enc):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    cond, stats = enc.encode(PROMPTS, images)
    cond.validate(enc.spec)
    assert stats.prompts == 2 and stats.t5_truncated == 0 and stats.clip_truncated == 0
    assert cond.clip_image_mask.all() and cond.clip_image.abs().sum() > 0
    # Masks cover the real tokens only; the longer prompt has more tokens.
    assert cond.t5_mask.sum(1)[0] == len(PROMPTS[0].encode()) + 1  # bytes + </s>
    assert cond.clip_mask.sum(1)[0] > cond.clip_mask.sum(1)[1] >= 3
    assert cond.t5[~cond.t5_mask].abs().sum() == 0
    no_image, _ = enc.encode(PROMPTS)
    assert not no_image.clip_image_mask.any() and torch.equal(no_image.t5, cond.t5)


def test_tiny_encoders_are_identical_across_builds(enc):
    again = ConditioningEncoder(EncoderConfig())
    a, _ = enc.encode(PROMPTS)
    b, _ = again.encode(PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
    other, _ = ConditioningEncoder(EncoderConfig(seed=1)).encode(PROMPTS)
    assert not torch.equal(other.t5, a.t5)


def test_over_long_prompts_are_truncated_and_counted(enc):
    long = "a red circle " * 40
    cond, stats = enc.encode([long, "short"])
    assert stats.t5_truncated == 1 and stats.clip_truncated == 1
    assert cond.t5_mask[0].all() and cond.clip_mask[0].all()


def test_t5_loads_from_a_local_path(tmp_path, enc):
    enc.t5.save_pretrained(tmp_path / "t5")
    enc.t5_tokenizer.save_pretrained(tmp_path / "t5")
    from_path = ConditioningEncoder(EncoderConfig(t5=str(tmp_path / "t5")))
    a, _ = enc.encode(PROMPTS)
    b, _ = from_path.encode(PROMPTS)
    torch.testing.assert_close(a.t5, b.t5)


def test_bad_encoder_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load the T5 tokenizer of '.*missing': no such folder"):
        ConditioningEncoder(EncoderConfig(t5=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="CLIP checkpoint file"):
        ConditioningEncoder(EncoderConfig(clip="ViT-B-32", clip_pretrained=str(tmp_path / "nope.bin")))
    with pytest.raises(ValueError, match=r"EncoderConfig\.dtype"):
        EncoderConfig(dtype="int8")
    with pytest.raises(TypeError, match="list of prompts"):
        ConditioningEncoder(EncoderConfig()).encode("one string")


def test_clip_loads_weights_from_a_local_safetensors_file(tmp_path, enc):
    from safetensors.torch import save_file

    other = ConditioningEncoder(EncoderConfig(seed=5))
    save_file(
        {k: v.contiguous() for k, v in other.clip.state_dict().items()},
        str(tmp_path / "clip.safetensors"),
    )
    loaded = ConditioningEncoder(EncoderConfig(clip="ediffi-tiny", clip_pretrained=str(tmp_path / "clip.safetensors")))
    a, _ = other.encode(PROMPTS)
    b, _ = loaded.encode(PROMPTS)
    c, _ = enc.encode(PROMPTS)
    torch.testing.assert_close(b.clip, a.clip)
    assert not torch.allclose(b.clip, c.clip)  # the file's weights, not the seed's


def test_a_hub_id_without_the_hub_fails_at_once_saying_to_pass_a_local_path(monkeypatch):
    """No network (the hub unreachable) and not in the local cache: an error that says what to do,
    from the cache lookup alone (no request to the hub, so none of its client's retries)."""
    import ediffi.encoders as encoders

    monkeypatch.setattr(encoders, "hub_reachable", lambda: False)
    want = r"'google/t5-v1_1-xxl': it is not a local folder, the Hugging Face hub cannot be reached.*pass the folder's path"
    with pytest.raises(ValueError, match="the config of T5 encoder " + want):
        encoders.encoder_spec(EncoderConfig(t5="google/t5-v1_1-xxl"))
    with pytest.raises(ValueError, match="the T5 tokenizer of " + want):
        encoders.ConditioningEncoder(EncoderConfig(t5="google/t5-v1_1-xxl"))
