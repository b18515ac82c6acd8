"""Ray Train on a local 2-CPU cluster: loss falls, checkpoints load without Ray, faults, resume (its
own, another run's, DDP <-> FSDP2), gradient accumulation, power EMA, init_from, streaming, MLflow."""

import json
import math
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import ediffi_platform.train as train_module
from conftest import SHARED_ROWS, SHARED_SEED
from ediffi.checkpoint import load_checkpoint, read_weights
from ediffi.compilation import COMPILED_UNITS
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.ema import EMA, power_gamma
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import read_manifest
from ediffi.pipeline import SamplerConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform import faults
from ediffi_platform.config import to_dict
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, run_finetune
from ediffi_platform.generate import GenerateConfig, SRStageConfig, run_generate
from ediffi_platform.reader import EpochCache, iter_batches, ray_dataset
from ediffi_platform.runs import latest_checkpoint
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import (
    OptimConfig,
    TrainConfig,
    run_training,
    train_loop_per_worker,
    validate_training,
)

pytestmark = pytest.mark.usefixtures("ray_local")

EPOCH = SHARED_ROWS // 2 // 8  # micro-batches in an epoch of each of 2 workers at batch 8


def _cfg(shared, tmp_path, **kw):
    base = TrainConfig(
        data=str(shared / "emb"),
        preset="tiny32",
        steps=30,
        batch_size=8,
        num_workers=2,
        # A worker runs one torch thread either way; a small reservation leaves Ray Data a whole CPU
        # for its file-listing task (1 CPU, not configurable) while two fits run at once.
        cpus_per_worker=0.25,
        optim=OptimConfig(lr=2e-3, warmup_steps=5),
        dropout=DropoutConfig(0.0, 0.0, 0.0, joint=0.0),
        checkpoint_every=10,
        log_every=5,
        output=str(tmp_path / "runs"),
        sample_images=4,
        tracking=TrackingConfig(uri=f"sqlite:///{shared / 'mlflow.db'}", artifact_root=(shared / "mlruns").as_uri()),
    )
    return replace(base, **kw)


def _dataset_loss(D, shared) -> float:
    g = torch.Generator().manual_seed(123)
    batches = iter_batches(str(shared / "emb"), 48)
    return torch.cat([edm_loss(D, x, c, NoiseDistribution(), g)[0] for x, c in batches]).mean().item()


def _history(cfg, run_id, key="loss"):
    c = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    return [m.step for m in c.get_metric_history(run_id, key)], c


def _state(checkpoint) -> dict:
    return json.loads(Path(checkpoint, "trainer.json").read_text())["state"]


@pytest.fixture(scope="module")
def runs(shared_emb, tmp_path_factory):
    """Two fits at once, sharing the cluster (a fit costs ~25-35 s here, whatever its steps): the
    base run (2 DDP workers, 60 steps of 2 micro-batches, power EMA; a worker dies once at step 35,
    the group restarts from the step-30 checkpoint) and a 2-step SR stage with MLflow unreachable."""
    tmp = tmp_path_factory.mktemp("runs")
    base = _cfg(
        shared_emb,
        tmp,
        steps=60,
        checkpoint_every=30,
        max_failures=1,
        optim=OptimConfig(lr=2e-3, warmup_steps=5, grad_accum=2),
        ema_sigma_rel=0.1,
    )
    sr = _cfg(
        shared_emb,
        tmp,
        name="sr",
        preset="tiny_sr",
        lowres=16,
        steps=2,
        num_workers=1,
        checkpoint_every=2,
        tracking=TrackingConfig(uri="http://127.0.0.1:9"),
    )
    with (
        pytest.MonkeyPatch.context() as mp,
        warnings.catch_warnings(record=True) as caught,
        ThreadPoolExecutor(1) as pool,
    ):
        mp.setenv(faults.ENV, json.dumps({f"train:{base.name}": 35}))  # base's last worker dies at step 35
        warnings.simplefilter("always")  # process-wide: catches the SR thread's warning too
        sr_out = pool.submit(run_training, sr, progress=lambda *_: None)
        base_out = run_training(base, progress=lambda *_: None)
        sr_out = sr_out.result()
    return {"base": (base, base_out), "sr": (sr, sr_out, [str(w.message) for w in caught])}


