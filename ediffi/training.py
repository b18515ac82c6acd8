"""One optimisation step of the EDM objective, as a pure function over model, optimizer and batch."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ediffi.conditioning import Cond, DropoutConfig, drop_embeddings
from ediffi.distributed import micro_batch
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.sr import SRConfig, training_condition
from ediffi.unet import AttnBlock, ResBlock


@dataclass
class StepResult:
    """What one step measured (per-sample losses and sigmas stay on the device)."""

    loss: torch.Tensor  # mean loss (scalar)
    per_sample: torch.Tensor  # [B] weighted losses
    sigma: torch.Tensor  # [B] noise levels used
    grad_norm: torch.Tensor | None  # total gradient norm before clipping


def autocast_for(device: torch.device | str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the given device type, or a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def optimizer_options(device: torch.device | str) -> dict:
    """Keyword arguments for torch.optim.AdamW on this device: one fused kernel on CUDA; on the CPU
    torch's default (benchmarks/bench_model.py --fused measures both)."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def checkpoint_activations(D: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing per block, in place: each ResBlock and AttnBlock keeps only its inputs
    for the backward and recomputes the rest there (peak memory down, about a third more compute)."""
    for m in D.modules():
        if isinstance(m, (ResBlock, AttnBlock)):
            forward = m.forward
            m.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)
    return D


def step_seed(seed: int, rank: int, step: int) -> int:
    """The random seed of one optimiser step on one rank: a pure function of (seed, rank, step), so a
    run resumed from a checkpoint draws exactly what the uninterrupted run drew."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator takes it


def train_step(
    D: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[torch.Tensor, Cond]],
    noise: NoiseDistribution = NoiseDistribution(),
    dropout: DropoutConfig = DropoutConfig(),
    grad_clip: float | None = 1.0,
    dtype: str = "float32",
    generator: torch.Generator | None = None,
    sr: SRConfig | None = None,
) -> StepResult:
    """One optimiser step over micro-batches (gradient accumulation): drop embeddings (SR stages:
    attach the degraded, noise-augmented low-resolution image), EDM loss under autocast,
    backpropagate (a DDP or FSDP2 model syncs gradients on the last micro-batch only), clip, step."""
    optimizer.zero_grad(set_to_none=True)
    losses, sigmas = [], []
    for i, (x0, cond) in enumerate(batches):
        cond = drop_embeddings(cond, dropout, generator)
        if sr is not None:
            cond = training_condition(cond, x0, sr, generator)
        with micro_batch(D, i, len(batches)):  # data-parallel: gradients communicated at the last only
            with autocast_for(x0.device, dtype):
                per_sample, sigma = edm_loss(D, x0, cond, noise, generator)
            (per_sample.mean() / len(batches)).backward()
        losses.append(per_sample.detach())
        sigmas.append(sigma)
    grad_norm = torch.nn.utils.clip_grad_norm_(D.parameters(), grad_clip) if grad_clip else None
    optimizer.step()
    per_sample = torch.cat(losses)
    return StepResult(per_sample.mean(), per_sample, torch.cat(sigmas), grad_norm)
