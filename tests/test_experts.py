"""Expert fine-tuning on a local 2-CPU Ray cluster: concurrent runs, intervals, retries, skip on re-run."""

import math

import mlflow
import pytest
import torch

from conftest import embeddings
from ediffi.checkpoint import load_checkpoint, save_checkpoint
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import EDIFFI_BASE_QUANTILES, load_ensemble, read_manifest
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import ConfigError, JobFailed, from_dict, to_dict
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, expert_names, run_finetune
from ediffi_platform.reader import iter_batches
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import OptimConfig, TrainConfig


def test_plans():
    noise = NoiseDistribution()
    (three,) = ExpertPlan().levels()  # eDiff-I's three experts
    assert [round(noise.cdf(iv.hi), 6) for iv, _ in three[:2]] == [round(q, 6) for q in EDIFFI_BASE_QUANTILES]
    assert three[0][0].lo == 0.0 and math.isinf(three[-1][0].hi) and three[0][1] is None
    (two,) = ExpertPlan(boundaries=(1.0,)).levels()
    assert [(iv.lo, iv.hi) for iv, _ in two] == [(0.0, 1.0), (1.0, math.inf)]
    tree = ExpertPlan(tree_depth=2, hierarchical=True).levels()
    assert [len(level) for level in tree] == [2, 4] and [p for _, p in tree[1]] == [0, 0, 1, 1]
    assert tree[1][1][0].hi == tree[0][0][0].hi  # children split their parent's interval
    assert expert_names(ExpertPlan(tree_depth=2, hierarchical=True))[-1] == "level2-expert3"
    assert len(ExpertPlan(tree_depth=2).levels()[0]) == 4
    with pytest.raises(ValueError, match="only one of"):
        ExpertPlan(boundaries=(1.0,), quantiles=(0.5,))
    with pytest.raises(ValueError, match="strictly increasing"):
        ExpertPlan(boundaries=(2.0, 1.0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ExpertPlan(quantiles=(1.5,))
    with pytest.raises(ConfigError, match=r"experts\.expert7: no such expert"):
        from_dict(FinetuneConfig, {"plan": {"boundaries": [1.0]}, "experts": {"expert7": {"steps": 3}}})


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """Tiny embedding shards and a base checkpoint (random weights: the experts only need a parent)."""
    d = tmp_path_factory.mktemp("experts")
    embeddings(d, rows=256)  # an expert run of 6 steps stays within one epoch
    train = TrainConfig(
        data=str(d / "emb"),
        preset="tiny",
        steps=6,
        batch_size=8,
        num_workers=1,
        cpus_per_worker=0.5,
        optim=OptimConfig(lr=2e-3, warmup_steps=2),
        dropout=DropoutConfig(0.1, 0.1, 0.1),
        checkpoint_every=3,
        log_every=1,
        sample_images=0,
        output=str(d / "runs"),
        tracking=TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri()),
    )
    cfg = get_preset("tiny")
    D = build_denoiser(cfg)
    ckpt = save_checkpoint(d / "base", cfg, D, ema=D, metadata={"encoders": to_dict(EncoderConfig())})
    return train, str(ckpt)


def _children(train, parent_id):
    c = mlflow.MlflowClient(tracking_uri=train.tracking.uri)
    runs = c.search_runs([c.get_experiment_by_name("ediffi").experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return c, {r.info.run_name: r for r in runs}


def test_two_experts_concurrently_one_retried_alone(base, tmp_path):
    train, ckpt = base
    cfg = FinetuneConfig(
        base=ckpt,
        plan=ExpertPlan(boundaries=(0.5,)),
        train=train,
        experts={"expert1": {"fail_at_step": 4, "max_failures": 0}},  # its run dies once at step 4
        output=str(tmp_path / "experts"),
        retries=1,
    )
    logs = []
    out = run_finetune(cfg, progress=logs.append)
    assert sum("starting expert0" in m for m in logs) == 1  # the other expert ran once, undisturbed
    assert sum("starting expert1" in m for m in logs) == 2 and any("expert1 failed" in m for m in logs)
    assert out["experts"]["expert1"]["attempts"] == 2 and out["experts"]["expert1"]["step"] == 6

    intervals, checkpoints, meta = read_manifest(out["manifest"])  # validates coverage and files
    assert [(iv.lo, iv.hi) for iv in intervals] == [(0.0, 0.5), (0.5, math.inf)]
    assert meta["base"] == ckpt and all(str(c).startswith(str(tmp_path / "experts")) for c in checkpoints)

    client, children = _children(train, out["mlflow_run_id"])
    assert set(children) == {"expert0", "expert1"}
    a, b = children["expert0"].info, children["expert1"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the two runs overlapped in time
    for name, iv in zip(("expert0", "expert1"), intervals, strict=True):
        run_id = children[name].info.run_id
        assert children[name].data.params["sigma_lo"] == str(iv.lo)
        lo = [m.value for m in client.get_metric_history(run_id, "sigma/min")]
        hi = [m.value for m in client.get_metric_history(run_id, "sigma/max")]
        assert len(lo) == 6 and min(lo) >= iv.lo and max(hi) < iv.hi, (name, min(lo), max(hi))
    assert [f.path for f in client.list_artifacts(out["mlflow_run_id"])] == ["manifest.json"]

    # Plain ediffi, no Ray: the ensemble samples, each expert serving its own sigmas.
    ens = load_ensemble(out["manifest"])
    _, cond = next(iter_batches(train.data, 4))
    imgs = sample(ens, cond, (3, 16, 16), [0, 1, 2, 3], SamplerConfig(steps=6, guidance=1.5))
    assert imgs.shape == (4, 3, 16, 16) and torch.isfinite(imgs).all()
    flat = [torch.cat([p.flatten() for p in e.parameters()]) for e in ens.experts]
    parent = torch.cat([p.flatten() for p in load_checkpoint(ckpt, use_ema=True)[0].parameters()])
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], parent)  # each fine-tuned on its own


def test_stopped_job_rerun_skips_finished_experts(base, tmp_path):
    train, ckpt = base
    cfg = FinetuneConfig(
        base=ckpt,
        plan=ExpertPlan(boundaries=(0.5,)),
        train=train,
        experts={"expert0": {"fail_at_step": 4, "max_failures": 0}},
        output=str(tmp_path / "experts"),
        retries=0,  # the failure stops the job
    )
    with pytest.raises(JobFailed, match=r"experts \['expert0'\] failed"):
        run_finetune(cfg, progress=lambda *_: None)
    logs = []
    out = run_finetune(cfg, progress=logs.append)  # re-run: expert1 finished, expert0 resumes
    assert any("expert1" in m and "skipped" in m for m in logs)
    assert sum("starting expert0" in m for m in logs) == 1 and sum("starting expert1" in m for m in logs) == 0
    assert out["experts"]["expert0"]["step"] == 6 and out["experts"]["expert1"]["skipped"]
    _, children = _children(train, out["mlflow_run_id"])
    assert set(children) == {"expert0", "expert1"}  # one child run each: expert0's resumed, not a new one
    read_manifest(out["manifest"])