def test_two_workers_overfit_survive_a_killed_worker_and_checkpoint_loads_without_ray(runs, shared_emb):
    cfg, out = runs["base"]
    assert out["step"] == 60 and Path(cfg.output, cfg.name, ".fail_injected").is_file()  # the worker did die
    torch.manual_seed(0)  # rank 0's initial weights (DDP broadcasts them)
    with torch.no_grad():
        before = _dataset_loss(build_denoiser(get_preset("tiny32")).eval(), shared_emb)
        D, meta = load_checkpoint(out["checkpoint"])
        after = _dataset_loss(D, shared_emb)
        assert math.isfinite(_dataset_loss(load_checkpoint(out["checkpoint"], use_ema=True)[0], shared_emb))
    # after / before measured over training seeds 0-4 (in-process, same global batch): 0.36-0.42.
    assert meta["step"] == 60 and after < 0.7 * before, (before, after)
    assert meta["encoders"] == to_dict(EncoderConfig(seed=SHARED_SEED))  # what made its data
    # 2 micro-batches a step: 60 steps read 120 of each worker's batches, 5 epochs (2.5 without).
    state = _state(out["checkpoint"])
    assert EPOCH * state["epoch"] + state["batches_into_epoch"] == 60 * 2, state
    steps, client = _history(cfg, out["mlflow_run_id"])
    assert steps == list(range(5, 61, 5))  # one continuous series, the lost steps 31-35 redone once
    run = client.get_run(out["mlflow_run_id"])
    params = run.data.params
    assert params["preset"] == "tiny32" and params["optim.lr"] == "0.002" and params["optim.grad_accum"] == "2"
    assert params["ema_sigma_rel"] == "0.1"
    assert "loss/sigma_0.2-1" in run.data.metrics and run.data.tags["checkpoint.latest_step"] == "60"
    assert [a.path for a in client.list_artifacts(out["mlflow_run_id"], "samples")] == [
        "samples/step_0000030.png",
        "samples/step_0000060.png",
    ]


def test_resume_another_runs_checkpoint_on_s3_under_fsdp2_then_rerun_under_ddp(
    runs, shared_emb, tmp_path, s3_server, monkeypatch
):
    """resume=PATH starts a new run from the base run's step-60 checkpoint (on S3, 10 more steps
    under FSDP2, streaming its data: cache_mb=0); the same job re-run for 10 more under DDP goes on
    from its own FSDP2 checkpoint, though resume is still set. The FSDP2 run compiles every block
    (torch.compile, traced with aot_eager: test_compilation.py checks inductor's numbers); the DDP
    re-run goes on from its checkpoint eagerly."""
    import s3fs

    monkeypatch.setenv(faults.COMPILE_ENV, "aot_eager")

    base_cfg, base = runs["base"]
    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.put(base["checkpoint"], "ediffi/base/checkpoint_000060", recursive=True)
    src = "s3://ediffi/base/checkpoint_000060"
    cfg = replace(
        base_cfg,
        name="cont",
        output="s3://ediffi/runs",
        storage=s3_server,
        resume=src,
        steps=70,
        strategy="fsdp",
        cache_mb=0,
        checkpoint_every=5,
        sample_images=0,
        compile=True,
    )
    logs = []
    first = run_training(cfg, progress=logs.append)
    blocks = sum(isinstance(m, COMPILED_UNITS) for m in build_denoiser(cfg.network(), "meta").modules())
    assert first["compiled_blocks"] == blocks
    assert any(f"resuming from {src} (step 60)" in m for m in logs), logs
    assert first["step"] == 70 and first["mlflow_run_id"] != base["mlflow_run_id"]  # another run's: a new MLflow run
    logs = []
    second = run_training(replace(cfg, steps=80, strategy="ddp", compile=False), progress=logs.append)  # eager DDP
    assert any("resuming from s3://ediffi/runs/cont/" in m and "(step 70)" in m for m in logs), logs
    assert second["step"] == 80 and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["compiled_blocks"] == 0  # a compiled run's checkpoint goes on eagerly
    steps, client = _history(cfg, first["mlflow_run_id"])
    assert steps == list(range(65, 81, 5))
    assert all(math.isfinite(m.value) for m in client.get_metric_history(first["mlflow_run_id"], "loss"))
    ckpt = second["checkpoint"]
    assert ckpt.startswith("s3://ediffi/runs/cont/") and fs.exists(f"{ckpt}/ema.safetensors")
    fs.get(ckpt, str(tmp_path / "local"), recursive=True)
    state = _state(tmp_path / "local")  # streamed epochs are whole epochs too: 160 batches, 6 epochs and 16
    assert EPOCH * state["epoch"] + state["batches_into_epoch"] == 80 * 2 and state["step"] == 80, state
    with torch.no_grad():
        D, meta = load_checkpoint(tmp_path / "local")  # gathered full weights, loadable without Ray
        before = _dataset_loss(load_checkpoint(base["checkpoint"])[0], shared_emb)
        after = _dataset_loss(D, shared_emb)
    # after / before over training seeds 0-4 (in-process): 0.79-0.86; 20 steps from fresh weights
    # instead (a resume that lost the weights) give 1.40-1.67.
    assert meta["step"] == 80 and after < 1.1 * before, (before, after)


