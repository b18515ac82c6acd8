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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
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
from ediffi.compilation import check_compile, compile_blocks, use_compile
from ediffi.conditioning import CondSpec, DropoutConfig
from ediffi.distributed import (
    STRATEGIES,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    shard_denoiser,
)
from ediffi.edm import P_MEAN, P_STD, EDMPrecond, NoiseDistribution
from ediffi.ema import EMA
from ediffi.pipeline import SamplerConfig, grid, sample, to_uint8
from ediffi.presets import PRESETS, build_denoiser, memory_format
from ediffi.sr import SRConfig, augment, degrade
from ediffi.training import checkpoint_activations, optimizer_options, step_seed, train_step
from ediffi.unet import UNetConfig
from ediffi_platform import faults
from ediffi_platform.config import from_dict, to_dict
from ediffi_platform.ingest import DROP_REASONS, check_schema, list_shards
from ediffi_platform.precompute import PrecomputeConfig, stream_dataset, stream_meta
from ediffi_platform.reader import EpochCache, ray_dataset, shard_files
from ediffi_platform.runs import data_encoders, is_checkpoint, latest_checkpoint, training_state
from ediffi_platform.shards import ShardMeta, check_shards_fit
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

    data: str = "data/embeddings"  # embedding shards from jobs/precompute_embeddings.py (unused with stream)
    stream: PrecomputeConfig | None = None  # encode image-text shards on the fly instead (precompute's keys)
    preset: str = "demo"  # network preset (ediffi.presets.PRESETS)
    model: dict = field(
        default_factory=dict
    )  # network fields over the preset's, e.g. model.model_channels=96; model.cond.* defaults to the data's shapes
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
    compile: bool | str = "auto"  # torch.compile each block: auto (where bench_model.py shows a win: GPU), true, false
    activation_checkpointing: bool = (
        False  # recompute each block's activations in the backward (less memory, ~1/3 more compute)
    )
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

    def network(self, data: CondSpec | None = None) -> UNetConfig:
        """The network this run trains: the preset with `model`'s fields over it. Its conditioning
        shapes are the data's (`data`, from the shards' metadata) unless `model.cond` sets them; the
        training checks explicit ones against the data."""
        fields_ = to_dict(PRESETS[self.preset])
        cond, given = fields_.pop("cond"), self.model.get("cond", {})
        if isinstance(given, dict):
            cond = asdict(data) if data is not None and not given else {**cond, **given}
        else:
            cond = given  # not a mapping: from_dict names it
        return from_dict(
            UNetConfig, {**fields_, **{k: v for k, v in self.model.items() if k != "cond"}, "cond": cond}, "model"
        )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        net = self.network()  # unknown or bad model.* fields are named here
        for k in ("steps", "batch_size", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        memory_format(self.memory_format, "cpu")
        check_compile(self.compile)
        if self.strategy == "fsdp" and self.memory_format == "channels_last":
            raise ValueError("memory_format=channels_last is not supported with strategy=fsdp (use auto or contiguous)")
        self.noise()
        if net.sr and self.lowres < 1:
            raise ValueError(f"preset {self.preset!r} is a super-resolution stage: set lowres (its input resolution)")
        if not net.sr and self.lowres:
            raise ValueError(f"lowres is for super-resolution presets; {self.preset!r} is a base stage")
        if self.lowres and self.lowres >= net.img_resolution:
            raise ValueError(f"lowres={self.lowres} must be below the network's {net.img_resolution}px")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.aug_sigma_max < 0:
            raise ValueError(f"aug_sigma_max must be >= 0, got {self.aug_sigma_max}")


@dataclass
class TrainState:
    """Where training is, saved in every checkpoint (trainer.json) so a resumed run repeats the
    uninterrupted one: optimiser steps, position in the data, EMA updates, the MLflow run."""

    step: int = 0
    epoch: int = 0
    batches_into_epoch: int = 0  # micro-batches of the current epoch already trained on
    ema_updates: int | None = None  # None = as many as steps (an expert continues its parent's count)
    mlflow_run_id: str | None = None

    @classmethod
    def from_dict(cls, doc: dict) -> TrainState:
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


@dataclass
class _Model:
    """The denoiser as this worker trains it."""

    net_cfg: UNetConfig
    D: EDMPrecond  # unwrapped: the EMA follows it, checkpoints and sample grids read it
    wrapped: torch.nn.Module  # D under DDP or FSDP2
    layout: torch.memory_format  # its convolutions' memory format: training images are fed in it
    ema: EMA
    opt: torch.optim.Optimizer


@dataclass
class _Window:
    """Metrics summed over the steps since the last log."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    sigma_min: float = math.inf
    sigma_max: float = -math.inf
    buckets: dict[str, tuple[float, int]] = field(default_factory=dict)  # per noise level: (sum, count)
    data_s: float = 0.0  # time spent waiting for the data (reading, decoding, encoding when streaming)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, res, images: int, waited: float = 0.0) -> None:
        self.data_s += waited
        self.loss += res.loss.item()
        self.steps += 1
        self.images += images
        self.sigma_min = min(self.sigma_min, res.sigma.min().item())
        self.sigma_max = max(self.sigma_max, res.sigma.max().item())
        for lo, hi in itertools.pairwise(SIGMA_BUCKETS):
            m = (res.sigma >= lo) & (res.sigma < hi)
            if m.any():
                s, n = self.buckets.get(f"loss/sigma_{lo:g}-{hi:g}", (0.0, 0))
                self.buckets[f"loss/sigma_{lo:g}-{hi:g}"] = (s + res.per_sample[m].sum().item(), n + int(m.sum()))

    def metrics(self, net_cfg: UNetConfig) -> dict:
        dt = time.perf_counter() - self.t0
        out = {"loss": self.loss / self.steps, "images_per_s": self.images / dt, "step_time_s": dt / self.steps}
        out["data_wait_frac"] = self.data_s / dt
        out.update({k: s / n for k, (s, n) in self.buckets.items()})
        out.update({"sigma/min": self.sigma_min, "sigma/max": self.sigma_max})
        if torch.cuda.is_available():
            from ediffi.presets import forward_flops

            flops = 3 * forward_flops(net_cfg) * out["images_per_s"]
            out["achieved_tflops"] = flops / 1e12
            out["mfu"] = flops / 989e12  # against H100/H200 dense bf16 peak
        return out


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker: restore, then per optimiser step train_step -> EMA -> metrics -> checkpoint."""
    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray gives fractional-CPU workers one thread; use the configured share
        torch.set_num_threads(cfg.threads_per_worker or max(1, math.ceil(cfg.cpus_per_worker)))
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype

    # Restore, then distribute: weights before sharding, EMA and optimizer state after.
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 does not broadcast)
    net_cfg = cfg.network(config["meta"].spec)
    D = build_denoiser(net_cfg)
    state, ema_weights, optim_state = _restore(cfg, D, config)
    m = _distribute(cfg, D, device, state, ema_weights, optim_state, compile_options=config.get("compile_options", {}))
    tracker = Tracker(cfg.tracking, run_id=state.mlflow_run_id) if rank == 0 else None

    # Train. Metrics are held back until the next checkpoint is committed: steps redone after a
    # failure are then logged once, and MLflow's series stays continuous.
    shard = ray.train.get_dataset_shard("train")
    cache = EpochCache(cfg.cache_mb, agree=lambda fits: _all_workers(fits, device) if world > 1 else fits)
    gen = torch.Generator(device=device)  # re-seeded every step: a resumed run draws what the uninterrupted one did
    window, pending = _Window(), []
    while state.step < cfg.steps:
        for waited, micro in _waited(
            _optimizer_steps(cfg, cache, shard, config["meta"], state, device, layout=m.layout)
        ):
            res = _step(cfg, m, micro, step=state.step, rank=rank, generator=gen, dtype=dtype)
            state.step += 1
            window.add(res, cfg.batch_size * cfg.optim.grad_accum * world, waited)
            if state.step == config.get("fail_at_step") and rank == world - 1:
                faults.die_once(config["fail_marker"], cfg.storage)  # testing only (EDIFFI_TEST_FAULTS)
            last = state.step == cfg.steps
            metrics = {}
            if state.step % cfg.log_every == 0 or last:
                metrics, window = window.metrics(m.net_cfg), _Window()
                if tracker:
                    pending.append((metrics, state.step))
                    _print_progress(cfg, state.step, metrics)
            if state.step % cfg.checkpoint_every == 0 or last:
                state.ema_updates = m.ema.updates
                state.mlflow_run_id = tracker.run_id if tracker else state.mlflow_run_id
                _checkpoint(
                    cfg, m, state, metrics, rank=rank, tracker=tracker, batch=micro[-1], encoders=config.get("encoders")
                )
                if tracker:
                    for metrics_at, at in pending:
                        tracker.metrics(metrics_at, at)
                    pending.clear()
            if last:
                break
    stream = _stream_counts(cache, device, world) if cfg.stream else None
    if tracker:
        if stream:
            counts = {
                "data/rows_read": stream["read"],
                **{f"data/dropped_{r}": n for r, n in stream["dropped"].items()},
            }
            tracker.metrics(counts, state.step)
        tracker.finish()
    compiled = sum(getattr(b, "_compiled_call_impl", None) is not None for b in m.D.modules())
    return {"step": state.step, "mlflow_run_id": state.mlflow_run_id, "stream": stream, "compiled_blocks": compiled}


