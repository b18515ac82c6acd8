"""The U-Net and its presets: builds, counts, forward/backward, masking, SR conditioning."""

from dataclasses import replace

import pytest
import torch

from conftest import absent_filled, random_cond, randomize
from ediffi.conditioning import empty_cond
from ediffi.presets import (
    PRESETS,
    build_denoiser,
    count_parameters,
    forward_flops,
    get_preset,
    preset_report,
)
from ediffi.unet import UNetConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_without_memory(name):
    D = build_denoiser(get_preset(name), "meta")
    assert all(p.is_meta for p in D.parameters())
    report = preset_report(name)
    assert report["params"] == count_parameters(D) > 0
    assert report["forward_flops_per_image"] > 2 * report["params"]  # convolutions reuse weights


@pytest.mark.parametrize("name", ["tiny", "demo", "demo_sr"])
def test_reported_parameter_count_equals_real_module(name):
    real = build_denoiser(get_preset(name), "cpu")
    assert preset_report(name)["params"] == sum(p.numel() for p in real.parameters())


def test_tiny_is_small_and_flops_scale_with_batch():
    assert preset_report("tiny")["params"] < 5_000_000
    cfg = get_preset("tiny")
    assert forward_flops(cfg, batch=1) == forward_flops(cfg, batch=3)


def test_tiny_forward_backward(tiny_cfg):
    D = build_denoiser(tiny_cfg)
    x = torch.randn(3, 3, 16, 16)
    cond = random_cond(tiny_cfg.cond, 3)
    out = D(x, torch.tensor([0.01, 1.0, 80.0]), cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    (out - x).square().mean().backward()
    grads = [p.grad for p in D.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert D.net.conv_out.weight.grad.abs().sum() > 0


@pytest.fixture
def strong_D(tiny_cfg):
    """Larger random weights so that every input visibly moves the output."""
    return randomize(build_denoiser(tiny_cfg), seed=1, std=0.3).eval()


def test_cross_attention_respects_key_padding_mask(strong_D, tiny_cfg):
    cond = random_cond(tiny_cfg.cond, 2)
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 1.0])
    base = strong_D(x, s, cond)
    padded = cond.t5.masked_fill(~cond.t5_mask[..., None], 100.0)  # change only masked-out tokens
    torch.testing.assert_close(strong_D(x, s, replace(cond, t5=padded)), base, rtol=0, atol=1e-5)
    present = cond.t5 + cond.t5_mask[..., None] * 1.0  # change the present tokens
    assert (strong_D(x, s, replace(cond, t5=present)) - base).abs().max() > 1e-3


def test_each_embedding_reaches_the_output(strong_D, tiny_cfg):
    cond = random_cond(tiny_cfg.cond, 2)
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 1.0])
    base = strong_D(x, s, cond)
    for which in ("t5", "clip_text", "clip_image"):
        assert (strong_D(x, s, cond.drop(which, False)) - base).abs().max() > 1e-3, which
    assert torch.isfinite(strong_D(x, s, empty_cond(tiny_cfg.cond, 2))).all()  # all masked still defined


def test_super_resolution_variant_uses_lowres_and_aug_level():
    cfg = get_preset("tiny", sr=True)
    D = randomize(build_denoiser(cfg), seed=3).eval()
    cond = random_cond(cfg.cond, 2)
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="lowres"):
        D(x, s, cond)
    cond.lowres, cond.aug_sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.0, 0.2])
    base = D(x, s, cond)
    assert base.shape == x.shape
    cond2 = random_cond(cfg.cond, 2)
    cond2.lowres, cond2.aug_sigma = cond.lowres + 1.0, cond.aug_sigma
    assert (D(x, s, cond2) - base).abs().max() > 1e-4
    cond2.lowres, cond2.aug_sigma = cond.lowres, cond.aug_sigma + 0.5
    assert (D(x, s, cond2) - base).abs().max() > 1e-4


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="img_resolution"):
        UNetConfig(img_resolution=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="head_dim"):
        UNetConfig(model_channels=48, head_dim=64)
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({"widht": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("huge")
    cfg = get_preset("demo")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_patch_size_folds_pixels_into_channels():
    tiny = get_preset("tiny")
    cfg = get_preset("tiny", img_resolution=32, patch_size=2)
    D = randomize(build_denoiser(cfg), seed=2).eval()
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 5.0])
    cond = random_cond(cfg.cond, 2)
    out = D(x, s, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Same levels as the unpatched 16px network: about its cost, for 4x the pixels.
    assert forward_flops(cfg) < 1.2 * forward_flops(tiny)
    # Each output pixel depends on the input (the folding is a permutation, not a downsampling).
    x2 = x.clone()
    x2[:, :, 1, 1] += 1.0  # an odd pixel: lost by any stride-2 subsampling
    assert (D(x2, s, cond) - out).abs().max() > 1e-4
    sr = randomize(build_denoiser(get_preset("tiny_sr", patch_size=2)), seed=2).eval()
    cond.lowres, cond.aug_sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.0, 0.1])
    assert sr(x, s, cond).shape == x.shape
    with pytest.raises(ValueError, match="patch_size"):
        get_preset("tiny", patch_size=3)


