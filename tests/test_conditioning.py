"""The conditioning schema, per-embedding dropout, the null condition, stored-row conversion."""

import numpy as np
import pytest
import torch

from conftest import random_cond
from ediffi.conditioning import DropoutConfig, cond_from_numpy, cond_to_numpy, drop_embeddings
from ediffi.presets import TINY_COND


def test_dropout_rates_are_independent_and_as_configured():
    cond = random_cond(TINY_COND, 4000)
    p = DropoutConfig(t5=0.1, clip_text=0.3, clip_image=0.5, joint=0.0)
    out = drop_embeddings(cond, p, torch.Generator().manual_seed(0))
    dropped_t5 = ~out.t5_mask.any(1)
    dropped_clip = ~out.clip_mask.any(1)
    dropped_img = ~out.clip_image_mask
    for rate, want in ((dropped_t5, 0.1), (dropped_clip, 0.3), (dropped_img, 0.5)):
        assert rate.float().mean().item() == pytest.approx(want, abs=0.03)
    # Independence: joint rate ~ product of marginals.
    assert (dropped_t5 & dropped_img).float().mean().item() == pytest.approx(0.05, abs=0.015)
    # Dropped means zero values and False masks; kept means untouched.
    assert out.t5[dropped_t5].abs().sum() == 0 and out.clip_pooled[dropped_clip].abs().sum() == 0
    assert torch.equal(out.clip[~dropped_clip], cond.clip[~dropped_clip])


def test_joint_dropout_trains_the_null_condition():
    """Guidance's unconditional branch drops every embedding: the joint drop must reach it often."""
    cond = random_cond(TINY_COND, 4000)
    p = DropoutConfig(t5=0.1, clip_text=0.1, clip_image=0.1, joint=0.1)
    out = drop_embeddings(cond, p, torch.Generator().manual_seed(0))
    null = ~out.t5_mask.any(1) & ~out.clip_mask.any(1) & ~out.clip_image_mask
    assert p.null_rate() == pytest.approx(0.1009)
    assert null.float().mean().item() == pytest.approx(p.null_rate(), abs=0.015)
    # Each embedding alone: dropped by its own draw or the joint one.
    assert (~out.clip_image_mask).float().mean().item() == pytest.approx(0.1 + 0.9 * 0.1, abs=0.02)
    assert DropoutConfig().joint > 0.05  # the default trains the null condition on ~10 % of samples


def test_dropout_extremes_and_bad_values():
    cond = random_cond(TINY_COND, 8)
    kept = drop_embeddings(cond, DropoutConfig(0.0, 0.0, 0.0, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(kept.tensors().values(), cond.tensors().values(), strict=True))
    gone = drop_embeddings(cond, DropoutConfig(1.0, 1.0, 1.0))
    null = cond.null()
    assert all(torch.equal(a, b) for a, b in zip(gone.tensors().values(), null.tensors().values(), strict=True))
    with pytest.raises(ValueError, match=r"DropoutConfig\.clip_text"):
        DropoutConfig(clip_text=1.5)
    with pytest.raises(ValueError, match=r"DropoutConfig\.joint"):
        DropoutConfig(joint=-0.1)


def test_null_condition_drops_everything():
    n = random_cond(TINY_COND, 3).null()
    assert not (n.t5_mask.any() or n.clip_mask.any() or n.clip_image_mask.any())
    assert n.t5.abs().sum() == n.clip.abs().sum() == n.clip_pooled.abs().sum() == n.clip_image.abs().sum() == 0


def test_numpy_round_trip_and_validation():
    cond = random_cond(TINY_COND, 4)
    rows = cond_to_numpy(cond, "float16")
    assert rows["t5"].dtype == np.float16 and rows["t5_mask"].dtype == np.bool_
    back = cond_from_numpy(rows, TINY_COND)
    torch.testing.assert_close(back.t5, cond.t5.half().float())
    assert torch.equal(back.clip_mask, cond.clip_mask)
    with pytest.raises(ValueError, match="lacks fields"):
        cond_from_numpy({k: v for k, v in rows.items() if k != "clip"}, TINY_COND)
    rows["clip"] = rows["clip"][:, :10]
    with pytest.raises(ValueError, match="'clip' has shape"):
        cond_from_numpy(rows, TINY_COND)
    with pytest.raises(ValueError, match="storage dtype"):
        cond_to_numpy(cond, "int8")
