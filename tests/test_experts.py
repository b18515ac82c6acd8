"""Expert fine-tuning on a local 2-CPU Ray cluster, as one job on S3: a hierarchical plan in which
an expert is retried alone, two fail and stop the job, and a re-run skips the finished experts."""

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import SHARED_SEED
from ediffi.checkpoint import read_weights, save_checkpoint, save_training_state
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import EDIFFI_BASE_QUANTILES, load_ensemble, read_manifest
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform import faults
from ediffi_platform.config import ConfigError, JobFailed, from_dict, to_dict
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, expert_names, run_finetune
from ediffi_platform.reader import iter_batches
from ediffi_platform.runs import latest_checkpoint
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
    assert [[p for _, p in level] for level in tree] == [[None, None], [0, 0, 1, 1]]  # level 1's parent: the base
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


BASE_UPDATES = 10_000  # the base's EMA age: its decay is at the 0.999 cap, so an expert's EMA stays near it


@pytest.fixture(scope="module")
def base(shared_emb, tmp_path_factory):
    """A base checkpoint whose EMA is far from its weights (random; the experts only need a parent)
    and the experts' training settings (6 steps, a checkpoint every 3)."""
    d = tmp_path_factory.mktemp("experts")
    cfg = get_preset("tiny32")
    torch.manual_seed(0)
    D = build_denoiser(cfg)
    ema = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in D.net.state_dict().items()}
    ckpt = save_checkpoint(d / "base", cfg, D, ema=ema, metadata={"encoders": to_dict(EncoderConfig(seed=SHARED_SEED))})
    save_training_state(ckpt, {"state": {}, "param_groups": []}, {"step": BASE_UPDATES, "ema_updates": BASE_UPDATES})
    train = TrainConfig(
        data=str(shared_emb / "emb"),
        preset="tiny32",
        steps=6,
        batch_size=8,
        num_workers=1,
        cpus_per_worker=0.25,  # four experts at once leave Ray Data a whole CPU to list files (it needs one)
        optim=OptimConfig(lr=2e-3, warmup_steps=2),
        dropout=DropoutConfig(0.1, 0.1, 0.1),
        checkpoint_every=3,
        log_every=1,
        sample_images=0,
        tracking=TrackingConfig(
            uri=f"sqlite:///{shared_emb / 'mlflow.db'}", artifact_root=(shared_emb / "mlruns").as_uri()
        ),
    )
    return train, str(ckpt)