def test_pool_heads_summarise_present_tokens_into_the_embedding():
    cfg = get_preset("tiny", pool_heads=2)
    net = randomize(build_denoiser(cfg), seed=4).net.eval()
    cond = random_cond(cfg.cond, 2)
    c_noise = torch.tensor([0.1, 0.2])
    plain = (
        net.noise_mlp(net.noise_fourier(c_noise)) + net.pooled_proj(cond.clip_pooled) + net.image_proj(cond.clip_image)
    )
    base = net.embedding(c_noise, cond)
    assert (base - torch.nn.functional.silu(plain)).abs().max() > 1e-3  # the pool contributes
    padded = cond.t5.masked_fill(~cond.t5_mask[..., None], 100.0)  # padding is never attended
    torch.testing.assert_close(net.embedding(c_noise, replace(cond, t5=padded)), base)
    assert (net.embedding(c_noise, replace(cond, t5=cond.t5 + 1.0)) - base).abs().max() > 1e-3
    # Zero queries: uniform attention, i.e. the projected mean of the present tokens' values.
    torch.nn.init.zeros_(net.pool.query)
    ctx, mask = net.context(cond)
    v = net.pool.kv(ctx).chunk(2, dim=2)[1]
    m = mask[..., None].float()
    mean = (v * m).sum(1) / m.sum(1)
    torch.testing.assert_close(net.embedding(c_noise, cond), torch.nn.functional.silu(plain + net.pool.proj(mean)))
    with pytest.raises(ValueError, match="pool_heads"):
        get_preset("tiny", pool_heads=3)


def test_pooled_text_off_leaves_text_to_cross_attention():
    cfg = get_preset("tiny", pooled_text=False)
    D = randomize(build_denoiser(cfg), seed=5).eval()
    x, s, cond = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), random_cond(cfg.cond, 2)
    out = D(x, s, cond)
    assert torch.equal(D(x, s, replace(cond, clip_pooled=cond.clip_pooled + 5.0)), out)  # not read
    assert not torch.equal(D(x, s, replace(cond, clip=torch.randn_like(cond.clip))), out)  # the tokens still are
    assert "pooled_proj.weight" not in D.net.state_dict()
    on = randomize(build_denoiser(get_preset("tiny")), seed=5).eval()
    assert not torch.equal(on(x, s, replace(cond, clip_pooled=cond.clip_pooled + 5.0)), on(x, s, cond))


