"""Ray Train: the EDM denoiser on embedding shards (DDP or FSDP2), checkpointed, resumable, tracked.

`train_loop_per_worker` only wires Ray (data shard, DDP, reporting); the step itself is
`ediffi.training.train_step`. Checkpoints are ediffi checkpoint directories (weights, EMA,
optimizer, step, RNG, data position) under `{output}/{name}/`, loadable without Ray. A resumed run
repeats the uninterrupted one: each step's randomness is seeded from (seed, rank, step) and an
epoch's data order from (seed, epoch) (see `EpochCache`).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ediffi.checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    TRAINER_FILE,
    load_checkpoint,
    load_training_state,
    read_optimizer_state,
    read_weights,
    save_checkpoint,
    save_training_state,
)
from ediffi.conditioning import DropoutConfig
from ediffi.distributed import (
    STRATEGIES,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    shard_denoiser,
)
from ediffi.edm import P_MEAN, P_STD, NoiseDistribution
from ediffi.ema import EMA
from ediffi.pipeline import SamplerConfig, grid, sample, to_uint8
from ediffi.presets import PRESETS, build_denoiser, get_preset, memory_format
from ediffi.sr import SRConfig, augment, degrade
from ediffi.training import step_seed, train_step
from ediffi_platform import faults
from ediffi_platform.config import from_dict, to_dict
from ediffi_platform.reader import EpochCache, ray_dataset, shard_files
from ediffi_platform.runs import data_encoders, is_checkpoint, latest_checkpoint, training_state
from ediffi_platform.shards import check_compatible
from ediffi_platform.storage import (
    StorageConfig,
    absolute,
    arrow_filesystem,
    filesystem,
    is_url,
    join,
    key,
    with_scheme,
)
from ediffi_platform.tracking import Tracker, TrackingConfig, flatten, usable

SIGMA_BUCKETS = (0.0, 0.05, 0.2, 1.0, 5.0, math.inf)  # per-noise-level loss buckets for metrics


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up."""

    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, ...] = (0.9, 0.99)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up length
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimiser step


