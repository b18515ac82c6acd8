"""Ray Train on a local 2-CPU cluster: loss falls, checkpoints load without Ray, faults, resume, MLflow."""

import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import embeddings
from ediffi.checkpoint import load_checkpoint, read_weights
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import to_dict
from ediffi_platform.reader import iter_batches, ray_dataset
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import (
    OptimConfig,
    TrainConfig,
    fail_marker,
    latest_checkpoint,
    run_training,
    train_loop_per_worker,
    validate_training,
)

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def emb(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("train")
    embeddings(d, rows=384)  # enough rows that 60 steps are ~2 epochs: each epoch restarts Ray Data (~3 s)
    return d


def _cfg(emb, tmp_path, **kw):
    base = TrainConfig(
        data=str(emb / "emb"),
        preset="tiny",
        steps=30,
        batch_size=8,
        num_workers=2,
        cpus_per_worker=0.5,
        optim=OptimConfig(lr=2e-3, warmup_steps=5),
        dropout=DropoutConfig(0.0, 0.0, 0.0, joint=0.0),
        checkpoint_every=10,
        log_every=5,
        output=str(tmp_path / "runs"),
        sample_images=4,
        tracking=TrackingConfig(  # one store per module: creating a fresh one costs seconds
            uri=f"sqlite:///{emb / 'mlflow.db'}", artifact_root=(emb / "mlruns").as_uri()
        ),
    )
    return replace(base, **kw)


def _dataset_loss(D, emb) -> float:
    g = torch.Generator().manual_seed(123)
    losses = [edm_loss(D, x, c, NoiseDistribution(), g)[0] for x, c in iter_batches(str(emb / "emb"), 48)]
    return torch.cat(losses).mean().item()


def _history(cfg, run_id, key="loss"):
    c = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    return [m.step for m in c.get_metric_history(run_id, key)], c


def test_two_workers_overfit_survive_a_killed_worker_and_checkpoint_loads_without_ray(emb, tmp_path):
    # A worker dies once at step 35: the group restarts from the step-30 checkpoint and finishes.
    cfg = _cfg(emb, tmp_path, steps=60, checkpoint_every=30, fail_at_step=35, max_failures=1)
    out = run_training(cfg, progress=lambda *_: None)
    assert out["step"] == 60 and Path(fail_marker(cfg)).exists()  # the worker did die
    torch.manual_seed(0)  # rank 0's initial weights (DDP broadcasts them)
    before = _dataset_loss(build_denoiser(get_preset("tiny")).eval(), emb)
    with torch.no_grad():
        D, meta = load_checkpoint(out["checkpoint"])
        after = _dataset_loss(D, emb)
        ema, _ = load_checkpoint(out["checkpoint"], use_ema=True)
        assert math.isfinite(_dataset_loss(ema, emb))
    assert meta["step"] == 60 and after < 0.8 * before, (before, after)
    steps, client = _history(cfg, out["mlflow_run_id"])
    assert steps == list(range(5, 61, 5))  # one continuous series, the lost steps 31-35 redone once
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.params["preset"] == "tiny" and run.data.params["optim.lr"] == "0.002"
    assert "loss/sigma_0.2-1" in run.data.metrics and run.data.tags["checkpoint.latest_step"] == "60"
    assert [a.path for a in client.list_artifacts(out["mlflow_run_id"], "samples")] == [
        "samples/step_0000030.png",
        "samples/step_0000060.png",
    ]


def test_stopped_job_resumes_from_its_s3_checkpoint_under_fsdp2(emb, tmp_path, s3_server):
    import s3fs

    cfg = _cfg(emb, tmp_path, steps=10, checkpoint_every=5, output="s3://ediffi/runs", storage=s3_server)
    first = run_training(cfg, progress=lambda *_: None)
    logs = []
    second = run_training(replace(cfg, steps=20, strategy="fsdp"), progress=logs.append)  # DDP checkpoint, FSDP2 run
    assert any("resuming from s3://ediffi/runs/base/" in m and "(step 10)" in m for m in logs), logs
    assert second["step"] == 20 and second["mlflow_run_id"] == first["mlflow_run_id"]
    steps, client = _history(cfg, first["mlflow_run_id"])
    assert steps == list(range(5, 21, 5))
    losses = [m.value for m in client.get_metric_history(first["mlflow_run_id"], "loss")]
    assert all(math.isfinite(v) for v in losses) and max(losses[2:]) < losses[0]  # FSDP2 steps keep it down
    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    ckpt = second["checkpoint"]
    assert ckpt.startswith("s3://ediffi/runs/base/") and fs.exists(f"{ckpt}/ema.safetensors")
    fs.get(ckpt, str(tmp_path / "local"), recursive=True)
    with torch.no_grad():
        D, meta = load_checkpoint(tmp_path / "local")  # gathered full weights, loadable without Ray
        assert meta["step"] == 20 and _dataset_loss(D, emb) < 1.5 * min(losses)


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

    def fit(self, cfg: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
        """Train (resuming from the run's latest checkpoint); the weights and EMA it ends with."""
        self.cfg, self.shard = cfg, ray_dataset(cfg.data)[0]
        config = {"cfg": to_dict(cfg), "meta": validate_training(cfg), "run_id": None}
        assert train_loop_per_worker(config)["step"] == cfg.steps
        folder = Path(latest_checkpoint(str(Path(cfg.output, cfg.name)))[0])
        return {f: read_weights(folder / f"{f}.safetensors") for f in ("model", "ema")}


def test_an_interrupted_run_resumes_exactly_where_it_stopped(emb, tmp_path, monkeypatch):
    # 24 micro-batches an epoch, 2 a step: the stops at steps 5 and 15 both fall inside an epoch,
    # the second after the epoch cache was filled; shuffled data, dropout and noise all draw randoms.
    worker = _OneWorker(monkeypatch)
    cfg = _cfg(
        emb,
        tmp_path,
        steps=20,
        num_workers=1,
        batch_size=16,
        optim=OptimConfig(lr=2e-3, warmup_steps=5, grad_accum=2),
        dropout=DropoutConfig(0.2, 0.2, 0.2),
        checkpoint_every=100,
        sample_images=0,
        tracking=TrackingConfig(enabled=False),
        threads_per_worker=torch.get_num_threads(),
    )
    whole = worker.fit(replace(cfg, name="whole"))
    for steps in (5, 15, 20):
        parts = worker.fit(replace(cfg, name="parts", steps=steps))
    torch.manual_seed(cfg.seed)
    initial = build_denoiser(get_preset("tiny")).net.state_dict()
    for f in ("model", "ema"):
        assert set(parts[f]) == set(whole[f])
        for k, v in whole[f].items():
            torch.testing.assert_close(parts[f][k], v, rtol=0, atol=1e-6, msg=f"{f} {k}")
    assert sum(not torch.equal(v, initial[k]) for k, v in whole["model"].items()) > 100  # it did train


def test_bad_setups_fail_before_workers_start(emb, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        run_training(_cfg(emb, tmp_path, data=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="shards hold 16px images, the model expects 32px"):
        run_training(_cfg(emb, tmp_path, preset="demo"))
    with pytest.raises(ValueError, match="strategy"):
        _cfg(emb, tmp_path, strategy="zero3")


def test_sr_stage_trains_with_the_same_job_and_tracking_down_only_warns(emb, tmp_path):
    embeddings(emb, rows=384, resolution=32, out=f"emb32-{tmp_path.name}")  # the SR stage's data, at 32px
    cfg = _cfg(
        emb,
        tmp_path,
        data=str(emb / f"emb32-{tmp_path.name}"),
        preset="tiny_sr",
        lowres=16,
        steps=2,
        num_workers=1,
        checkpoint_every=2,
        tracking=TrackingConfig(uri="http://127.0.0.1:9"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_training(cfg, progress=lambda *_: None)
    assert out["step"] == 2 and any("unreachable" in str(w.message) for w in caught)
    D, meta = load_checkpoint(out["checkpoint"])
    assert D.net.cfg.sr and meta["encoders"]["t5"] == "tiny"
    with pytest.raises(ValueError, match="super-resolution stage: set lowres"):
        replace(cfg, lowres=0)
    with pytest.raises(ValueError, match="lowres is for super-resolution presets"):
        replace(cfg, preset="tiny")
