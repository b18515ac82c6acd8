"""`--dry-run` for every job: validate the config, build each network on the meta device and print
what the job would do (parameters, FLOPs per image, an estimate of the memory per GPU, the data,
experts and stages), without starting Ray, reading a GPU or writing anything.

Local inputs are listed; `s3://` ones are named, not read (a dry run needs no credentials).
Memory per GPU is an estimate: float32 weights, gradients, AdamW's two moments and the EMA (20
bytes a parameter; FSDP2 shards all of it over the workers, DDP keeps it whole plus its gradient
buckets), and the activations the backward keeps, counted on the meta device with attention as a
fused kernel keeps it (`ediffi.presets.activation_bytes`), halved under bf16 autocast.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ediffi.presets import activation_bytes, build_denoiser, count_parameters, forward_flops
from ediffi.unet import UNetConfig
from ediffi_platform.config import to_dict
from ediffi_platform.ingest import list_shards
from ediffi_platform.storage import is_url

GiB = 2**30


def describe(cfg) -> list[str]:
    """The dry run's lines for a job config (any of the jobs' config classes)."""
    from ediffi_platform.experts import FinetuneConfig
    from ediffi_platform.generate import GenerateConfig
    from ediffi_platform.precompute import PrecomputeConfig
    from ediffi_platform.train import TrainConfig

    for kind, fn in (
        (TrainConfig, _train),
        (FinetuneConfig, _finetune),
        (GenerateConfig, _generate),
        (PrecomputeConfig, _precompute),
    ):
        if isinstance(cfg, kind):
            return fn(cfg)
    return [f"{type(cfg).__name__}: valid; this job builds no network (nothing more to plan)"]


def network_lines(net: UNetConfig, label: str) -> list[str]:
    """Parameters, FLOPs per image and resolution of one network."""
    params = count_parameters(build_denoiser(net, "meta"))
    flops = forward_flops(net)
    kind = f"super-resolution to {net.img_resolution}px" if net.sr else f"base at {net.img_resolution}px"
    return [f"{label}: {kind}, {params / 1e6:,.1f} M parameters, {flops / 1e9:,.2f} GFLOP a forward per image"]


def memory_lines(t) -> list[str]:
    """The per-worker memory estimate of a training config (see the module docstring)."""
    net = t.network()
    params, workers = count_parameters(build_denoiser(net, "meta")), t.num_workers
    state = 20 * params / workers if t.strategy == "fsdp" else 24 * params  # DDP: + its gradient buckets
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and t.use_gpu)
    act = activation_bytes(net, t.activation_checkpointing) * t.batch_size * (0.5 if bf16 else 1.0)
    how = "FSDP2, sharded over" if t.strategy == "fsdp" else "DDP, whole on each of"
    what = f"batch {t.batch_size}, {'bf16' if bf16 else 'float32'}"
    return [
        f"memory per {'GPU' if t.use_gpu else 'worker'} (estimate): {(state + act) / GiB:,.1f} GiB = weights, "
        f"gradients, AdamW and EMA {state / GiB:,.1f} GiB ({how} {workers} workers) + activations "
        f"{act / GiB:,.1f} GiB ({what}{', activation checkpointing' if t.activation_checkpointing else ''})"
    ]


def _local_shards(path: str, what: str) -> str:
    if is_url(path):
        return f"{what}: {path} (not read in a dry run)"
    try:
        return f"{what}: {path} ({len(list_shards(path))} Parquet files)"
    except FileNotFoundError as e:
        return f"{what}: {path} (not there yet: {e})"


def _train(cfg) -> list[str]:
    net = cfg.network()
    world = cfg.num_workers
    per_step = cfg.batch_size * cfg.optim.grad_accum * world
    data = _local_shards(cfg.stream.input.path, "data (streamed)") if cfg.stream else _local_shards(cfg.data, "data")
    lines = [f"train {cfg.name}: {cfg.steps:,} steps x {per_step:,} images = {cfg.steps * per_step:,} images seen"]
    lines += [data, *network_lines(net, "network")]
    lines += [f"  conditioning: {net.cond} (model.cond unset: the data's shapes at run time)"]
    lines += [
        f"workers: {world} x ({'1 GPU' if cfg.use_gpu else f'{cfg.cpus_per_worker:g} CPU'}), strategy {cfg.strategy}, "
        f"dtype {cfg.dtype}, compile {cfg.compile}, noise interval [{cfg.sigma_lo:g}, {cfg.sigma_hi:g})"
    ]
    lines += memory_lines(cfg)
    return [*lines, f"checkpoints: {cfg.output}/{cfg.name}/ every {cfg.checkpoint_every} steps"]


def _finetune(cfg) -> list[str]:
    from ediffi.edm import NoiseDistribution
    from ediffi_platform.experts import expert_names

    t = cfg.train
    net = _base_network(cfg)
    levels = cfg.plan.levels(NoiseDistribution(t.P_mean, t.P_std))
    names = iter(expert_names(cfg.plan))
    lines = [f"experts from {cfg.base}: {sum(len(lv) for lv in levels)} experts in {len(levels)} level(s)"]
    if cfg.plan.auto:
        lines.append(
            f"  boundaries: placed when the job runs, from the base's text influence on {cfg.plan.auto_rows} rows"
        )
        levels = []
    for d, level in enumerate(levels):
        for iv, parent in level:
            name = next(names)
            steps = cfg.experts.get(name, {}).get("steps", t.steps)
            start = "the base" if parent is None else f"level{d}-expert{parent}"
            lines.append(f"  {name}: sigma in [{iv.lo:.4g}, {iv.hi:.4g}), {steps:,} steps from {start}")
    lines += network_lines(net, "network (each expert's)")
    lines += memory_lines(replace(t, model=to_dict(net)))
    return [*lines, f"manifest: {cfg.output}/manifest.json"]


def _base_network(cfg) -> UNetConfig:
    """The base checkpoint's network when it is local and there, else the training config's."""
    from ediffi_platform.runs import model_network, resolve_checkpoint

    if not is_url(cfg.base) and os.path.exists(cfg.base):
        return model_network(resolve_checkpoint(cfg.base))
    return cfg.train.network()


def _generate(cfg) -> list[str]:
    from ediffi.samplers import network_evaluations

    s = cfg.sampler
    nfe = network_evaluations(s.sampler, s.steps) * (1 if s.guidance == 1.0 else 2)
    lines = [_local_shards(cfg.prompts, "prompts"), f"output: {cfg.out}"]
    lines += [f"base stage: {cfg.model}; {s.sampler} {s.steps} steps, guidance {s.guidance:g}: {nfe} network images"]
    lines += _model_lines(cfg.model, "  network")
    for i, st in enumerate(cfg.sr_stages, 1):
        lines.append(
            f"SR stage {i}: {st.model}; {st.sampler.sampler} {st.sampler.steps} steps, aug_sigma {st.aug_sigma}"
        )
        lines += _model_lines(st.model, "  network")
    return lines


def _model_lines(model: str, label: str) -> list[str]:
    from ediffi_platform.runs import is_ensemble_manifest, model_network, resolve_model

    if is_url(model) or not os.path.exists(model):
        return [f"{label}: {model} (not read in a dry run: not a local path that exists)"]
    local = resolve_model(model)
    experts = ""
    if is_ensemble_manifest(local):
        from ediffi.ensemble import read_manifest

        intervals = read_manifest(local)[0]
        experts = f" x {len(intervals)} experts at " + ", ".join(f"[{iv.lo:.3g}, {iv.hi:.3g})" for iv in intervals)
    return [line + experts for line in network_lines(model_network(local), label)]


def _precompute(cfg) -> list[str]:
    e = cfg.encoders
    return [
        _local_shards(cfg.input.path, "image-text shards"),
        f"encoders: T5 {e.t5}, CLIP {e.clip}; {cfg.concurrency} actor(s) x {cfg.num_gpus:g} GPU / {cfg.num_cpus:g} CPU",
        f"embedding shards: {cfg.output}",
    ]
