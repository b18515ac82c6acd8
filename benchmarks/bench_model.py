"""Model throughput: forward, training step, sampling, the sampler's overhead outside the network,
and side-by-side ratios: compiled / eager, fused / default AdamW, ediffi / diffusers.

    python benchmarks/bench_model.py                                  # tiny and demo, eager, this machine
    python benchmarks/bench_model.py --presets tiny32 demo --compile --fused --diffusers
    python benchmarks/bench_model.py --presets base64 --device cuda --dtype bfloat16 --peak-tflops 989 --compile

One line per preset and variant. "outside net" is the share of sampling wall time not spent inside
network calls (schedule, solver arithmetic, guidance batching): the target is under 5%. "compile s"
is the first call's time over a warm call's (what compiling costs once). `--diffusers` trains
diffusers' UNet2DConditionModel at the preset's widths (pip install -e ".[bench]") and prints
ediffi's achieved FLOP/s over its, both counted by torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from ediffi.compilation import compile_blocks, for_sampling
from ediffi.conditioning import DropoutConfig, empty_cond
from ediffi.ensemble import EDIFFI_BASE_QUANTILES, ExpertEnsemble, boundaries_from_quantiles, intervals_from_boundaries
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, count_parameters, forward_flops, get_preset, memory_format
from ediffi.samplers import network_evaluations
from ediffi.training import autocast_for, checkpoint_activations, optimizer_options, train_step


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds of fn() over repeats, seconds of the first call) ."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], first


class TimedDenoiser:
    """Wraps a denoiser and accumulates the wall time spent inside it."""

    def __init__(self, D, device: str):
        self.D, self.device, self.seconds = D, device, 0.0

    def __call__(self, x, sigma, cond):
        _sync(self.device)
        t = time.perf_counter()
        out = self.D(x, sigma, cond)
        _sync(self.device)
        self.seconds += time.perf_counter() - t
        return out


def _inputs(cfg, batch: int, device: str):
    R = cfg.img_resolution
    cond = empty_cond(cfg.cond, batch, device)
    if cfg.sr:
        cond.lowres = torch.randn(batch, 3, R // 4, R // 4, device=device)
        cond.aug_sigma = torch.zeros(batch, device=device)
    return torch.randn(batch, 3, R, R, device=device), torch.ones(batch, device=device), cond


def bench(name: str, a, *, compiled: bool = False, fused: bool | None = None) -> dict:
    """One preset's figures; `compiled` as training and generation compile (blocks / Bucketed)."""
    device, dtype, batch = a.device, a.dtype, a.batch
    cfg = get_preset(name)
    torch.manual_seed(0)
    D = build_denoiser(cfg, device).to(memory_format=memory_format("auto", device))
    x, sigma, cond = _inputs(cfg, batch, device)
    flops = forward_flops(cfg)
    if a.experts > 1:  # eDiff-I's three experts (quantiles 1/8 and 511/512), or k at even quantiles
        q = EDIFFI_BASE_QUANTILES if a.experts == 3 else [k / a.experts for k in range(1, a.experts)]
        copies = [D] + [build_denoiser(cfg, device).to(memory_format=memory_format("auto", device)).eval() for _ in q]
        sampled = ExpertEnsemble(copies, intervals_from_boundaries(boundaries_from_quantiles(q)))
    else:
        sampled = D
    opts = {"mode": a.compile_mode} if a.compile_mode else {}
    sampler_D = for_sampling(sampled, compiled, **opts)

    D.eval()
    with torch.no_grad():
        fwd_D = for_sampling(D, compiled, **opts)
        t_fwd, first_fwd = _timed(lambda: _fwd_autocast(fwd_D, x, sigma, cond, device, dtype), device, a.repeats)
    train = build_denoiser(cfg, device).to(memory_format=memory_format("auto", device)).train()
    if a.activation_checkpointing:
        checkpoint_activations(train)
    if compiled:
        compile_blocks(train, **opts)
    opt_kw = optimizer_options(device) if fused is None else {"fused": fused}
    opt = torch.optim.AdamW(train.parameters(), lr=1e-4, **opt_kw)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = lambda: train_step(train, opt, [(x, cond)], dropout=DropoutConfig(), dtype=dtype)
    t_train, first_train = _timed(step, device, a.repeats)

    timed = TimedDenoiser(lambda p, q, r: _fwd_autocast(sampler_D, p, q, r, device, dtype), device)
    scfg = SamplerConfig(sampler="heun", steps=a.steps, guidance=a.guidance)
    R = cfg.img_resolution
    if compiled:  # compile the sampling graphs first (every expert, cond and uncond batch)
        sample(sampler_D, cond, (3, R, R), list(range(batch)), replace(scfg, steps=2 * a.experts), device)
    _sync(device)
    t0 = time.perf_counter()
    sample(timed, cond, (3, R, R), list(range(batch)), scfg, device)
    _sync(device)
    t_sample = time.perf_counter() - t0
    variant = (f"compiled {a.compile_mode or ''}".strip() if compiled else "eager") + (
        "" if fused is None else f", fused={fused}"
    )
    row = {
        "preset": name,
        "variant": variant,
        "params_M": count_parameters(D) / 1e6,
        "GFLOP/img": flops / 1e9,
        "batch": batch,
        "fwd img/s": batch / t_fwd,
        "train img/s": batch / t_train,
        f"sample img/s ({a.steps} steps, {network_evaluations('heun', a.steps)} NFE, cfg {a.guidance}, "
        f"{a.experts} expert{'s' if a.experts > 1 else ''})": batch / t_sample,
        "outside net %": 100 * (1 - timed.seconds / t_sample),
        "train TFLOP/s": 3 * flops * batch / t_train / 1e12,
        "compile s": (first_fwd - t_fwd) + (first_train - t_train),
    }
    if a.peak_tflops:
        row["MFU %"] = 100 * row["train TFLOP/s"] / a.peak_tflops
    if torch.device(device).type == "cuda":
        row["train peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _fwd_autocast(D, x, sigma, cond, device, dtype):
    with autocast_for(device, dtype):
        return D(x, sigma, cond)


def diffusers_unet(cfg):
    """diffusers' UNet2DConditionModel at a preset's widths: the same levels, blocks per level,
    attention resolutions, head width and context width (3 input and output channels)."""
    from diffusers import UNet2DConditionModel

    R = cfg.base_resolution
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    attn = [(R >> level) in cfg.attn_resolutions for level in range(len(chans))]
    return UNet2DConditionModel(
        sample_size=R,
        in_channels=cfg.in_channels * cfg.patch_size**2,
        out_channels=cfg.in_channels * cfg.patch_size**2,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=chans,
        layers_per_block=cfg.num_blocks,
        cross_attention_dim=cfg.ctx_dim,
        attention_head_dim=tuple(c // cfg.head_dim for c in chans),  # diffusers reads it as heads
    )


def bench_diffusers(name: str, a) -> dict:
    """Training step of diffusers' U-Net at the preset's widths: images/s and achieved TFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, device, B = get_preset(name), a.device, a.batch
    R = cfg.base_resolution
    torch.manual_seed(0)
    net = diffusers_unet(cfg).to(device, memory_format=memory_format("auto", device)).train()
    L = 2 + cfg.cond.t5_len + cfg.cond.clip_len  # ediffi's context: null, T5, CLIP text, CLIP image tokens
    x = torch.randn(B, cfg.in_channels * cfg.patch_size**2, R, R, device=device)
    ctx, t = torch.randn(B, L, cfg.ctx_dim, device=device), torch.full((B,), 500, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x[:1], t[:1], ctx[:1])
    flops = counter.get_total_flops()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **optimizer_options(device))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, a.dtype):
            loss = (net(x, t, ctx).sample.float() - x).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    t_train, _ = _timed(step, device, a.repeats)
    return {
        "preset": name,
        "variant": "diffusers UNet2DConditionModel, eager",
        "params_M": count_parameters(net) / 1e6,
        "GFLOP/img": flops / 1e9,
        "train img/s": B / t_train,
        "train TFLOP/s": 3 * flops * B / t_train / 1e12,
    }


def _print(row: dict) -> None:
    print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def _ratio(label: str, num: dict, den: dict, keys: tuple[str, ...]) -> None:
    print(f"  {label}: " + "  ".join(f"{k} x{num[k] / den[k]:.2f}" for k in keys if k in num and k in den), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=18, help="Karras schedule length for the sampling figure")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100/H200 bf16 dense: 989)")
    p.add_argument("--compile", action="store_true", help="also run compiled (blocks for training, Bucketed sampling)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--fused", action="store_true", help="also run AdamW with fused=True and fused=False")
    p.add_argument("--diffusers", action="store_true", help="also train diffusers' U-Net at the same widths")
    p.add_argument("--experts", type=int, default=1, help="sample through an ensemble of this many experts")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    a = p.parse_args()
    print(f"device={a.device} dtype={a.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    speed = ("fwd img/s", "train img/s", "train TFLOP/s")
    for name in a.presets:
        eager = bench(name, a)
        _print(eager)
        if a.compile:
            torch._dynamo.reset()
            comp = bench(name, a, compiled=True)
            _print(comp)
            _ratio("compiled / eager", comp, eager, (*speed, next(k for k in eager if k.startswith("sample"))))
        if a.fused:
            rows = {f: bench(name, a, fused=f) for f in (False, True)}
            for r in rows.values():
                _print(r)
            _ratio("fused / unfused AdamW", rows[True], rows[False], ("train img/s",))
        if a.diffusers:
            ref = bench_diffusers(name, a)
            _print(ref)
            _ratio("ediffi / diffusers (achieved FLOP/s)", eager, ref, ("train TFLOP/s",))


if __name__ == "__main__":
    main()
