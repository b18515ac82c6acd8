"""Test-only fault injection: a worker or actor process dies once at a named point.

Faults are asked for through one environment variable, never through a job's config:

    EDIFFI_TEST_FAULTS='{"train:base": 35, "generate": 2}'

`train:<run name>`: the run's last worker dies once when it reaches that step; `generate`: an
image-generator actor dies once after writing that many images of a batch. "Once" is kept by a
marker file in the run's or the output's folder, so a restarted worker or a re-run goes on.
Drivers read the variable (`planned`) and hand the point to their workers; a driver that runs
inside a Ray task (an expert's training run) gets it forwarded (`runtime_env`).

`EDIFFI_TEST_COMPILE_BACKEND=aot_eager` makes `compile: true` trace with that torch.compile backend
instead of inductor (whose C++ compile takes a minute on 2 cores): tests check the wiring through
the real jobs cheaply, and tests/test_compilation.py checks inductor's numbers.
"""

from __future__ import annotations

import json
import os

from ediffi_platform.storage import StorageConfig, filesystem

ENV = "EDIFFI_TEST_FAULTS"
COMPILE_ENV = "EDIFFI_TEST_COMPILE_BACKEND"
MARKER = ".fail_injected"


def planned(point: str) -> int | None:
    """The step / count at which `point` fails, or None (no fault asked for)."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV}: not JSON ({e})") from None
    value = faults.get(point)
    return None if value is None else int(value)


def compile_options() -> dict:
    """torch.compile keyword arguments for the workers: a test's backend, else none (inductor)."""
    backend = os.environ.get(COMPILE_ENV)
    return {"backend": backend} if backend else {}


def runtime_env() -> dict | None:
    """A Ray runtime_env passing the test settings on to a task that drives its own job (None: none)."""
    env = {k: os.environ[k] for k in (ENV, COMPILE_ENV) if os.environ.get(k)}
    return {"env_vars": env} if env else None


def die_once(marker: str, storage: StorageConfig = StorageConfig()) -> None:
    """End this process, leaving `marker`; nothing when the marker is already there."""
    fs, path = filesystem(marker, storage)
    if fs.exists(path):
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("testing: a process died here (EDIFFI_TEST_FAULTS)\n")
    os._exit(1)
