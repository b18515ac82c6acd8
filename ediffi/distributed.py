"""Data-parallel wrappers and full-state gathering for training (torch.distributed only).

FSDP2 (`fully_shard`) shards every ResBlock and AttnBlock and then the whole denoiser, so each
rank holds 1/world of the weights, gradients and optimizer state. Checkpoints are always written
as full (unsharded) state keyed by parameter name, whatever the strategy, so a DDP run can resume
under FSDP and the other way round, and plain `load_checkpoint` reads them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ediffi.unet import AttnBlock, ResBlock

STRATEGIES = ("ddp", "fsdp")
SHARD_UNITS = (ResBlock, AttnBlock)  # each becomes one FSDP2 all-gather unit
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_denoiser(D: nn.Module, device: torch.device | str) -> nn.Module:
    """FSDP2 over all ranks of the default process group: per block, then the root. Every rank
    must hold the same weights before this call (build with one seed, or load one checkpoint)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for m in D.modules():
        if isinstance(m, SHARD_UNITS):
            fully_shard(m, mesh=mesh)
    fully_shard(D, mesh=mesh)
    return D


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