def test_pooled_t5_is_the_standardized_mean_of_present_tokens():
    cfg = get_preset("tiny", pooled_t5=True)
    net = randomize(build_denoiser(cfg), seed=6).net
    g = torch.Generator().manual_seed(0)
    common = torch.randn(cfg.cond.t5_dim, generator=g) * 3  # what every prompt shares dwarfs what tells them apart

    def batch(n: int):
        cond = random_cond(cfg.cond, n, seed=int(torch.randint(1000, (1,), generator=g)))
        cond.t5 = (common + 0.1 * cond.t5) * cond.t5_mask[..., None]
        cond.t5_mask[0] = False  # a dropped T5 embedding: no tokens, not counted in the statistics
        cond.t5[0] = 0.0
        return cond

    def token_mean(cond):
        m = cond.t5_mask[..., None].float()
        return ((cond.t5 * m).sum(1) / m.sum(1).clamp(min=1))[1:]

    net.train()
    means = []
    for _ in range(30):
        cond = batch(16)
        net.embedding(torch.zeros(16), cond)
        means.append(token_mean(cond))
    assert int(net.t5_updates) == 30
    # The first updates are an exact average of the batches' statistics (present rows only).
    torch.testing.assert_close(net.t5_mean, torch.stack([m.mean(0) for m in means]).mean(0))
    torch.testing.assert_close(net.t5_var, torch.stack([m.var(0, unbiased=False) for m in means]).mean(0))
    net.eval()
    cond = batch(64)
    z = net._pooled_t5(cond)
    assert torch.equal(z[0], torch.zeros_like(z[0]))  # absent -> zero
    torch.testing.assert_close(z[1:], (token_mean(cond) - net.t5_mean) / (net.t5_var + 1e-6).sqrt())
    assert 0.5 < z[1:].std() < 2 and z[1:].mean().abs() < 0.5  # the common part is gone, the rest at unit scale
    padded = cond.t5.masked_fill(~cond.t5_mask[..., None], 100.0)  # padding is never read
    torch.testing.assert_close(net._pooled_t5(replace(cond, t5=padded)), z)
    before = net.t5_mean.clone()
    net.embedding(torch.zeros(64), cond)
    assert torch.equal(net.t5_mean, before)  # eval mode does not update the statistics
    D = build_denoiser(cfg).eval()
    D.net.load_state_dict(net.state_dict())  # the statistics travel with the weights
    x, s, c2 = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), batch(2)
    c2.t5_mask[0] = True
    assert not torch.equal(D(x, s, c2), D(x, s, replace(c2, t5=c2.t5 + c2.t5_mask[..., None] * 0.5)))


def test_patch_input_path_gain_follows_the_noise_level():
    assert build_denoiser(get_preset("tiny")).net.skip_gain is None  # no patches: no folded input path
    net = randomize(build_denoiser(get_preset("tiny", img_resolution=32, patch_size=2)), seed=7).net.eval()
    C = net.cfg.model_channels
    with torch.no_grad():
        net.conv_out.weight[:, :C] = 0  # only the folded input reaches the output
    x, cond = torch.randn(1, 3, 32, 32), random_cond(net.cfg.cond, 1)
    at = lambda noise: net(x, torch.tensor([noise]), cond)
    assert (at(-2.0) - at(1.0)).abs().max() > 1e-3  # the same input pixels, weighted by the noise level
    torch.nn.init.zeros_(net.skip_gain.weight)
    torch.nn.init.zeros_(net.skip_gain.bias)
    torch.testing.assert_close(at(-2.0), at(1.0))


def test_output_head_refines_each_pixel_from_its_neighbourhood():
    with pytest.raises(ValueError, match="head_channels"):
        get_preset("tiny", head_channels=8)  # no patches: nothing to refine at full resolution
    cfg = get_preset("tiny", img_resolution=32, patch_size=2, head_channels=8)
    D = randomize(build_denoiser(cfg), seed=3)
    x, cond, noise = torch.randn(2, 3, 32, 32), random_cond(cfg.cond, 2), torch.tensor([0.1, -1.0])
    # Zero-initialised: a new network's output is that of the same network without the head.
    fresh = build_denoiser(cfg).net.eval()
    plain = build_denoiser(replace(cfg, head_channels=0)).net.eval()
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("head.")})
    torch.testing.assert_close(fresh(x, noise, cond), plain(x, noise, cond))
    # With the patch path silenced, one input pixel moves the output only within the head's
    # receptive field (three 3x3 convs: 3 pixels each way): the head works on pixels, not patches.
    net = D.net.eval()
    with torch.no_grad():
        torch.nn.init.zeros_(net.conv_out.weight)
        torch.nn.init.zeros_(net.conv_out.bias)
    x2 = x.clone()
    x2[:, :, 10, 20] += 1.0
    with torch.no_grad():
        change = (net(x2, noise, cond) - net(x, noise, cond)).abs().amax(dim=(0, 1))
    near = torch.zeros(32, 32, dtype=torch.bool)
    near[7:14, 17:24] = True
    assert change[near].max() > 1e-4 and change[~near].max() == 0