def _restore(cfg: TrainConfig, D: EDMPrecond, config: dict) -> tuple[TrainState, dict | None, dict | None]:
    """Load into D the weights this run goes on from: its own latest checkpoint (after a worker
    failure, or on a re-run), else `resume`, else its parent's (`init_from`: weights and EMA, whose
    update count continues). Returns the state and the EMA / optimizer state to load after sharding."""
    run_id = config.get("run_id")  # the driver's choice
    ckpt = _resume_point(cfg, config.get("resume"))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            D.net.load_state_dict(load_checkpoint(d)[0].net.state_dict())
            state = replace(TrainState.from_dict(load_training_state(d)), mlflow_run_id=run_id)
            return state, read_weights(Path(d) / EMA_FILE), read_optimizer_state(d)
    state = TrainState(mlflow_run_id=run_id)
    if not cfg.init_from:
        return state, None, None
    with _checkpoint_at(cfg.init_from, cfg.storage).as_directory() as d:
        D.net.load_state_dict(load_checkpoint(d)[0].net.state_dict())
        if not (Path(d) / EMA_FILE).exists():
            return state, None, None
        parent = load_training_state(d) if (Path(d) / TRAINER_FILE).exists() else {}
        state.ema_updates = parent.get("ema_updates", parent.get("step", 0))
        return state, read_weights(Path(d) / EMA_FILE), None


