"""FSDP2 on CPU (gloo, 2 processes): a sharded step equals the single-process step; full state
(weights, EMA, optimizer) gathers, saves and restores into a sharded model. DDP and FSDP2 alike:
accumulated micro-batches communicate gradients once, and running-statistics buffers agree."""

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import random_cond
from ediffi.checkpoint import read_optimizer_state, save_training_state
from ediffi.distributed import full_model_state, full_optimizer_state, load_optimizer_state, shard_denoiser
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.ema import EMA
from ediffi.presets import build_denoiser, get_preset
from ediffi.training import train_step


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 3, 16, 16, generator=g), random_cond(get_preset("tiny").cond, 3, seed=rank)


def _loss(D, rank: int) -> torch.Tensor:
    x, cond = _batch(rank)
    return edm_loss(D, x, cond, NoiseDistribution(), torch.Generator().manual_seed(rank))[0].mean()


def _fresh(cfg=None):
    torch.manual_seed(0)
    D = build_denoiser(cfg or get_preset("tiny"))
    with torch.no_grad():  # zero-initialised output layers would leave most gradients at zero
        for p in D.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return D


def _step(model, opt, ema, D, losses) -> None:
    opt.zero_grad()
    losses.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()
    ema.update(D.net)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        D = _fresh()
        model = shard_denoiser(D, "cpu")
        ema = EMA(D.net, decay=0.5)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _step(model, opt, ema, D, _loss(model, rank))  # gradients average over ranks: the mean of both losses
        weights, ema_w, osd = full_model_state(model), ema.full_state_dict(), full_optimizer_state(model, opt)
        if rank == 0:
            save_file(weights, f"{out}/weights1.safetensors")
            save_file(ema_w, f"{out}/ema1.safetensors")
            save_training_state(out, osd, {"step": 1})
        dist.barrier()
        # A second sharded model restored from the saved full state takes the same second step.
        D2 = _fresh()
        D2.net.load_state_dict(load_file(f"{out}/weights1.safetensors"))
        model2 = shard_denoiser(D2, "cpu")
        ema2 = EMA(D2.net, decay=0.5)
        ema2.load(load_file(f"{out}/ema1.safetensors"), 1)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
        load_optimizer_state(model2, opt2, read_optimizer_state(out))
        _step(model2, opt2, ema2, D2, _loss(model2, rank))
        weights2, ema2_w = full_model_state(model2), ema2.full_state_dict()
        if rank == 0:
            save_file(weights2, f"{out}/weights2.safetensors")
            save_file(ema2_w, f"{out}/ema2.safetensors")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_steps_and_checkpoint_round_trip_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    D = _fresh()
    ema = EMA(D.net, decay=0.5)
    opt = torch.optim.AdamW(D.parameters(), lr=1e-3)
    for step in (1, 2):
        _step(D, opt, ema, D, (_loss(D, 0) + _loss(D, 1)) / 2)
        got = load_file(str(tmp_path / f"weights{step}.safetensors"))
        got_ema = load_file(str(tmp_path / f"ema{step}.safetensors"))
        assert set(got) == set(D.net.state_dict())
        moved = 0
        for k, v in D.net.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=2e-5, rtol=0, msg=f"step {step} {k}")  # 2% of one lr step
            torch.testing.assert_close(got_ema[k], ema.state_dict()[k], atol=2e-5, rtol=0)
            moved += int(not torch.equal(v, _fresh().net.state_dict()[k]))
        assert moved > 100  # the step changed (nearly) every tensor, so the comparison means something
    osd = read_optimizer_state(tmp_path)
    assert "net.enc.0.weight" in osd["state"] or any(k.startswith("net.") for k in osd["state"])


def _wrap(D, strategy: str):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(D) if strategy == "ddp" else shard_denoiser(D, "cpu")


def _accumulated_step(model, D, rank: int) -> list[bool]:
    """One train_step over two micro-batches; per forward, whether gradients were already
    communicated in this step (DDP: a comm-hook call; FSDP2: a reduce-scatter)."""
    calls, reduce_scatter = [], dist.reduce_scatter_single
    if hasattr(model, "register_comm_hook"):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket))
    else:  # FSDP2 reduces each group's gradients with dist.reduce_scatter_single
        dist.reduce_scatter_single = lambda *a, **kw: calls.append(1) or reduce_scatter(*a, **kw)
    communicated = []
    D.net.register_forward_pre_hook(lambda *_: communicated.append(bool(calls)))
    batches = [_batch(rank + 2 * i) for i in range(2)]  # different data on each rank and micro-batch
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        train_step(model, opt, batches, grad_clip=None, generator=torch.Generator().manual_seed(rank))
    finally:
        dist.reduce_scatter_single = reduce_scatter
    assert calls or model is D  # a data-parallel step did communicate
    return communicated


def _accum_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        results = {}
        for strategy in ("ddp", "fsdp"):
            # The expected gradient: each rank's accumulated one, averaged over ranks.
            ref = _fresh()
            _accumulated_step(ref, ref, rank)
            want = [p.grad.clone() for p in ref.parameters()]
            for g in want:
                dist.all_reduce(g, op=dist.ReduceOp.AVG)
            D = _fresh()
            communicated = _accumulated_step(_wrap(D, strategy), D, rank)
            got = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in D.parameters()]
            err = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
            # Running statistics (pooled-T5 standardisation): what every forward saw, on each rank.
            P = _fresh(replace(get_preset("tiny"), pooled_t5=True))
            model, seen = _wrap(P, strategy), []
            P.net.register_forward_pre_hook(lambda m, _, seen=seen: seen.append(m.t5_mean.clone()))
            _accumulated_step(model, P, rank)
            both = [None, None]
            dist.all_gather_object(both, seen)
            results[strategy] = {
                "communicated_before_forward": communicated,
                "grad_err": err,
                "grad_max": max(g.abs().max().item() for g in want),
                "buffers_agree": [torch.equal(a, b) for a, b in zip(*both, strict=True)],
                "buffers_moved": not torch.equal(seen[-1], seen[0]),
            }
        if rank == 0:
            (Path(out) / "accum.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
def test_accumulated_micro_batches_sync_once_and_buffers_agree_under_ddp_and_fsdp2(tmp_path):
    mp.spawn(_accum_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    results = json.loads((tmp_path / "accum.json").read_text())
    # Per strategy: gradients communicated before each micro-batch's forward (none before the last),
    # and whether both ranks' forwards saw the same statistics (rank 0's, as DDP broadcasts them).
    seen = {s: (r["communicated_before_forward"], r["buffers_agree"]) for s, r in results.items()}
    assert seen == {s: ([False, False], [True, True]) for s in ("ddp", "fsdp")}, results
    for r in results.values():
        assert r["grad_err"] < 1e-5 * r["grad_max"] and r["buffers_moved"], results  # the average, all the same