def test_channels_last_trains_like_the_default_layout(tmp_path):
    from ediffi.checkpoint import load_checkpoint, save_checkpoint
    from ediffi.edm import NoiseDistribution, edm_loss
    from ediffi.ema import EMA
    from ediffi.presets import memory_format
    from ediffi.training import train_step

    assert memory_format("auto", "cpu") == torch.channels_last
    assert memory_format("auto", "meta") == memory_format("contiguous", "cpu") == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format must be one of"):
        memory_format("nhwc", "cpu")
    cfg = get_preset("tiny32")
    x, cond = torch.randn(4, 3, 32, 32), random_cond(cfg.cond, 4)
    torch.manual_seed(0)
    D0 = randomize(build_denoiser(cfg), seed=1, std=0.05)
    D1 = build_denoiser(cfg)
    D1.load_state_dict(D0.state_dict())
    D1.to(memory_format=torch.channels_last)
    assert D1.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # The same loss and gradients (up to summation order) in either layout.
    losses = []
    for D in (D0, D1):
        loss = edm_loss(D, x, cond, NoiseDistribution(), torch.Generator().manual_seed(1))[0].mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for (k, a), b in zip(D0.named_parameters(), D1.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-4 * a.grad.abs().max().item() + 1e-12), k
    # Optimizer steps and the EMA keep the layout; checkpoints hold plain contiguous tensors.
    opt, ema = torch.optim.AdamW(D1.parameters(), lr=1e-3), EMA(D1.net, 0.9)
    train_step(D1, opt, [(x, cond)], NoiseDistribution())
    ema.update(D1.net)
    assert D1.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert ema.state_dict()["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "ck", cfg, D1, ema=ema.state_dict())
    back = load_checkpoint(tmp_path / "ck")[0]
    assert back.net.conv_in.weight.is_contiguous()
    for a, b in zip(back.net.state_dict().values(), D1.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ema.load(ema.state_dict(), 1)  # a resume: the restored average keeps the model's layout
    assert ema.state_dict()["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", {}),  # pooled text on, pooled T5 off
        ("tiny", {"pooled_text": False}),  # both off
        ("tiny32", {}),  # both on, attention pooling, patches, output head
        ("tiny32", {"pooled_text": False}),  # pooled T5 only
        ("tiny_sr", {}),  # super-resolution
    ],
)
def test_masked_out_values_never_reach_the_output_or_the_statistics(name, overrides):
    cfg = get_preset(name, **overrides)
    D = randomize(build_denoiser(cfg), seed=8, std=0.3)
    R = cfg.img_resolution
    x, s = torch.randn(3, 3, R, R, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 2.0, 9.0])
    cond = random_cond(cfg.cond, 3)  # row 0: everything; row 1: no T5, no image; row 2: no CLIP text
    cond = cond.drop("t5", torch.tensor([True, False, True])).drop("clip_image", torch.tensor([True, False, True]))
    cond = cond.drop("clip_text", torch.tensor([True, True, False]))
    if cfg.sr:
        cond.lowres, cond.aug_sigma = torch.randn(3, 3, R // 2, R // 2), torch.tensor([0.0, 0.1, 0.3])
    junk = absent_filled(cond)
    assert all(
        (getattr(junk, k) - getattr(cond, k)).abs().max() > 1e3 for k in ("t5", "clip", "clip_pooled", "clip_image")
    )
    twin = build_denoiser(cfg)
    twin.load_state_dict(D.state_dict())
    D.train(), twin.train()  # training mode: the pooled-T5 statistics update from present rows only
    with torch.no_grad():
        gap = (twin(x, s, junk) - D(x, s, cond)).abs().amax(dim=(1, 2, 3)).tolist()  # per row
    assert gap == [0.0] * 3, gap
    assert int(getattr(D.net, "t5_updates", -1)) == (1 if cfg.pooled_t5 else -1)  # the statistics did update
    for (k, a), b in zip(D.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    D.eval()
    with torch.no_grad():
        gap = (D(x, s, junk) - D(x, s, cond)).abs().amax(dim=(1, 2, 3)).tolist()
    assert gap == [0.0] * 3, gap
