"""Ray Data actor pools: the one way the precompute, generation and evaluation jobs size and start theirs.

Each job's config keeps the same flat fields (concurrency, num_cpus, num_gpus, threads_per_actor,
batch_size). The driver checks them (`check_pool`) and passes `pool_args(cfg)` to `map_batches`
(resources set at the call, a fixed pool through `compute=ActorPoolStrategy(size=...)`;
`map_batches(concurrency=...)` is deprecated since Ray 2.51); each actor's `__init__` calls
`start_actor(cfg)` for its torch threads and device.
"""

from __future__ import annotations

import math
from typing import Protocol

import ray
import torch


class PoolSettings(Protocol):
    """The actor-pool fields a job's config carries, under these names."""

    batch_size: int  # rows per actor call
    concurrency: int  # actors in the pool
    num_cpus: float  # CPUs per actor (fractional keeps small clusters from stalling)
    num_gpus: float  # GPUs per actor
    threads_per_actor: int  # torch CPU threads per actor; 0 = its CPU share rounded up


def check_pool(cfg: PoolSettings) -> None:
    """Raise ValueError naming the field when a pool setting cannot work (NaN fails too)."""
    for name in ("batch_size", "concurrency"):
        if not getattr(cfg, name) >= 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.num_cpus > 0:
        raise ValueError(f"num_cpus must be > 0, got {cfg.num_cpus}")
    if not cfg.num_gpus >= 0:
        raise ValueError(f"num_gpus must be >= 0, got {cfg.num_gpus}")
    if not cfg.threads_per_actor >= 0:
        raise ValueError(f"threads_per_actor must be >= 0 (0 = the CPU share rounded up), got {cfg.threads_per_actor}")


def pool_args(cfg: PoolSettings) -> dict:
    """The `map_batches` keywords of a fixed pool of `concurrency` actors with these resources."""
    return {
        "batch_size": cfg.batch_size,
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus or None,
        "compute": ray.data.ActorPoolStrategy(size=cfg.concurrency),
    }


def actor_threads(cfg: PoolSettings) -> int:
    """torch CPU threads of one actor: threads_per_actor, else its CPU share rounded up."""
    return cfg.threads_per_actor or max(1, math.ceil(cfg.num_cpus))


def actor_device(cfg: PoolSettings) -> str:
    """cuda when the actor asked for GPUs and CUDA is there, else cpu."""
    return "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def start_actor(cfg: PoolSettings) -> str:
    """In an actor's `__init__`: set torch's CPU threads; returns the device the actor runs on."""
    torch.set_num_threads(actor_threads(cfg))
    return actor_device(cfg)
