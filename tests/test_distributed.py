"""FSDP2 on CPU (gloo, 2 processes): a sharded step equals the single-process step; full state
(weights, EMA, optimizer) gathers, saves and restores into a sharded model."""

import os
import socket

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


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 3, 16, 16, generator=g), random_cond(get_preset("tiny").cond, 3, seed=rank)


def _loss(D, rank: int) -> torch.Tensor:
    x, cond = _batch(rank)
    return edm_loss(D, x, cond, NoiseDistribution(), torch.Generator().manual_seed(rank))[0].mean()


def _fresh():
    torch.manual_seed(0)
    D = build_denoiser(get_preset("tiny"))
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