class _OneWorker:
    """Ray Train's session faked for one worker in this process, so the real training loop runs
    without a fit (~30 s each): rank 0 of 1, the dataset as its shard, reported checkpoints copied
    to {output}/{name}/checkpoint_<step> as Ray would store them."""

    def __init__(self, monkeypatch):
        import ray.train
        import ray.train.torch

        context = type("Context", (), {"get_world_rank": lambda _: 0, "get_world_size": lambda _: 1})()
        monkeypatch.setattr(ray.train, "get_context", lambda: context)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: self.shard)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **_: model)

    def report(self, metrics, checkpoint=None):
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, Path(self.cfg.output, self.cfg.name, f"checkpoint_{metrics['step']:06d}"))

    def fit(self, cfg: TrainConfig) -> dict:
        """Train (resuming from the run's latest checkpoint); the weights and EMA it ends with, its
        state, and how many passes it made over the shard."""
        self.cfg, self.shard = cfg, _Passes(ray_dataset(cfg.data)[0])
        config = {"cfg": to_dict(cfg), "meta": validate_training(cfg), "run_id": None}
        assert train_loop_per_worker(config)["step"] == cfg.steps
        folder = Path(latest_checkpoint(str(Path(cfg.output, cfg.name)))[0])
        weights = {f: read_weights(folder / f"{f}.safetensors") for f in ("model", "ema")}
        return weights | {"state": _state(folder), "passes": self.shard.passes}


class _Passes:
    """A dataset shard that counts the passes made over it."""

    def __init__(self, ds):
        self.ds, self.passes = ds, 0

    def iter_batches(self, **kw):
        self.passes += 1
        return self.ds.iter_batches(**kw)


def _in_process(shared, tmp_path, **kw) -> TrainConfig:
    return _cfg(
        shared,
        tmp_path,
        num_workers=1,
        sample_images=0,
        checkpoint_every=100,
        tracking=TrackingConfig(enabled=False),
        threads_per_worker=torch.get_num_threads(),
        **kw,
    )


class _Recording(EMA):
    """The training loop's EMA, recording the weights of every update."""

    seen: ClassVar[list[dict[str, torch.Tensor]]] = []

    def update(self, model):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        super().update(model)


def _ema_of(initial, trajectory, beta) -> dict[str, torch.Tensor]:
    """Reference EMA: avg_0 = the initial weights, avg_t = beta(t) avg_{t-1} + (1 - beta(t)) w_t
    (integer buffers, e.g. update counters, copied)."""
    avg = {k: v.float() for k, v in initial.items()}
    for t, w in enumerate(trajectory, 1):
        avg = {
            k: a.lerp(w[k].float(), 1 - beta(t)) if w[k].is_floating_point() else w[k].float() for k, a in avg.items()
        }
    return avg


