"""`--dry-run`: every shipped config and recipe goes through its job's dry run (valid, networks and
plan printed, memory estimated), without starting Ray or writing anything."""

import importlib.util
import re
from pathlib import Path

import pytest
import ray
import torch

from ediffi.presets import activation_bytes, get_preset
from ediffi_platform import cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/recipes/*.yaml")])


def _job(config: Path):
    name = re.search(r"^# job: (jobs/\w+\.py)$", config.read_text(), re.M).group(1)
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return name, module


def _dry_run(job, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        job.main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out + out.err


def test_every_config_names_its_job():
    assert len(CONFIGS) >= 11 and all(_job(c)[0] for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_and_recipe_passes_its_dry_run(config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths: nothing may appear here
    for where, fn in ((ray, "init"), (cluster, "ensure_ray")):  # before the job module binds them
        monkeypatch.setattr(where, fn, lambda *a, **k: pytest.fail("the dry run started Ray"))
    name, job = _job(config)
    code, out = _dry_run(job, ["--config", str(config), "--dry-run"], capsys)
    assert code == 0 and "the config is valid" in out, out
    if name in ("jobs/train_base.py", "jobs/finetune_experts.py"):
        assert re.search(r"M parameters, [\d,.]+ GFLOP a forward per image", out), out
        assert re.search(r"memory per (GPU|worker) \(estimate\): [\d,.]+ GiB", out), out
    if name == "jobs/finetune_experts.py":
        assert re.search(r"expert\d: sigma in \[", out), out
    if "recipes/base64_experts" in str(config):  # eDiff-I's three experts
        assert out.count(": sigma in [") == 3
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_fails_the_dry_run_naming_the_key(capsys):
    _, job = _job(ROOT / "configs/recipes/base64.yaml")
    code, out = _dry_run(
        job, ["--config", str(ROOT / "configs/recipes/base64.yaml"), "strategy=zero3", "--dry-run"], capsys
    )
    assert code == 2 and "strategy must be one of" in out and "Traceback" not in out


def test_activation_estimate_shrinks_with_checkpointing_and_counts_attention_as_fused():
    cfg = get_preset("tiny")
    full, ckpt = activation_bytes(cfg), activation_bytes(cfg, checkpointed=True)
    assert 0 < ckpt < full
    # A real float32 forward of one image keeps at least the estimate (it also keeps the L x L scores).
    from ediffi.conditioning import empty_cond
    from ediffi.presets import build_denoiser

    saved = {}
    D = build_denoiser(cfg)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(id(t), t), lambda t: t):
        D(torch.randn(1, 3, 16, 16), torch.ones(1), empty_cond(cfg.cond, 1))
    real = sum(t.numel() * t.element_size() for t in saved.values())
    assert 0.5 * real < full <= real
