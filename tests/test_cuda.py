"""CUDA paths (run where a GPU is present; skipped elsewhere): parity with CPU, bf16, seeds, training."""

import pytest
import torch

from conftest import random_cond, randomize
from ediffi.ensemble import ExpertEnsemble, intervals_from_boundaries
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, get_preset
from ediffi.training import autocast_for, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _inputs(cfg, b=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, cfg.img_resolution, cfg.img_resolution, generator=g)
    return x, torch.tensor([0.01, 0.5, 3.0, 60.0])[:b], random_cond(cfg.cond, b)


def test_cuda_fp32_matches_cpu(tiny_D, tiny_cfg, no_tf32):
    x, s, c = _inputs(tiny_cfg)
    ref = tiny_D(x, s, c)
    got = tiny_D.to("cuda")(x.cuda(), s.cuda(), c.to("cuda")).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_is_close_and_returns_float32(tiny_D, tiny_cfg):
    D = tiny_D.to("cuda")
    x, s, c = (t.to("cuda") for t in _inputs(tiny_cfg))
    ref = D(x, s, c)
    with autocast_for("cuda", "bfloat16"):
        out = D(x, s, c)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.03


def test_seeded_sampling_on_cuda_is_batch_independent(tiny_cfg):
    D = randomize(build_denoiser(tiny_cfg), seed=2).eval().to("cuda")
    cond, seeds = random_cond(tiny_cfg.cond, 4), [3, 4, 5, 6]
    cfg = SamplerConfig(sampler="heun", steps=8, S_churn=5, guidance=2.0)
    batched = sample(D, cond, (3, 16, 16), seeds, cfg, "cuda")
    single = torch.cat([sample(D, cond[i : i + 1], (3, 16, 16), [s], cfg, "cuda") for i, s in enumerate(seeds)])
    torch.testing.assert_close(batched, single, rtol=1e-3, atol=1e-3)


def test_ensemble_routes_on_cuda(tiny_cfg):
    a, b = (randomize(build_denoiser(tiny_cfg), seed=k).eval().to("cuda") for k in (1, 2))
    ens = ExpertEnsemble([a, b], intervals_from_boundaries([1.0]))
    x, s, c = (t.to("cuda") for t in _inputs(tiny_cfg))
    out = ens(x, s, c)
    torch.testing.assert_close(out[:2], a(x[:2], s[:2], c[:2]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2:], b(x[2:], s[2:], c[2:]), rtol=1e-4, atol=1e-4)


def test_bf16_training_overfits_a_batch_on_cuda():
    from ediffi.conditioning import DropoutConfig
    from ediffi.edm import NoiseDistribution, edm_loss

    cfg = get_preset("tiny")
    D = build_denoiser(cfg, "cuda")
    opt = torch.optim.AdamW(D.parameters(), lr=2e-3)
    x, _, c = _inputs(cfg)
    x, c = x.cuda().clamp(-1, 1), c.to("cuda")
    xs, cs = x.repeat(16, 1, 1, 1), c.repeat(16)

    def held_out_loss():  # same sigmas and noise before and after training
        with torch.no_grad(), autocast_for("cuda", "bfloat16"):
            g = torch.Generator("cuda").manual_seed(123)
            return edm_loss(D, xs, cs, NoiseDistribution(), g)[0].mean().item()

    before = held_out_loss()
    g = torch.Generator("cuda").manual_seed(0)
    for _ in range(200):
        train_step(D, opt, [(xs, cs)], dropout=DropoutConfig(0, 0, 0, joint=0), dtype="bfloat16", generator=g)
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_encoders_on_cuda_in_bf16():
    from ediffi.encoders import ConditioningEncoder, EncoderConfig

    prompts = ["a small red circle", "a big blue square in the middle"]
    ref, _ = ConditioningEncoder(EncoderConfig()).encode(prompts)
    enc = ConditioningEncoder(EncoderConfig(dtype="bfloat16")).to("cuda")
    got, _ = enc.encode(prompts, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert got.t5.dtype == torch.float32 and got.t5.is_cuda
    assert torch.equal(got.t5_mask.cpu(), ref.t5_mask)
    assert (got.clip.cpu() - ref.clip).norm() / ref.clip.norm() < 0.05