def test_an_interrupted_run_resumes_exactly_where_it_stopped(shared_emb, tmp_path, monkeypatch):
    # 24 micro-batches an epoch, 2 a step: the stops at steps 5 and 15 both fall inside an epoch,
    # the second after the epoch cache was filled; shuffled data, dropout and noise all draw randoms.
    # Power EMA: its update count must be restored too.
    worker = _OneWorker(monkeypatch)
    cfg = _in_process(
        shared_emb,
        tmp_path,
        steps=20,
        batch_size=16,
        optim=OptimConfig(lr=2e-3, warmup_steps=5, grad_accum=2),
        dropout=DropoutConfig(0.2, 0.2, 0.2),
        ema_sigma_rel=0.1,
    )
    monkeypatch.setattr(train_module, "EMA", _Recording)
    _Recording.seen.clear()
    whole = worker.fit(replace(cfg, name="whole"))
    seen = list(_Recording.seen)
    monkeypatch.setattr(train_module, "EMA", EMA)
    for steps in (5, 15, 20):
        parts = worker.fit(replace(cfg, name="parts", steps=steps))
    torch.manual_seed(cfg.seed)
    initial = build_denoiser(get_preset("tiny32")).net.state_dict()
    for f in ("model", "ema"):
        assert set(parts[f]) == set(whole[f])
        for k, v in whole[f].items():
            torch.testing.assert_close(parts[f][k], v, rtol=0, atol=1e-6, msg=f"{f} {k}")
    assert sum(not torch.equal(v, initial[k]) for k, v in whole["model"].items()) > 100  # it did train
    assert whole["passes"] == 1  # 1.7 epochs from one read of the data: the epoch cache

    # The saved EMA is EDM2's power EMA of the 20 weights the run stepped through, not the constant one.
    gamma = power_gamma(0.1)
    power = _ema_of(initial, seen, lambda t: (1 - 1 / t) ** (gamma + 1))  # EDM2: beta_t = (1 - 1/t)^(gamma + 1)
    constant = _ema_of(initial, seen, lambda t: min(cfg.ema_decay, (1 + t) / (10 + t)))
    assert len(seen) == 20 and whole["state"]["ema_updates"] == 20
    gap = max((power[k] - constant[k]).abs().max().item() for k in power)
    for k, v in whole["ema"].items():
        torch.testing.assert_close(v, power[k], rtol=0, atol=gap / 100, msg=k)
    assert gap > 1e-4


def test_init_from_starts_a_new_run_from_the_weights_its_ema_going_on(runs, shared_emb, tmp_path, monkeypatch):
    """Outside the expert job: step 1 of a run from the base run's checkpoint (constant-decay EMA)."""
    _, base = runs["base"]
    cfg = _in_process(shared_emb, tmp_path, name="init", init_from=base["checkpoint"], steps=1)
    got = _OneWorker(monkeypatch).fit(cfg)
    parent = {f: read_weights(Path(base["checkpoint"], f"{f}.safetensors")) for f in ("model", "ema")}
    updates = _state(base["checkpoint"])["ema_updates"]
    assert updates == 60 and got["state"]["step"] == 1 and got["state"]["ema_updates"] == updates + 1
    # One AdamW step moves a weight by at most its learning rate (lr / warmup_steps at step 1).
    lr = cfg.optim.lr / cfg.optim.warmup_steps
    params = [n for n, _ in build_denoiser(get_preset("tiny32")).net.named_parameters()]
    moved = [(got["model"][n] - parent["model"][n]).abs().max().item() for n in params]
    assert 0 < max(moved) <= lr + 1e-6, max(moved)
    beta = min(cfg.ema_decay, (1 + updates + 1) / (10 + updates + 1))
    want = _ema_of(parent["ema"], [got["model"]], lambda t: beta)
    for k, v in got["ema"].items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


def test_streamed_epochs_hold_the_rows_of_cached_ones(shared_emb, tmp_path, monkeypatch):
    """cache_mb=0 streams every epoch from Ray Data; an epoch holds every row once either way."""
    run = _OneWorker(monkeypatch).fit(_in_process(shared_emb, tmp_path, steps=26, batch_size=16, cache_mb=0))
    assert run["passes"] == 2 and run["state"]["epoch"] == 1  # 26 batches of 16 rows: 2 epochs begun, 2 reads
    ds, meta = ray_dataset(str(shared_emb / "emb"))
    rows = lambda batches: sorted(  # a row: its image and pooled CLIP text embedding
        (x[i].numpy().tobytes(), c.clip_pooled[i].numpy().tobytes()) for x, c in batches for i in range(len(x))
    )
    epochs = {}
    for mb in (0, 512):
        cache = EpochCache(mb)
        epochs[mb] = [rows(cache.batches(ds, meta, 8, shuffle_buffer=16, seed=e)) for e in (0, 1)]
        assert (cache.data is None) == (mb == 0), mb
    assert len(epochs[0][0]) == SHARED_ROWS
    assert epochs[0][0] == epochs[0][1] == epochs[512][0] == epochs[512][1]


