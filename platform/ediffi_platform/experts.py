"""Expert fine-tuning: split the base model's noise range and fine-tune every expert as its own
concurrent Ray Train run, then write the ensemble manifest that generation loads.

Each expert is an ordinary training run (`ediffi_platform.train.run_training`) with
`sigma_lo`/`sigma_hi` set to its interval and `init_from` its parent's checkpoint; runs are
launched as zero-CPU Ray tasks, so they share the cluster and wait for resources rather than fail.
A failed expert is retried alone (resuming from its own checkpoints); re-running the job skips
finished experts. MLflow: one parent run for the ensemble, a child run per expert.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace

import ray

from ediffi.edm import NoiseDistribution
from ediffi.ensemble import EDIFFI_BASE_QUANTILES, Interval, boundaries_from_quantiles, split_interval, tree_quantiles
from ediffi.ensemble import intervals_from_boundaries as _intervals
from ediffi.unet import UNetConfig
from ediffi_platform import faults
from ediffi_platform.config import JobFailed, from_dict, to_dict
from ediffi_platform.runs import (
    ENSEMBLE_MANIFEST,
    latest_checkpoint,
    model_network,
    resolve_checkpoint,
    write_ensemble_manifest,
)
from ediffi_platform.storage import absolute, filesystem, join, read_json, write_json
from ediffi_platform.tracking import Tracker, flatten, usable
from ediffi_platform.train import TrainConfig, run_training, validate_training

JOB_STATE = "ensemble.json"  # the job's own state (not a manifest): MLflow parent run, experts finished


@dataclass(frozen=True)
class ExpertPlan:
    """How to split the noise range. Set one of boundaries / quantiles / tree_depth / auto; none set
    means eDiff-I's three experts (quantiles 1/8 and 511/512 of the training noise distribution)."""

    boundaries: tuple[float, ...] | None = None  # inner sigma boundaries, increasing
    quantiles: tuple[float, ...] | None = None  # inner quantiles (0..1) of the training noise distribution
    tree_depth: int | None = None  # binary tree of this depth over the distribution's mass (2^depth experts)
    hierarchical: bool = False  # tree only: split, fine-tune, then split the children again, level by level
    auto: int | None = (
        None  # this many experts, boundaries from the base's text-influence curve (ediffi.text_influence)
    )
    auto_data: str | None = None  # held-out embedding shards the auto plan measures on (unset: train.data)
    auto_rows: int = 64  # rows the auto plan measures on
    auto_levels: int = 24  # noise levels of the measured curve (log-spaced over the training distribution)

    def __post_init__(self) -> None:
        given = [k for k in ("boundaries", "quantiles", "tree_depth", "auto") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of boundaries, quantiles, tree_depth (got {given})")
        if self.hierarchical and self.tree_depth is None:
            raise ValueError("hierarchical needs tree_depth")
        if self.tree_depth is not None and not 1 <= self.tree_depth <= 6:
            raise ValueError(f"tree_depth must be in 1..6, got {self.tree_depth}")
        if self.auto is not None and not 2 <= self.auto <= 16:
            raise ValueError(f"auto must be in 2..16 experts, got {self.auto}")
        if self.auto_rows < 1 or self.auto_levels < 3:
            raise ValueError(f"auto_rows must be >= 1 and auto_levels >= 3, got {self.auto_rows}, {self.auto_levels}")
        self.levels()  # boundaries increasing, quantiles in (0, 1)

    def levels(self, noise: NoiseDistribution = NoiseDistribution()) -> list[list[tuple[Interval, int | None]]]:
        """Per level, each expert's interval and the index of its parent in the level before
        (None: the base model). Flat plans have one level."""
        if self.hierarchical:
            out, current = [], [Interval(0.0, math.inf)]
            for d in range(self.tree_depth):  # the first level's parent is the base model
                level = [(half, p if d else None) for p, iv in enumerate(current) for half in split_interval(iv, noise)]
                out.append(level)
                current = [iv for iv, _ in level]
            return out
        if self.boundaries is not None:
            bounds = list(self.boundaries)
        elif self.tree_depth is not None:
            bounds = boundaries_from_quantiles(tree_quantiles(self.tree_depth), noise)
        elif self.auto is not None:  # placeholders with the plan's shape until the job measures the base
            bounds = boundaries_from_quantiles([j / self.auto for j in range(1, self.auto)], noise)
        else:
            bounds = boundaries_from_quantiles(self.quantiles or EDIFFI_BASE_QUANTILES, noise)
        return [[(iv, None) for iv in _intervals(bounds)]]


@dataclass(frozen=True)
class FinetuneConfig:
    """The expert fine-tuning job."""

    base: str = "runs/base"  # base checkpoint: a checkpoint folder, or a training run folder (its latest)
    plan: ExpertPlan = field(default_factory=ExpertPlan)  # how the noise range is split
    train: TrainConfig = field(
        default_factory=TrainConfig
    )  # how each expert trains (steps = per expert; the network is the base's)
    experts: dict = field(default_factory=dict)  # per-expert overrides of `train` by name, e.g. {expert1: {steps: 500}}
    output: str = "runs/experts"  # expert runs and the ensemble manifest go here (folder or s3://)
    name: str = "ensemble"  # MLflow parent run name
    retries: int = 1  # reruns of an expert whose training run failed (each resumes from its checkpoints)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        names = set(expert_names(self.plan))
        for k, v in self.experts.items():
            if k not in names:
                raise ValueError(f"experts.{k}: no such expert in the plan (experts: {sorted(names)})")
            if not isinstance(v, dict):
                raise ValueError(f"experts.{k}: expected a mapping of training settings, got {v!r}")
            bad = {"sigma_lo", "sigma_hi", "init_from", "name", "output"} & set(v)
            if bad:
                raise ValueError(f"experts.{k}: {sorted(bad)} are set by the plan, not per expert")


def expert_names(plan: ExpertPlan) -> list[str]:
    """Stable names of every expert the plan trains, level by level."""
    levels = plan.levels()  # names depend only on the plan's shape, not on the noise distribution
    if len(levels) == 1:
        return [f"expert{i}" for i in range(len(levels[0]))]
    return [f"level{d + 1}-expert{i}" for d, level in enumerate(levels) for i in range(len(level))]


def expert_configs(
    cfg: FinetuneConfig, base: str, base_net: UNetConfig
) -> list[list[tuple[str, str | None, TrainConfig]]]:
    """Each expert's name, parent expert (None: the base model) and training config, level by level.
    An expert's init_from is its parent's final checkpoint, known once the level before finished;
    its network is the base's (`base_net`, every field in `model`)."""
    names = iter(expert_names(cfg.plan))
    out = []
    noise = NoiseDistribution(cfg.train.P_mean, cfg.train.P_std)  # quantiles of the base's training noise
    for d, level in enumerate(cfg.plan.levels(noise)):
        row = []
        for iv, parent in level:
            name = next(names)
            t = replace(cfg.train, sigma_lo=iv.lo, sigma_hi=iv.hi, name=name, output=cfg.output)
            t = replace(t, init_from=base, resume=None)
            if name in cfg.experts:
                t = from_dict(TrainConfig, {**to_dict(t), **cfg.experts[name]}, f"experts.{name}")
            where = f"experts.{name}" if "model" in cfg.experts.get(name, {}) else "train"
            t = replace(t, model=_base_network(t.model, base_net, where))
            row.append((name, None if parent is None else f"level{d}-expert{parent}", t))
        out.append(row)
    return out


def _base_network(model: dict, base_net: UNetConfig, where: str) -> dict:
    """`model` settings over the base's network, as a full `model` mapping. Only `dropout` may
    differ from the base: any other field changes the weights the expert starts from."""
    net = to_dict(base_net)
    for k, v in model.items():
        net[k] = {**net["cond"], **v} if k == "cond" and isinstance(v, dict) else v
    mine = from_dict(UNetConfig, net, f"{where}.model")
    for f in fields(UNetConfig):
        if f.name != "dropout" and getattr(mine, f.name) != getattr(base_net, f.name):
            raise ValueError(
                f"{where}.model.{f.name}={getattr(mine, f.name)!r}: experts fine-tune the base's network, "
                f"whose {f.name} is {getattr(base_net, f.name)!r} (leave model unset, or set only dropout)"
            )
    return net


def _check_stage(cfg: FinetuneConfig, base_net: UNetConfig) -> None:
    """Experts of a super-resolution stage train as it did: on the upsampled low-resolution image with
    noise-conditioning augmentation, which needs train.lowres; a base stage's experts must not set it."""
    if base_net.sr and not cfg.train.lowres:
        raise ValueError(
            f"{cfg.base} is a super-resolution stage ({base_net.img_resolution}px): set train.lowres to its input "
            f"resolution (train.aug_sigma_max sets its noise-conditioning augmentation, {cfg.train.aug_sigma_max} now)"
        )
    if not base_net.sr and cfg.train.lowres:
        raise ValueError(f"{cfg.base} is a base stage: train.lowres is for super-resolution stages")


@ray.remote(num_cpus=0, max_retries=0)
def _fit(train: dict) -> dict:
    """One expert's Ray Train run, driven from a zero-CPU task so that several run at once."""
    cfg = from_dict(TrainConfig, train)
    return run_training(cfg, progress=lambda m: print(m, flush=True))


def run_finetune(cfg: FinetuneConfig, progress=print) -> dict:
    """Fine-tune every expert of the plan (concurrently per level), then write the manifest."""
    # Before anything starts: the base checkpoint, tracking, data and schema vs model.
    storage = cfg.train.storage
    base = resolve_checkpoint(cfg.base, storage)
    tracking = usable(cfg.train.tracking, "expert training")
    cfg = replace(cfg, output=absolute(cfg.output), train=replace(cfg.train, tracking=tracking))
    base_net = model_network(base, storage)
    _check_stage(cfg, base_net)
    validate_training(expert_configs(cfg, base, base_net)[0][0][2])  # every expert: the same data, the base's network

    # The job's state (its MLflow parent run, an auto plan's boundaries) and the experts, level by level.
    fs, root = filesystem(cfg.output, storage)
    state = read_json(fs, join(root, JOB_STATE)) if fs.exists(join(root, JOB_STATE)) else {}
    curve_files = []
    if cfg.plan.auto:
        cfg, curve_files = _auto_plan(cfg, base, state, fs, root, progress)
    levels = expert_configs(cfg, base, base_net)
    parent = Tracker(tracking, run_id=state.get("mlflow_run_id"), run_name=cfg.name)
    for path in curve_files:
        parent.artifact(path)
    if curve_files:
        parent.params({"plan.auto_boundaries": ", ".join(f"{b:.6g}" for b in cfg.plan.boundaries)})
    if parent.run_id and not state.get("mlflow_run_id"):
        parent.params(flatten({"base": base, "plan": to_dict(cfg.plan), "retries": cfg.retries}))
        parent.params(flatten({"train": to_dict(cfg.train)}))
    state["mlflow_run_id"] = parent.run_id
    write_json(fs, join(root, JOB_STATE), state)
    tracking = replace(tracking, parent_run_id=parent.run_id)
    done: dict[str, dict] = {}
    for level in levels:
        jobs = [
            (name, _from_parent(replace(t, tracking=tracking), parent_name, done)) for name, parent_name, t in level
        ]
        for name, t in jobs:
            parent.params(
                flatten({f"{name}.sigma_lo": t.sigma_lo, f"{name}.sigma_hi": t.sigma_hi, f"{name}.steps": t.steps})
            )
        failed = _run_concurrently(_unfinished(jobs, storage, done, progress), cfg.retries, done, progress)
        if failed:
            parent.finish("FAILED")
            raise JobFailed(
                f"experts {failed} failed after {cfg.retries} retries; re-run the job to resume them "
                f"(finished experts are skipped)"
            )

    # The manifest of the last level, also an MLflow artifact.
    intervals = [Interval(t.sigma_lo, t.sigma_hi) for _, _, t in levels[-1]]
    checkpoints = [done[name]["checkpoint"] for name, _, _ in levels[-1]]
    metadata = {"base": base, "plan": to_dict(cfg.plan)}
    manifest = write_ensemble_manifest(cfg.output, intervals, checkpoints, metadata, storage)
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, ENSEMBLE_MANIFEST)
        fs.get(join(root, ENSEMBLE_MANIFEST), local)
        parent.artifact(local)
    parent.tag("manifest", manifest)
    parent.finish()
    state["finished"] = sorted(done)
    write_json(fs, join(root, JOB_STATE), state)
    progress(f"experts: manifest {manifest} ({len(intervals)} experts)")
    return {"manifest": manifest, "experts": done, "mlflow_run_id": parent.run_id}