def _children(train, parent_id) -> tuple[mlflow.MlflowClient, dict]:
    c = mlflow.MlflowClient(tracking_uri=train.tracking.uri)
    runs = c.search_runs([c.get_experiment_by_name("ediffi").experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    named = {r.info.run_name: r for r in runs}
    assert len(named) == len(runs), [r.info.run_name for r in runs]  # one child run per expert
    return c, named


def _train_workers(since: float) -> list[tuple[float, float]]:
    """(start, end) of every Ray Train worker actor started since `since`, as Ray's GCS recorded them."""
    from ray._private.state import actors

    spans = [
        (a["StartTime"] / 1e3, a["EndTime"] / 1e3 or math.inf)
        for a in actors().values()
        if a["ActorClassName"].endswith("RayTrainWorker") and a["StartTime"] / 1e3 >= since
    ]
    return sorted(spans)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # at a tie, an end comes first
    alive = most = 0
    for _, d in events:
        alive += d
        most = max(most, alive)
    return most


def _dist(a: dict, b: dict) -> float:
    return math.sqrt(sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a))


def test_hierarchical_experts_on_s3_retry_one_then_rerun_skips_the_finished(base, s3_server, tmp_path, monkeypatch):
    """Level 1: level1-expert1 dies at step 4 and is relaunched alone, resuming; level 2: two experts
    train, two fail (their data override is wrong) and stop the job; the re-run, override fixed,
    skips the four finished experts and trains the two. At most two experts train at a time."""
    import s3fs

    train, ckpt = base
    experts = {
        "level1-expert0": {"steps": 4},
        "level1-expert1": {"max_failures": 0},  # its run dies once (below): retried
    }
    monkeypatch.setenv(faults.ENV, json.dumps({"train:level1-expert1": 4}))
    wrong = {name: {"data": str(tmp_path / "nowhere")} for name in ("level2-expert2", "level2-expert3")}
    cfg = FinetuneConfig(
        base=ckpt,
        plan=ExpertPlan(tree_depth=2, hierarchical=True),
        train=replace(train, storage=s3_server),
        experts=experts | wrong,
        output="s3://ediffi/experts",
        retries=1,
    )
    t0, logs = time.time(), []
    with pytest.raises(JobFailed, match=r"experts \['level2-expert2', 'level2-expert3'\] failed after 1 retries"):
        run_finetune(cfg, progress=logs.append)
    first, t1 = _train_workers(since=t0), time.time()
    rerun = []
    out = run_finetune(replace(cfg, experts=experts), progress=rerun.append)
    second = _train_workers(since=t1)

    # 1. The first run: level1-expert1 relaunched alone after its failure, the bad experts twice
    # (failing before any training); the re-run: finished experts skipped; two trainers at once.
    starts = lambda logs: {n: sum(f"starting {n} " in m for m in logs) for n in expert_names(cfg.plan)}
    assert starts(logs) == {"level1-expert0": 1, "level1-expert1": 2, "level2-expert0": 1, "level2-expert1": 1} | {
        n: 2 for n in wrong
    }
    assert any("level1-expert1 failed" in m for m in logs) and any("no manifest.json" in m for m in logs)
    assert starts(rerun) == {n: 0 for n in expert_names(cfg.plan)} | {n: 1 for n in wrong}
    assert sum("skipped" in m for m in rerun) == 4
    assert [out["experts"][n].get("skipped", False) for n in expert_names(cfg.plan)] == [True] * 4 + [False] * 2
    assert len(first) == 5 and _most_at_once(first) == 2, first  # Ray ran each level's trainers two at once
    assert len(second) == 2 and _most_at_once(second) == 2, second
    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    assert out["manifest"] == "s3://ediffi/experts/manifest.json" and fs.exists("ediffi/experts/manifest.json")
    local = tmp_path / "experts"
    fs.get("ediffi/experts", str(local), recursive=True)

    # 2. Lineage: an expert starts from its parent's weights (not its EMA), its EMA going on from the
    # parent's (for as many updates more as it trained); level 2 from level 1.
    parents = {"level1-expert0": None, "level1-expert1": None}
    parents |= {f"level2-expert{i}": f"level1-expert{i // 2}" for i in range(4)}
    steps = {name: 4 if name == "level1-expert0" else 6 for name in parents}
    weights = lambda folder: {f: read_weights(Path(folder, f"{f}.safetensors")) for f in ("model", "ema")}
    final, updates = {None: weights(ckpt)}, {None: BASE_UPDATES}
    for name, parent in parents.items():
        folder, step = latest_checkpoint(str(local / name))
        final[name], p = weights(folder), final[parent]
        updates[name] = updates[parent] + steps[name]
        state = json.loads(Path(folder, "trainer.json").read_text())["state"]
        assert step == steps[name] and state["ema_updates"] == updates[name], (name, state)
        gap = _dist(p["model"], p["ema"])
        assert _dist(final[name]["model"], p["model"]) < 0.1 * gap, name
        assert _dist(final[name]["ema"], p["ema"]) < 0.1 * gap, name

    # 3. The manifest: level 2's intervals, each child's inside its parent's; MLflow: one child run
    # per expert (level1-expert1's resumed, not a new one), each sampling only its own sigmas.
    intervals, checkpoints, meta = read_manifest(local / "manifest.json")  # validates coverage and files
    levels = cfg.plan.levels(NoiseDistribution(train.P_mean, train.P_std))
    assert intervals == [iv for iv, _ in levels[1]] and meta["base"] == ckpt
    assert all(iv.lo >= levels[0][p][0].lo and iv.hi <= levels[0][p][0].hi for iv, p in levels[1])
    assert [c.parent.name for c in checkpoints] == [f"level2-expert{i}" for i in range(4)]
    client, children = _children(train, out["mlflow_run_id"])
    assert set(children) == set(parents)
    ivs = {name: iv for name, (iv, _) in zip(parents, levels[0] + levels[1], strict=True)}
    for name, run in children.items():
        assert run.data.params["sigma_lo"] == str(ivs[name].lo) and run.data.params["steps"] == str(steps[name])
        lo = [m.value for m in client.get_metric_history(run.info.run_id, "sigma/min")]
        hi = [m.value for m in client.get_metric_history(run.info.run_id, "sigma/max")]
        assert len(lo) == steps[name] and min(lo) >= ivs[name].lo and max(hi) < ivs[name].hi, (name, min(lo), max(hi))
    assert [f.path for f in client.list_artifacts(out["mlflow_run_id"])] == ["manifest.json"]

    # 4. Plain ediffi, no Ray: the ensemble samples.
    ens = load_ensemble(local / "manifest.json")
    _, cond = next(iter_batches(train.data, 4))
    imgs = sample(ens, cond, (3, 32, 32), [0, 1, 2, 3], SamplerConfig(steps=6, guidance=1.5))
    assert imgs.shape == (4, 3, 32, 32) and torch.isfinite(imgs).all()


def test_auto_plan_measures_the_base_saves_its_curve_and_a_rerun_reuses_its_boundaries(base, tmp_path, monkeypatch):
    from PIL import Image

    from ediffi_platform import auto_plan
    from ediffi_platform.experts import _auto_plan
    from ediffi_platform.storage import filesystem

    train, ckpt = base
    plan = ExpertPlan(auto=3, auto_rows=12, auto_levels=6)
    cfg = FinetuneConfig(base=ckpt, plan=plan, train=train, output=str(tmp_path / "out"))
    assert expert_names(cfg.plan) == ["expert0", "expert1", "expert2"]
    fs, root = filesystem(cfg.output)
    state, logs = {}, []
    planned, files = _auto_plan(cfg, ckpt, state, fs, root, logs.append)
    b = planned.plan.boundaries
    assert len(b) == 2 and 0 < b[0] < b[1] and state["auto_boundaries"] == list(b)
    curve = json.loads((tmp_path / "out" / auto_plan.CURVE_JSON).read_text())
    assert curve["rows"] == 12 and len(curve["influence"]) == 6 and curve["boundaries"] == list(b)
    assert all(v > 0 for v in curve["influence"])  # the text changes even a random network's output
    assert Image.open(tmp_path / "out" / auto_plan.CURVE_PNG).size == (700, 400) and len(files) == 2
    assert any("auto plan: boundaries" in m for m in logs)
    # A re-run takes the boundaries from the job's state: the same experts, nothing measured.
    monkeypatch.setattr(auto_plan, "measure", lambda *a, **k: pytest.fail("measured again"))
    again, files = _auto_plan(cfg, ckpt, dict(state), fs, root, logs.append)
    assert again.plan.boundaries == b and files == []