def test_bad_setups_fail_before_workers_start(shared_emb, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        run_training(_cfg(shared_emb, tmp_path, data=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="shards hold 32px images, the model expects 16px"):
        run_training(_cfg(shared_emb, tmp_path, preset="tiny"))
    with pytest.raises(FileNotFoundError, match="not an ediffi checkpoint"):
        run_training(_cfg(shared_emb, tmp_path, init_from=str(tmp_path)))
    with pytest.raises(ValueError, match="strategy"):
        _cfg(shared_emb, tmp_path, strategy="zero3")


def test_sr_stage_trains_with_the_same_job_and_tracking_down_only_warns(runs):
    cfg, out, warned = runs["sr"]
    assert out["step"] == 2 and any("unreachable" in m for m in warned), warned
    D, meta = load_checkpoint(out["checkpoint"])
    assert D.net.cfg.sr and meta["encoders"]["seed"] == SHARED_SEED
    with pytest.raises(ValueError, match="super-resolution stage: set lowres"):
        replace(cfg, lowres=0)
    with pytest.raises(ValueError, match="lowres is for super-resolution presets"):
        replace(cfg, preset="tiny")


def test_sr_experts_as_a_cascade_stage_after_the_run_folder_with_its_data_encoders(runs, tmp_path):
    """The SR stage's run split into two experts (trained as the stage was: lowres input, augmentation),
    their manifest the cascade's SR stage after the base run folder (its latest checkpoint); prompts
    encoded with the data's encoders (seed 7) unless told."""
    cfg, _ = runs["base"]
    sr_cfg, sr_out, _ = runs["sr"]
    off = TrackingConfig(enabled=False)
    ft = FinetuneConfig(
        base=sr_out["checkpoint"],
        plan=ExpertPlan(quantiles=(0.5,)),
        train=replace(sr_cfg, steps=1, checkpoint_every=1, sample_images=0, tracking=off),
        output=str(tmp_path / "sr_experts"),
    )
    with pytest.raises(ValueError, match=r"is a super-resolution stage \(32px\): set train\.lowres"):
        run_finetune(replace(ft, train=replace(ft.train, preset="tiny", lowres=0)), progress=lambda *_: None)
    experts = run_finetune(ft, progress=lambda *_: None)
    intervals, checkpoints, _ = read_manifest(experts["manifest"])
    assert len(intervals) == 2 and all(load_checkpoint(c)[0].net.cfg.sr for c in checkpoints)
    (tmp_path / "p.txt").write_text("a small red circle\na big blue square\n")

    def generate(out: str, encoders: EncoderConfig | None) -> dict[int, np.ndarray]:
        gen = GenerateConfig(
            prompts=str(tmp_path / "p.txt"),
            out=str(tmp_path / out),
            model=str(Path(cfg.output, cfg.name)),
            encoders=encoders,
            sampler=SamplerConfig(steps=3, guidance=2.0),
            sr_stages=(SRStageConfig(model=experts["manifest"], sampler=SamplerConfig(steps=2)),),
            batch_size=2,
            num_cpus=0.5,
            grid_images=0,
            tracking=off,
        )
        assert run_generate(gen, progress=lambda *_: None)["images_total"] == 2
        meta = pq.read_table(str(tmp_path / out / "metadata")).to_pylist()
        return {m["line"]: np.asarray(Image.open(tmp_path / out / m["image"])) for m in meta}

    recorded = generate("recorded", None)
    same = generate("same", EncoderConfig(seed=SHARED_SEED))
    default = generate("default", EncoderConfig())
    assert recorded.keys() == same.keys() == default.keys() == {1, 2}
    for line in recorded:
        assert recorded[line].shape == (32, 32, 3)  # the SR experts' resolution
        assert np.array_equal(recorded[line], same[line]), line
        assert np.abs(recorded[line].astype(int) - default[line]).mean() > 1, line