def _auto_plan(cfg: FinetuneConfig, base: str, state: dict, fs, root: str, progress) -> tuple[FinetuneConfig, list]:
    """cfg with the auto plan's boundaries: measured on the base now (curve saved to the output
    folder, returned as local files for MLflow), or those a first run chose (the job's state)."""
    from ediffi_platform import auto_plan

    p, t = cfg.plan, cfg.train
    files = []
    if "auto_boundaries" not in state:
        curve = auto_plan.measure(
            base,
            p.auto_data or t.data,
            experts=p.auto,
            rows=p.auto_rows,
            levels=p.auto_levels,
            noise=NoiseDistribution(t.P_mean, t.P_std),
            lowres=t.lowres,
            storage=t.storage,
        )
        files = auto_plan.save(curve, fs, root)
        state["auto_boundaries"] = curve["boundaries"]
        write_json(fs, join(root, JOB_STATE), state)
    bounds = tuple(state["auto_boundaries"])
    progress(f"experts: auto plan: boundaries {', '.join(f'{b:.4g}' for b in bounds)} ({auto_plan.CURVE_PNG})")
    return replace(cfg, plan=ExpertPlan(boundaries=bounds)), files


def _from_parent(t: TrainConfig, parent_name: str | None, done: dict) -> TrainConfig:
    """An expert of a later level starts from its parent expert's final checkpoint."""
    return t if parent_name is None else replace(t, init_from=done[parent_name]["checkpoint"])


