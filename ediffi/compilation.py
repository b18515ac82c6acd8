"""torch.compile for the denoiser, in training and in sampling, without recompile storms.

Training compiles each residual and attention block in place (`Module.compile`): parameter names,
checkpoints and the EMA are unchanged, and it composes with DDP and with FSDP2's per-block
sharding (compile per block is what FSDP2 supports). Sampling compiles the whole denoiser behind
`Bucketed`, which pads every batch to a power of two: a prompt file's short last batch, guidance's
2B and an ensemble's per-expert sub-batches all reuse a few graphs instead of compiling one per size.
`compile: auto` turns it on where `benchmarks/bench_model.py` showed it winning after its compile
time (`COMPILE_WINS`); `true` / `false` force it.
"""

from __future__ import annotations

import torch
from torch import nn

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser
from ediffi.ensemble import ExpertEnsemble
from ediffi.unet import AttnBlock, ResBlock

# Where `auto` compiles, by device type and use. CPU (2 cores, tiny32 and demo, 2026-12-04,
# bench_model.py --compile): see docs/benchmarks.md. CUDA: inductor's fused kernels are the usual win
# for convolutional U-Nets; benchmarks/gpu_check.sh prints the compiled / eager ratio to confirm it.
COMPILE_WINS = {("cpu", "train"): False, ("cpu", "sample"): False, ("cuda", "train"): True, ("cuda", "sample"): True}
COMPILED_UNITS = (ResBlock, AttnBlock)  # what training compiles, one graph each (FSDP2's shard units too)


def check_compile(value: object, key: str = "compile") -> None:
    """Raise unless value is a compile setting (auto, true or false)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"{key} must be auto, true or false, got {value!r}")


def use_compile(value: bool | str, device: torch.device | str, use: str) -> bool:
    """Whether a compile setting compiles on this device for `use` ("train" or "sample")."""
    check_compile(value)
    if value == "auto":
        return COMPILE_WINS.get((torch.device(device).type, use), False)
    return bool(value)


def compile_blocks(D: nn.Module, **options) -> nn.Module:
    """Compile every ResBlock and AttnBlock of D in place (one graph each, fixed shapes); returns D."""
    units = [m for m in D.modules() if isinstance(m, COMPILED_UNITS)]
    _allow_graphs(2 * len(units))  # blocks share a graph per shape; in the worst case one each, train and eval
    for m in units:
        m.compile(dynamic=False, **options)
    return D


def _allow_graphs(n: int) -> None:
    """Let dynamo keep n graphs of one function (its default, 8, is below a U-Net's block shapes)."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, n)


def bucket(n: int) -> int:
    """The batch size a batch of n runs at: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class Bucketed:
    """A compiled denoiser for sampling: each batch padded (with copies of its first sample) to
    `bucket(B)` and the output cut back, so only a few batch sizes ever compile. Keeps the denoiser
    contract; `eager` is the module itself (for code that changes its blocks, e.g. paint-with-words)."""

    def __init__(self, D: nn.Module, **options):
        self.eager = D
        _allow_graphs(64)  # a bucket per power of two, per expert: never falls back to eager
        self.compiled = torch.compile(D, dynamic=False, **options)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        B = x.shape[0]
        pad = bucket(B) - B
        if pad:
            x, sigma = _pad(x, pad), _pad(sigma, pad)
            cond = cond.map(lambda v: _pad(v, pad))
        return self.compiled(x, sigma, cond)[:B]


def _pad(v: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([v, v[:1].expand(n, *v.shape[1:])])


def for_sampling(D: Denoiser, compile: bool, **options) -> Denoiser:
    """D as sampling should call it: when compiling, `Bucketed` (an ensemble: each expert), else D."""
    if not compile:
        return D
    if isinstance(D, ExpertEnsemble):
        return ExpertEnsemble([Bucketed(e, **options) for e in D.experts], D.intervals)
    return Bucketed(D, **options)
