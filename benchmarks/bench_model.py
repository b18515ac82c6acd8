"""Model throughput: forward, training step, sampling, and the sampler's overhead outside the network.

    python benchmarks/bench_model.py                       # tiny and demo on this machine
    python benchmarks/bench_model.py --presets base64 --device cuda --dtype bfloat16 --peak-tflops 989

Prints one table. "outside net" is the share of sampling wall time not spent inside network
calls (schedule, solver arithmetic, guidance batching): the target is under 5%.
"""

from __future__ import annotations

import argparse
import time

import torch

from ediffi.conditioning import DropoutConfig, empty_cond
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, count_parameters, forward_flops, get_preset
from ediffi.samplers import network_evaluations
from ediffi.training import autocast_for, train_step


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


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


def bench(name: str, batch: int, steps: int, guidance: float, device: str, dtype: str, repeats: int) -> dict:
    cfg = get_preset(name)
    R, D = cfg.img_resolution, build_denoiser(cfg, device)
    cond = empty_cond(cfg.cond, batch, device)
    if cfg.sr:
        cond.lowres = torch.randn(batch, 3, R // 4, R // 4, device=device)
        cond.aug_sigma = torch.zeros(batch, device=device)
    x = torch.randn(batch, 3, R, R, device=device)
    sigma = torch.ones(batch, device=device)
    flops = forward_flops(cfg)

    D.eval()

    def fwd():
        with torch.no_grad(), autocast_for(device, dtype):
            D(x, sigma, cond)

    t_fwd = _timed(fwd, device, repeats)
    D.train()
    opt = torch.optim.AdamW(D.parameters(), lr=1e-4)
    t_train = _timed(lambda: train_step(D, opt, [(x, cond)], dropout=DropoutConfig(), dtype=dtype), device, repeats)
    D.eval()

    timed = TimedDenoiser(lambda a, b, c: _fwd_autocast(D, a, b, c, device, dtype), device)
    scfg = SamplerConfig(sampler="heun", steps=steps, guidance=guidance)
    _sync(device)
    t0 = time.perf_counter()
    sample(timed, cond, (3, R, R), list(range(batch)), scfg, device)
    _sync(device)
    t_sample = time.perf_counter() - t0
    row = {
        "preset": name,
        "params_M": count_parameters(D) / 1e6,
        "GFLOP/img": flops / 1e9,
        "batch": batch,
        "fwd img/s": batch / t_fwd,
        "train img/s": batch / t_train,
        f"sample img/s ({steps} steps, {network_evaluations('heun', steps)} NFE, cfg {guidance})": batch / t_sample,
        "outside net %": 100 * (1 - timed.seconds / t_sample),
        "train TFLOP/s": 3 * flops * batch / t_train / 1e12,
    }
    return row


def _fwd_autocast(D, x, sigma, cond, device, dtype):
    with autocast_for(device, dtype):
        return D(x, sigma, cond)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=18, help="Karras schedule length for the sampling figure")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (H100/H200 bf16 dense: 989)",
    )
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"device={a.device} dtype={a.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name in a.presets:
        row = bench(name, a.batch, a.steps, a.guidance, a.device, a.dtype, a.repeats)
        if a.peak_tflops:
            row["MFU %"] = 100 * row["train TFLOP/s"] / a.peak_tflops
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