def _resume_point(cfg: TrainConfig, resume: str | None) -> ray.train.Checkpoint | None:
    """This run's latest checkpoint, else the `resume` one (None for a fresh start)."""
    ckpt = ray.train.get_checkpoint()  # after a worker failure: this run's latest registered one
    stored, stored_step = latest_checkpoint(join(cfg.output, cfg.name), cfg.storage)
    if stored and (
        ckpt is None or training_state(with_scheme(ckpt.path, cfg.output), cfg.storage)["step"] < stored_step
    ):
        # A worker can die after its checkpoint reached storage but before the controller
        # registered it; the newest complete checkpoint on storage is the one to resume from.
        return _checkpoint_at(stored, cfg.storage)
    if ckpt is None and resume:  # a new run continuing an earlier one
        return _checkpoint_at(resume, cfg.storage)
    return ckpt


def _distribute(
    cfg, D, device, state: TrainState, ema_weights: dict | None, optim_state: dict | None, *, compile_options: dict
) -> _Model:
    """D on the device under DDP or FSDP2, its EMA (sharded like the weights) and optimizer, restored."""
    # FSDP2 shards parameters along their first dimension: keep its default layout.
    layout = memory_format("contiguous" if cfg.strategy == "fsdp" else cfg.memory_format, device)
    D.to(device, memory_format=layout)
    if cfg.activation_checkpointing:
        checkpoint_activations(D)
    if use_compile(cfg.compile, device, "train"):
        compile_blocks(D, **compile_options)  # before sharding: FSDP2 wraps the compiled blocks
    wrapped = (
        shard_denoiser(D, device) if cfg.strategy == "fsdp" else ray.train.torch.prepare_model(D, move_to_device=False)
    )
    ema = EMA(D.net, cfg.ema_decay, cfg.ema_sigma_rel)  # after sharding: sharded like the weights
    o = cfg.optim
    opt = torch.optim.AdamW(
        wrapped.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **optimizer_options(device)
    )
    if ema_weights is not None:
        ema.load(ema_weights, state.step if state.ema_updates is None else state.ema_updates)
    if optim_state is not None:
        load_optimizer_state(wrapped, opt, optim_state)
    return _Model(D.net.cfg, D, wrapped, layout, ema, opt)


