"""`ray job submit` against a real local head, as the README shows: the job succeeds, its outputs and
its MLflow run exist. The head is this test's own (own temp dir and ports), stopped by its PID."""

import os
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest

from ediffi.checkpoint import save_checkpoint
from ediffi.encoders import EncoderConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import to_dict

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_job_submitted_to_a_local_head(tmp_path):
    state = Path("/tmp") / f"ediffi-head-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "EDIFFI_RAY_STATE": str(state),
        "EDIFFI_RAY_PORT": str(_port()),
        "EDIFFI_DASHBOARD_PORT": str(_port()),
        "EDIFFI_AGENT_PORT": str(_port()),  # the session's own Ray cluster may hold the default one
        "VENV": str(Path(os.sys.executable).parent.parent),
    }
    env.pop("RAY_ADDRESS", None)
    save_checkpoint(
        tmp_path / "model",
        get_preset("tiny"),
        build_denoiser(get_preset("tiny")),
        metadata={"encoders": to_dict(EncoderConfig())},
    )
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    local = ["bash", str(ROOT / "cluster" / "local.sh")]
    up = subprocess.run([*local, "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        job = subprocess.run(
            [
                *local,
                "submit",
                "jobs/generate.py",
                "--prompts",
                str(tmp_path / "p.txt"),
                "--out",
                str(tmp_path / "out"),
                "--model",
                str(tmp_path / "model"),
                "sampler.steps=3",
                "num_cpus=0.5",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"tracking.artifact_root={(tmp_path / 'mlruns').as_uri()}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log.lower(), log[-3000:]
    finally:
        subprocess.run([*local, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 2
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("ediffi").experiment_id]
    )
    assert [r.info.run_name for r in runs] == ["generate"] and runs[0].data.metrics["images"] == 2