@dataclass(frozen=True)
class TrainConfig:
    """The base (or expert) training job."""

    data: str = "data/embeddings"  # embedding shards from jobs/precompute_embeddings.py
    preset: str = "demo"  # network preset (ediffi.presets.PRESETS)
    steps: int = 1000  # optimiser steps in total (a resumed run ends at the same count)
    batch_size: int = 32  # micro-batch per worker
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser
    ema_decay: float = 0.999  # constant EMA decay (ignored when ema_sigma_rel is set)
    ema_sigma_rel: float | None = None  # EDM2 power EMA width instead of a constant decay
    dropout: DropoutConfig = field(default_factory=DropoutConfig)  # per-embedding dropout
    lowres: int = 0  # 0 = a base stage; else a super-resolution stage upsampling from this resolution
    aug_sigma_max: float = 0.5  # SR stages: noise-conditioning augmentation level ~ U[0, aug_sigma_max]
    P_mean: float = P_MEAN  # training noise: ln(sigma) ~ N(P_mean, P_std^2) (EDM's defaults)
    P_std: float = P_STD  # spread of ln(sigma)
    sigma_lo: float = 0.0  # train only on sigma in [sigma_lo, sigma_hi) (experts)
    sigma_hi: float = math.inf  # upper end of the noise interval
    dtype: str = "auto"  # autocast dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    memory_format: str = "auto"  # conv layout: auto (channels_last on CPU, default on GPU), channels_last, contiguous
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPUs per worker
    threads_per_worker: int = 0  # torch CPU threads per worker; 0 = its CPU share rounded up
    strategy: str = "ddp"  # ddp, or fsdp (FSDP2 fully_shard: weights, grads and optimizer state sharded)
    checkpoint_every: int = 100  # steps between checkpoints (the last step is always saved)
    log_every: int = 10  # steps between metric logs
    shuffle_buffer: int = 256  # local shuffle buffer (rows)
    cache_mb: float = 512  # a worker holds its data shard in memory if it fits; epochs permute it (0 = stream)
    seed: int = 0  # base seed (per-worker seeds derive from it)
    output: str = "runs"  # storage root for checkpoints (folder or s3://)
    name: str = "base"  # run name: checkpoints go to {output}/{name}/
    init_from: str | None = None  # start from these weights (a checkpoint directory), e.g. an expert's parent
    resume: str | None = None  # a new run starts from this checkpoint; once it has its own, re-runs go on from those
    max_failures: int = 1  # worker-failure restarts (from the last checkpoint)
    sample_images: int = 8  # images in the sample grid logged at each checkpoint (0 = none)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials
    ray_address: str | None = None  # Ray cluster address; unset = RAY_ADDRESS or a local cluster

    def noise(self) -> NoiseDistribution:
        """The training noise distribution, restricted to [sigma_lo, sigma_hi)."""
        return NoiseDistribution(self.P_mean, self.P_std, self.sigma_lo, self.sigma_hi)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for k in ("steps", "batch_size", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        memory_format(self.memory_format, "cpu")
        if self.strategy == "fsdp" and self.memory_format == "channels_last":
            raise ValueError("memory_format=channels_last is not supported with strategy=fsdp (use auto or contiguous)")
        self.noise()
        sr = PRESETS[self.preset].sr
        if sr and self.lowres < 1:
            raise ValueError(f"preset {self.preset!r} is a super-resolution stage: set lowres (its input resolution)")
        if not sr and self.lowres:
            raise ValueError(f"lowres is for super-resolution presets; {self.preset!r} is a base stage")
        if self.lowres and self.lowres >= PRESETS[self.preset].img_resolution:
            raise ValueError(f"lowres={self.lowres} must be below the preset's {PRESETS[self.preset].img_resolution}px")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.aug_sigma_max < 0:
            raise ValueError(f"aug_sigma_max must be >= 0, got {self.aug_sigma_max}")


def _bucket_losses(per_sample: torch.Tensor, sigma: torch.Tensor) -> dict[str, tuple[float, int]]:
    out = {}
    for lo, hi in itertools.pairwise(SIGMA_BUCKETS):
        m = (sigma >= lo) & (sigma < hi)
        if m.any():
            out[f"loss/sigma_{lo:g}-{hi:g}"] = (per_sample[m].sum().item(), int(m.sum()))
    return out


def _latest_checkpoint(cfg: TrainConfig) -> str | None:
    return latest_checkpoint(join(cfg.output, cfg.name), cfg.storage)[0]


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker: build, restore, then loop train_step -> EMA -> metrics -> checkpoint."""
    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray gives fractional-CPU workers one thread; use the configured share
        torch.set_num_threads(cfg.threads_per_worker or max(1, math.ceil(cfg.cpus_per_worker)))
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    net_cfg = get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 does not broadcast)
    D = build_denoiser(net_cfg)
    state = {"step": 0, "epoch": 0, "batches_into_epoch": 0, "mlflow_run_id": config.get("run_id")}
    ckpt = ray.train.get_checkpoint()  # after a worker failure: this run's latest registered one
    stored, stored_step = latest_checkpoint(join(cfg.output, cfg.name), cfg.storage)
    if stored and (
        ckpt is None or training_state(with_scheme(ckpt.path, cfg.output), cfg.storage)["step"] < stored_step
    ):
        # A worker can die after its checkpoint reached storage but before the controller
        # registered it; the newest complete checkpoint on storage is the one to resume from.
        ckpt = _checkpoint_at(stored, cfg.storage)
    if ckpt is None and config.get("resume"):  # a new run continuing an earlier one
        ckpt = _checkpoint_at(config["resume"], cfg.storage)
    restore = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            D.net.load_state_dict(load_checkpoint(d)[0].net.state_dict())
            restore = (read_weights(Path(d) / EMA_FILE), read_optimizer_state(d))
            state = {**load_training_state(d), "mlflow_run_id": config.get("run_id")}  # the driver's choice
    elif cfg.init_from:  # an expert starts from its parent: its weights, and its EMA continues the parent's
        with _checkpoint_at(cfg.init_from, cfg.storage).as_directory() as d:
            D.net.load_state_dict(load_checkpoint(d)[0].net.state_dict())
            if (Path(d) / EMA_FILE).exists():
                parent = load_training_state(d) if (Path(d) / TRAINER_FILE).exists() else {}
                restore = (read_weights(Path(d) / EMA_FILE), None)
                state["ema_updates"] = parent.get("ema_updates", parent.get("step", 0))
    # FSDP2 shards parameters along their first dimension: keep its default layout.
    D.to(device, memory_format=memory_format("contiguous" if cfg.strategy == "fsdp" else cfg.memory_format, device))
    model = (
        shard_denoiser(D, device) if cfg.strategy == "fsdp" else ray.train.torch.prepare_model(D, move_to_device=False)
    )
    ema = EMA(D.net, cfg.ema_decay, cfg.ema_sigma_rel)  # after sharding: sharded like the weights
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    if restore is not None:
        ema.load(restore[0], state.get("ema_updates", state["step"]))
        if restore[1] is not None:
            load_optimizer_state(model, opt, restore[1])
    tracker = Tracker(cfg.tracking, run_id=state.get("mlflow_run_id")) if rank == 0 else None
    noise = cfg.noise()
    gen = torch.Generator(device=device)  # re-seeded every step: a resumed run draws what the uninterrupted one did
    meta = config["meta"]
    shard = ray.train.get_dataset_shard("train")
    cache = EpochCache(cfg.cache_mb, agree=lambda fits: _all_workers(fits, device) if world > 1 else fits)
    pending: list[tuple[dict, int]] = []  # metrics waiting for the next checkpoint
    window: dict = {"loss": 0.0, "n": 0, "images": 0, "t": time.perf_counter(), "buckets": {}}
    while state["step"] < cfg.steps:
        skip = state["batches_into_epoch"]
        micro = []
        for i, (images, cond) in enumerate(
            cache.batches(shard, meta, cfg.batch_size, cfg.shuffle_buffer, seed=cfg.seed + state["epoch"])
        ):
            if i < skip:
                continue  # resume inside an epoch: skip what was already trained on
            state["batches_into_epoch"] = i + 1
            micro.append((images.to(device), cond.to(device)))
            last_batch = micro[-1]
            if len(micro) < cfg.optim.grad_accum:
                continue
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * min(1.0, (state["step"] + 1) / max(1, cfg.optim.warmup_steps))
            seed = step_seed(cfg.seed, rank, state["step"])
            torch.manual_seed(seed)  # the network's dropout
            gen.manual_seed(seed)  # noise levels, noise, embedding dropout, SR augmentation
            res = train_step(
                model,
                opt,
                micro,
                noise=noise,
                dropout=cfg.dropout,
                grad_clip=cfg.optim.grad_clip or None,
                dtype=dtype,
                generator=gen,
                sr=SRConfig(cfg.lowres, cfg.aug_sigma_max) if cfg.lowres else None,
            )
            micro = []
            ema.update(D.net)
            state["step"] += 1
            _accumulate(window, res, cfg.batch_size * cfg.optim.grad_accum * world)
            if state["step"] == config.get("fail_at_step") and rank == world - 1:
                faults.die_once(config["fail_marker"], cfg.storage)  # testing only (EDIFFI_TEST_FAULTS)
            last = state["step"] == cfg.steps
            metrics = (
                _window_metrics(window, net_cfg, state["step"])
                if (state["step"] % cfg.log_every == 0 or last)
                else None
            )
            if metrics and tracker:
                # Held back until the next checkpoint is committed: steps redone after a failure
                # are then logged once, and MLflow's series stays continuous.
                pending.append((dict(metrics), state["step"]))
                print(
                    f"[train {cfg.name}] step {state['step']}/{cfg.steps} loss {metrics['loss']:.4f} "
                    f"{metrics['images_per_s']:.1f} img/s",
                    flush=True,
                )
            if state["step"] % cfg.checkpoint_every == 0 or last:
                state["ema_updates"] = ema.updates
                state["mlflow_run_id"] = tracker.run_id if tracker else state.get("mlflow_run_id")
                _report(
                    cfg,
                    net_cfg,
                    model,
                    ema,
                    opt,
                    state,
                    metrics or {},
                    rank,
                    tracker,
                    last_batch,
                    config.get("encoders"),
                )
                if tracker:
                    for m, at in pending:
                        tracker.metrics(m, at)
                    pending.clear()
            if last:
                break
        else:
            state["epoch"] += 1
            state["batches_into_epoch"] = 0
    if tracker:
        tracker.finish()
    return {"step": state["step"], "mlflow_run_id": state.get("mlflow_run_id")}


def _all_workers(flag: bool, device: torch.device) -> bool:
    """True when flag is True on every worker (a collective: every worker must call it)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _accumulate(window: dict, res, images: int) -> None:
    window["loss"] += res.loss.item()
    window["n"] += 1
    window["sigma_min"] = min(window.get("sigma_min", math.inf), res.sigma.min().item())
    window["sigma_max"] = max(window.get("sigma_max", 0.0), res.sigma.max().item())
    window["images"] += images
    for k, (s, n) in _bucket_losses(res.per_sample, res.sigma).items():
        a, b = window["buckets"].get(k, (0.0, 0))
        window["buckets"][k] = (a + s, b + n)


def _window_metrics(window: dict, net_cfg, step: int) -> dict:
    dt = time.perf_counter() - window["t"]
    out = {
        "loss": window["loss"] / max(1, window["n"]),
        "images_per_s": window["images"] / dt,
        "step_time_s": dt / max(1, window["n"]),
    }
    out.update({k: s / n for k, (s, n) in window["buckets"].items()})
    out.update({"sigma/min": window.pop("sigma_min", math.nan), "sigma/max": window.pop("sigma_max", math.nan)})
    if torch.cuda.is_available():
        from ediffi.presets import forward_flops

        flops = 3 * forward_flops(net_cfg) * out["images_per_s"]
        out["achieved_tflops"] = flops / 1e12
        out["mfu"] = flops / 989e12  # against H100/H200 dense bf16 peak
    window.update(loss=0.0, n=0, images=0, t=time.perf_counter(), buckets={})
    return out


def _report(cfg, net_cfg, model, ema, opt, state, metrics, rank, tracker, last_batch, encoders) -> None:
    """Every rank gathers the full state (collectives under FSDP2) and calls report; rank 0 writes
    the checkpoint and logs a sample grid."""
    weights, ema_weights = full_model_state(model), ema.full_state_dict()
    optim_state = full_optimizer_state(model, opt)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_checkpoint(
                d,
                net_cfg,
                weights,
                ema=ema_weights,
                metadata={
                    "step": state["step"],
                    "sigma_lo": cfg.sigma_lo,
                    "sigma_hi": cfg.sigma_hi,
                    "run": cfg.name,
                    "encoders": encoders,  # what made the training embeddings: generation encodes alike
                },
            )
            save_training_state(d, optim_state, dict(state))
            checkpoint = ray.train.Checkpoint.from_directory(d)
            if tracker and cfg.sample_images:
                tracker.image(
                    _sample_grid(net_cfg, ema_weights, last_batch, cfg.sample_images, cfg.lowres),
                    f"samples/step_{state['step']:07d}.png",
                )
        ray.train.report({**metrics, "step": state["step"]}, checkpoint=checkpoint)
        if tracker:
            tracker.tag("checkpoint.latest_step", str(state["step"]))


@torch.no_grad()
def _sample_grid(net_cfg, ema_weights: dict, batch, n: int, lowres: int) -> np.ndarray:
    """EMA samples for a few training conditions (SR stages: upsampling their degraded images)."""
    D = build_denoiser(net_cfg)
    D.net.load_state_dict(ema_weights)
    images, cond = batch[0][:n].to("cpu"), batch[1][:n].to("cpu")
    if lowres:
        cond = augment(cond, degrade(images, lowres), torch.full((len(cond),), 0.1))
    R = net_cfg.img_resolution
    imgs = sample(D.eval(), cond, (3, R, R), list(range(len(cond))), SamplerConfig(steps=12, guidance=2.0))
    return grid(to_uint8(imgs)).numpy()


def validate_training(cfg: TrainConfig) -> dict:
    """The checks that need no worker: data present, shards' schema and resolution vs the model.
    Returns the shards' layout metadata."""
    _, meta = shard_files(cfg.data, cfg.storage)
    net_cfg = get_preset(cfg.preset)
    check_compatible(meta, net_cfg.cond, net_cfg.img_resolution, cfg.data)
    return meta


def run_training(cfg: TrainConfig, progress=print) -> dict:
    """Validate everything the workers will need, then fit (resuming from the latest checkpoint)."""
    from ray.train.torch import TorchTrainer

    # 1. Before any worker starts: data, schema vs model, tracking.
    meta = validate_training(cfg)
    tracking = usable(cfg.tracking, "training")
    output = absolute(cfg.output)
    cfg = replace(cfg, tracking=tracking, output=output)
    if cfg.init_from:
        _checkpoint_at(cfg.init_from, cfg.storage)  # fails now, naming the path, if it is not a checkpoint

    # 2. Resume: the latest checkpoint of this run name, else an explicit one (as the workers do:
    # a re-run of a job started from `resume` goes on from its own progress).
    resume = _latest_checkpoint(cfg) or cfg.resume
    run_id = None
    if resume:
        state = training_state(resume, cfg.storage)
        own = key(resume).startswith(key(join(output, cfg.name)) + "/")
        run_id = state.get("mlflow_run_id") if own else None  # another run's checkpoint: a new MLflow run
        progress(f"train {cfg.name}: resuming from {resume} (step {state['step']})")
        if state["step"] >= cfg.steps:
            progress(f"train {cfg.name}: already at step {state['step']} >= {cfg.steps}; nothing to do")
            return {"checkpoint": resume, "step": state["step"], "mlflow_run_id": run_id}
    if run_id is None:
        tracker = Tracker(tracking, run_name=cfg.name, parent_run_id=tracking.parent_run_id)
        tracker.params(flatten(to_dict(cfg)))
        run_id = tracker.run_id

    # 3. Fit.
    fs, _ = filesystem(output, cfg.storage)
    ds, _ = ray_dataset(cfg.data, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "meta": meta,
            "run_id": run_id,
            "fail_at_step": faults.planned(f"train:{cfg.name}"),
            "fail_marker": join(output, cfg.name, faults.MARKER),
            "resume": resume,
            "encoders": data_encoders(cfg.data, cfg.storage),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=key(output),
            storage_filesystem=arrow_filesystem(fs) if is_url(output) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
    )
    result = trainer.fit()
    done = result.return_value or {}
    path = with_scheme(result.checkpoint.path, output) if result.checkpoint else None
    progress(f"train {cfg.name}: finished at step {done.get('step')}; checkpoint {path}")
    return {"checkpoint": path, "step": done.get("step"), "mlflow_run_id": run_id}


def _checkpoint_at(uri: str, storage: StorageConfig) -> ray.train.Checkpoint:
    """A checkpoint directory (local or s3://) as a Ray checkpoint, for `as_directory()`."""
    if not is_checkpoint(uri, storage):
        raise FileNotFoundError(f"{uri}: not an ediffi checkpoint (no {CONFIG_FILE})")
    fs, path = filesystem(uri, storage)
    return ray.train.Checkpoint(path, filesystem=arrow_filesystem(fs) if is_url(uri) else None)