def _waited(items: Iterator) -> Iterator[tuple[float, object]]:
    """Each item with the seconds spent waiting for it."""
    while True:
        t = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        yield time.perf_counter() - t, item


def _optimizer_steps(cfg: TrainConfig, cache: EpochCache, shard, meta: dict, state: TrainState, device, *, layout):
    """The rest of the current epoch as optimiser steps (lists of grad_accum micro-batches), from
    where `state` says training is; the epoch run to its end moves `state` to the next one."""
    skip, micro = state.batches_into_epoch, []
    for i, (images, cond) in enumerate(
        cache.batches(shard, meta, cfg.batch_size, cfg.shuffle_buffer, seed=cfg.seed + state.epoch)
    ):
        if i < skip:
            continue  # resume inside an epoch: skip what was already trained on
        state.batches_into_epoch = i + 1
        micro.append((images.to(device, memory_format=layout), cond.to(device)))
        if len(micro) == cfg.optim.grad_accum:
            yield micro
            micro = []
    state.epoch += 1
    state.batches_into_epoch = 0


def _step(cfg: TrainConfig, m: _Model, micro: list, *, step: int, rank: int, generator, dtype: str):
    """One optimiser step (warm-up learning rate, randomness seeded from (seed, rank, step)), then EMA."""
    for g in m.opt.param_groups:
        g["lr"] = cfg.optim.lr * min(1.0, (step + 1) / max(1, cfg.optim.warmup_steps))
    seed = step_seed(cfg.seed, rank, step)
    torch.manual_seed(seed)  # the network's dropout
    generator.manual_seed(seed)  # noise levels, noise, embedding dropout, SR augmentation
    res = train_step(
        m.wrapped,
        m.opt,
        micro,
        noise=cfg.noise(),
        dropout=cfg.dropout,
        grad_clip=cfg.optim.grad_clip or None,
        dtype=dtype,
        generator=generator,
        sr=SRConfig(cfg.lowres, cfg.aug_sigma_max) if cfg.lowres else None,
    )
    m.ema.update(m.D.net)
    return res


def _print_progress(cfg: TrainConfig, step: int, metrics: dict) -> None:
    print(
        f"[train {cfg.name}] step {step}/{cfg.steps} loss {metrics['loss']:.4f} {metrics['images_per_s']:.1f} img/s",
        flush=True,
    )


