"""Data-parallel wrappers and full-state gathering for training (torch.distributed only).

FSDP2 (`fully_shard`) shards every ResBlock and AttnBlock and then the whole denoiser, so each
rank holds 1/world of the weights, gradients and optimizer state; buffers (running statistics)
stay whole on every rank and are broadcast from rank 0 before each forward, as DDP does.
Accumulated micro-batches communicate gradients once, on the last (`micro_batch`). Checkpoints are
always written as full (unsharded) state keyed by parameter name, whatever the strategy, so a DDP
run can resume under FSDP and the other way round, and plain `load_checkpoint` reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from ediffi.unet import AttnBlock, ResBlock

STRATEGIES = ("ddp", "fsdp")
SHARD_UNITS = (ResBlock, AttnBlock)  # each becomes one FSDP2 all-gather unit
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_denoiser(D: nn.Module, device: torch.device | str) -> nn.Module:
    """FSDP2 over all ranks of the default process group: per block, then the root; its buffers are
    broadcast from rank 0 before every forward (DDP's `broadcast_buffers`), so running statistics
    updated in training mode stay one set across ranks. Every rank must hold the same weights before
    this call (build with one seed, or load one checkpoint)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for m in D.modules():
        if isinstance(m, SHARD_UNITS):
            fully_shard(m, mesh=mesh)
    fully_shard(D, mesh=mesh)
    D.register_forward_pre_hook(lambda module, _: broadcast_buffers(module))
    return D


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of `module` with rank `src`'s (a collective: every rank calls it)."""
    for b in module.buffers():
        dist.broadcast(b, src=src)


@contextlib.contextmanager
def micro_batch(model: nn.Module, i: int, n: int) -> Iterator[None]:
    """Around the forward and backward of micro-batch i of a step's n: gradients are averaged over
    ranks on the last one only (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`), so a step
    communicates once. DDP skips its buffer broadcast in a forward that follows a `no_sync` one;
    it is done here instead, so every micro-batch sees rank 0's buffers, as under `shard_denoiser`.
    A plain module is left alone."""
    last = i == n - 1
    if isinstance(model, DistributedDataParallel):
        if i > 0 and model.broadcast_buffers:
            broadcast_buffers(model.module)
        with contextlib.nullcontext() if last else model.no_sync():
            yield
    elif isinstance(model, FSDPModule) and not last:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_model_state(model: nn.Module, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The full weights on CPU, keyed without `prefix` (a collective under FSDP: every rank calls
    it; with a process group only rank 0 gets the tensors, others an empty dict)."""
    sd = get_model_state_dict(model, options=_FULL)
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (collective like `full_model_state`)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (from `full_optimizer_state`) into a plain, DDP or
    FSDP2 model's optimizer; every rank passes the same full state."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