def _unfinished(jobs: list[tuple[str, TrainConfig]], storage, done: dict, progress) -> list[tuple[str, TrainConfig]]:
    """The experts still to train; those whose run already reached its steps go into `done`."""
    out = []
    for name, t in jobs:
        ckpt, step = latest_checkpoint(join(t.output, name), storage)
        if step < t.steps:
            out.append((name, t))
            continue
        progress(f"experts: {name} [{t.sigma_lo:.4g}, {t.sigma_hi:.4g}) finished earlier (step {step}); skipped")
        done[name] = {"checkpoint": ckpt, "step": step, "skipped": True}
    return out


def _run_concurrently(jobs: list[tuple[str, TrainConfig]], retries: int, done: dict, progress) -> list[str]:
    """Launch every job at once; a failed one is relaunched alone (resuming) up to `retries` times."""
    running, attempts, failed = {}, {}, []

    def launch(name: str, t: TrainConfig) -> None:
        attempts[name] = attempts.get(name, 0) + 1
        progress(
            f"experts: starting {name} [{t.sigma_lo:.4g}, {t.sigma_hi:.4g}) from {t.init_from} "
            f"(attempt {attempts[name]})"
        )
        running[_fit.options(runtime_env=faults.runtime_env()).remote(to_dict(t))] = (name, t, time.time())

    for name, t in jobs:
        launch(name, t)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        name, t, t0 = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # the run failed beyond its own worker restarts
            msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            if attempts[name] <= retries:
                progress(f"experts: {name} failed ({msg}); retrying")
                launch(name, t)
            else:
                progress(f"experts: {name} failed ({msg}); giving up after {attempts[name]} attempts")
                failed.append(name)
            continue
        done[name] = {**result, "attempts": attempts[name], "seconds": time.time() - t0}
        progress(f"experts: {name} finished at step {result['step']} in {time.time() - t0:.0f} s")
    return sorted(failed)