def _all_workers(flag: bool, device: torch.device) -> bool:
    """True when flag is True on every worker (a collective: every worker must call it)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _stream_counts(cache: EpochCache, device: torch.device, world: int) -> dict:
    """The image-text rows this run's stream read and, by reason, dropped (every pass counts),
    summed over the workers (a collective when there are several)."""
    counts = torch.tensor([cache.rows_read, *(cache.dropped[r] for r in DROP_REASONS)], device=device)
    if world > 1:
        torch.distributed.all_reduce(counts)
    read, *dropped = counts.tolist()
    return {"read": int(read), "dropped": {r: int(n) for r, n in zip(DROP_REASONS, dropped, strict=True) if n}}


def _checkpoint(cfg: TrainConfig, m: _Model, state: TrainState, metrics: dict, *, rank, tracker, batch, encoders):
    """Every rank gathers the full state (collectives under FSDP2) and calls report; rank 0 writes
    the checkpoint and logs a sample grid of `batch`'s conditions."""
    weights, ema_weights = full_model_state(m.wrapped), m.ema.full_state_dict()
    optim_state = full_optimizer_state(m.wrapped, m.opt)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            metadata = {
                "step": state.step,
                "sigma_lo": cfg.sigma_lo,
                "sigma_hi": cfg.sigma_hi,
                "run": cfg.name,
                "encoders": encoders,  # what made the training embeddings: generation encodes alike
            }
            save_checkpoint(d, m.net_cfg, weights, ema=ema_weights, metadata=metadata)
            save_training_state(d, optim_state, asdict(state))
            checkpoint = ray.train.Checkpoint.from_directory(d)
            if tracker and cfg.sample_images:
                grid_ = _sample_grid(m.net_cfg, ema_weights, batch, cfg.sample_images, cfg.lowres)
                tracker.image(grid_, f"samples/step_{state.step:07d}.png")
        ray.train.report({**metrics, "step": state.step}, checkpoint=checkpoint)
        if tracker:
            tracker.tag("checkpoint.latest_step", str(state.step))


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


def validate_training(cfg: TrainConfig) -> ShardMeta:
    """The checks that need no worker: data present, shards' schema and resolution vs the model.
    Returns the rows' layout metadata (of the shards, or of the rows the stream will encode)."""
    if cfg.stream is not None:
        for p in list_shards(cfg.stream.input.path, cfg.storage):
            check_schema(p, cfg.stream.input, cfg.storage)
        meta, where = stream_meta(cfg.stream), cfg.stream.input.path
    else:
        meta, where = shard_files(cfg.data, cfg.storage)[1], cfg.data
    net_cfg = cfg.network(meta.spec)
    check_shards_fit(meta, net_cfg.cond, net_cfg.img_resolution, where)
    return meta


def _check_stream_fits(cfg: TrainConfig, progress) -> None:
    """Warn when the stream's decode task and encoder actors cannot run beside the training workers
    on the CPUs the cluster has now: unless it scales up, the stream would never start."""
    have = ray.cluster_resources().get("CPU", 0.0)
    s = cfg.stream
    need = cfg.num_workers * cfg.cpus_per_worker + s.concurrency * s.num_cpus + s.decode_cpus
    if need > have + 1e-9:
        progress(
            f"train {cfg.name}: warning: {cfg.num_workers} workers x {cfg.cpus_per_worker} CPU, {s.concurrency} "
            f"encoder actors x {s.num_cpus} and a decode task of {s.decode_cpus} need {need:g} CPUs; the cluster "
            f"has {have:g}: unless it scales up, the stream never starts (lower cpus_per_worker, "
            f"stream.num_cpus or stream.decode_cpus)"
        )


def _datasets(cfg: TrainConfig) -> tuple[dict, dict | None]:
    """Ray Train's datasets (embedding shards, or image-text shards encoded as they stream) and the
    encoder settings the rows were made with."""
    if cfg.stream is not None:
        return {"train": stream_dataset(replace(cfg.stream, storage=cfg.storage))}, to_dict(cfg.stream.encoders)
    return {"train": ray_dataset(cfg.data, cfg.storage)[0]}, data_encoders(cfg.data, cfg.storage)


