"""`ray job submit` against a real local head, as the README shows: the job succeeds, its outputs and
its MLflow run exist. The head is this test's own (own temp dir and ports), stopped by its PID."""

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from ediffi.checkpoint import save_checkpoint
from ediffi.encoders import EncoderConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import to_dict

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["bash", str(ROOT / "cluster" / "local.sh")]
# Every port `ray start --head` opens, as cluster/local.sh takes them: none left at Ray's fixed defaults.
PORT_VARS = (
    "EDIFFI_RAY_PORT",
    "EDIFFI_DASHBOARD_PORT",
    "EDIFFI_AGENT_PORT",
    "EDIFFI_AGENT_GRPC_PORT",
    "EDIFFI_CLIENT_PORT",
    "EDIFFI_NODE_MANAGER_PORT",
    "EDIFFI_OBJECT_MANAGER_PORT",
    "EDIFFI_RUNTIME_ENV_AGENT_PORT",
    "EDIFFI_METRICS_PORT",
)
WORKER_PORTS = 200  # workers' port range, below Linux's ephemeral range (32768+) that bind(0) draws from
PORT_CLASH = re.compile(r"already (in use|occupied)|failed to bind|EADDRINUSE", re.IGNORECASE)


def _free(port: int) -> bool:
    """Nothing on this host holds the port (on any interface)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def _ports() -> dict[str, str]:
    """Free, distinct ports for every PORT_VARS entry (bind-and-release) and a free worker range."""
    socks = [socket.socket() for _ in PORT_VARS]
    try:
        for s in socks:  # all held at once, so no two are the same
            s.bind(("", 0))
        env = {v: str(s.getsockname()[1]) for v, s in zip(PORT_VARS, socks, strict=True)}
    finally:
        for s in socks:
            s.close()
    lo = random.randrange(20000, 32000 - WORKER_PORTS)
    while not all(_free(p) for p in range(lo, lo + WORKER_PORTS)):
        lo = random.randrange(20000, 32000 - WORKER_PORTS)
    return env | {"EDIFFI_MIN_WORKER_PORT": str(lo), "EDIFFI_MAX_WORKER_PORT": str(lo + WORKER_PORTS - 1)}


def _start_head(env: dict, attempts: int = 3) -> dict:
    """Start the test's head on fresh ports; another process taking one of them first means a retry."""
    for _ in range(attempts):
        env |= _ports()
        up = subprocess.run([*LOCAL, "start"], env=env, capture_output=True, text=True, timeout=300)
        if up.returncode == 0:
            return env
        subprocess.run([*LOCAL, "stop"], env=env, capture_output=True, text=True, timeout=120)
        if not PORT_CLASH.search(up.stdout + up.stderr):
            break
    pytest.fail(f"the head did not start (after {attempts} attempts if ports clashed):\n{up.stdout}{up.stderr}")


@pytest.mark.slow
def test_job_submitted_to_a_local_head(tmp_path):
    # A short state folder of its own: Ray's socket paths must stay under 108 characters.
    state = Path(tempfile.mkdtemp(prefix="ediffi-head-", dir="/tmp"))
    env = {**os.environ, "EDIFFI_RAY_STATE": str(state), "VENV": str(Path(sys.executable).parent.parent)}
    env.pop("RAY_ADDRESS", None)
    save_checkpoint(
        tmp_path / "model",
        get_preset("tiny"),
        build_denoiser(get_preset("tiny")),
        metadata={"encoders": to_dict(EncoderConfig())},
    )
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    try:
        env = _start_head(env)
        job = subprocess.run(
            [
                *LOCAL,
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
        unused = [v for v in PORT_VARS if _free(int(env[v]))]  # after a job: the agents are up too
        assert not unused, f"the head does not listen on the ports given by {unused}: local.sh ignores them"
    finally:
        subprocess.run([*LOCAL, "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 2
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("ediffi").experiment_id]
    )
    assert [r.info.run_name for r in runs] == ["generate"] and runs[0].data.metrics["images"] == 2
