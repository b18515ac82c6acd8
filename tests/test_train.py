"""Ray Train on a local 2-CPU cluster: loss falls, checkpoints load without Ray, faults, resume, MLflow."""

import math
import warnings
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import embeddings
from ediffi.checkpoint import load_checkpoint
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.reader import iter_batches
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import OptimConfig, TrainConfig, fail_marker, run_training

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