def run_training(cfg: TrainConfig, progress=print) -> dict:
    """Validate everything the workers will need, then fit (resuming from the latest checkpoint)."""
    from ray.train.torch import TorchTrainer

    # Before any worker starts: data, schema vs model, tracking, the checkpoint to start from.
    meta = validate_training(cfg)
    cfg = replace(cfg, tracking=usable(cfg.tracking, "training"), output=absolute(cfg.output))
    if cfg.init_from:
        _checkpoint_at(cfg.init_from, cfg.storage)  # fails now, naming the path, if it is not a checkpoint
    resume, state, run_id = _resume_plan(cfg)
    if resume:
        progress(f"train {cfg.name}: resuming from {resume} (step {state['step']})")
        if state["step"] >= cfg.steps:
            progress(f"train {cfg.name}: already at step {state['step']} >= {cfg.steps}; nothing to do")
            return {"checkpoint": resume, "step": state["step"], "mlflow_run_id": run_id}
    if run_id is None:
        tracker = Tracker(cfg.tracking, run_name=cfg.name, parent_run_id=cfg.tracking.parent_run_id)
        tracker.params(flatten(to_dict(cfg)))
        run_id = tracker.run_id

    # The Ray blocks: what each worker gets, how many workers, where checkpoints go, restarts.
    if cfg.stream is not None:
        _check_stream_fits(cfg, progress)
    datasets, encoders = _datasets(cfg)
    loop_config = {
        "cfg": to_dict(cfg),
        "meta": meta,
        "run_id": run_id,
        "resume": resume,
        "encoders": encoders,
        "fail_at_step": faults.planned(f"train:{cfg.name}"),
        "fail_marker": join(cfg.output, cfg.name, faults.MARKER),
        "compile_options": faults.compile_options(),  # testing only (EDIFFI_TEST_COMPILE_BACKEND)
    }
    scaling_config = ray.train.ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
    )
    fs, _ = filesystem(cfg.output, cfg.storage)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=key(cfg.output),
        storage_filesystem=arrow_filesystem(fs) if is_url(cfg.output) else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
    )

    # Fit.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config,
        run_config=run_config,
        datasets=datasets,
    )
    result = trainer.fit()
    done = result.return_value or {}
    path = with_scheme(result.checkpoint.path, cfg.output) if result.checkpoint else None
    progress(f"train {cfg.name}: finished at step {done.get('step')}; checkpoint {path}")
    if done.get("stream"):
        read, dropped = done["stream"]["read"], done["stream"]["dropped"]
        why = f" ({', '.join(f'{r}: {n}' for r, n in dropped.items())})" if dropped else ""
        progress(f"train {cfg.name}: the stream read {read} image-text rows, dropped {sum(dropped.values())}{why}")
    out = {"checkpoint": path, "step": done.get("step"), "mlflow_run_id": run_id, "stream": done.get("stream")}
    return out | {"compiled_blocks": done.get("compiled_blocks", 0)}


def _resume_plan(cfg: TrainConfig) -> tuple[str | None, dict, str | None]:
    """The checkpoint the workers will start from, as they will choose it (this run's latest, else
    `resume`: a re-run of a job started from `resume` goes on from its own progress), its training
    state, and the MLflow run to continue (none for another run's checkpoint: a new MLflow run)."""
    resume = latest_checkpoint(join(cfg.output, cfg.name), cfg.storage)[0] or cfg.resume
    if not resume:
        return None, {}, None
    state = training_state(resume, cfg.storage)
    own = key(resume).startswith(key(join(cfg.output, cfg.name)) + "/")
    return resume, state, state.get("mlflow_run_id") if own else None


def _checkpoint_at(uri: str, storage: StorageConfig) -> ray.train.Checkpoint:
    """A checkpoint directory (local or s3://) as a Ray checkpoint, for `as_directory()`."""
    if not is_checkpoint(uri, storage):
        raise FileNotFoundError(f"{uri}: not an ediffi checkpoint (no {CONFIG_FILE})")
    fs, path = filesystem(uri, storage)
    return ray.train.Checkpoint(path, filesystem=arrow_filesystem(fs) if is_url(uri) else None)
