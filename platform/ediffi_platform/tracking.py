"""MLflow tracking that never stops training: a local store by default, warnings when a server is down."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are tracked."""

    enabled: bool = True  # log to MLflow at all
    uri: str | None = None  # tracking URI; unset = MLFLOW_TRACKING_URI, else sqlite in the working folder
    experiment: str = "ediffi"  # experiment name
    artifact_root: str | None = None  # artifact location for a new experiment; unset = ./mlruns (absolute)
    parent_run_id: str | None = None  # nest new runs under this one (set by jobs that launch runs, e.g. experts)


def resolve(cfg: TrackingConfig) -> TrackingConfig:
    """Fix the URI and artifact root on the driver, so every worker agrees on them."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    root = cfg.artifact_root or (Path.cwd() / "mlruns").as_uri()
    return replace(cfg, uri=uri, artifact_root=root)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Tracker:
    """One MLflow run (new, or continued by id); every call is best-effort: failures warn once and stop logging."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_id: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
    ):
        self.run_id = None
        self._ok = cfg.enabled
        if not self._ok:
            return
        self._guard(lambda: self._start(cfg, run_id, run_name, parent_run_id))

    def _start(self, cfg, run_id, run_name, parent_run_id):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=cfg.uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment, cfg.artifact_root)
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.run_id = run_id

    def _guard(self, fn):
        if not self._ok:
            return None
        try:
            return fn()
        except Exception as e:
            self._ok = False
            warnings.warn(f"MLflow tracking disabled for this run: {type(e).__name__}: {e}", stacklevel=3)
            return None

    def params(self, params: dict[str, str]) -> None:
        """Log params (already-logged keys with equal values are fine on resume)."""
        from mlflow.entities import Param

        existing = self._guard(lambda: self.client.get_run(self.run_id).data.params) or {}
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self._guard(lambda chunk=new[i : i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log a dict of metrics at a step."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._guard(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def image(self, image: np.ndarray, path: str) -> None:
        """Log a uint8 [H, W, C] image artifact."""
        self._guard(lambda: self.client.log_image(self.run_id, image, path))

    def tag(self, key: str, value: str) -> None:
        """Set a run tag (e.g. the latest checkpoint's location)."""
        self._guard(lambda: self.client.set_tag(self.run_id, key, value))

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Log a local file as an artifact."""
        self._guard(lambda: self.client.log_artifact(self.run_id, local_path, artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run."""
        self._guard(lambda: self.client.set_terminated(self.run_id, status))


def check_reachable(cfg: TrackingConfig) -> str | None:
    """None when the tracking store answers, else the reason (for a warning before training starts)."""
    if not cfg.enabled:
        return None
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)  # one quick probe, not minutes of retries with back-off
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri=cfg.uri).search_experiments(max_results=1)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def usable(cfg: TrackingConfig, job: str) -> TrackingConfig:
    """The resolved tracking settings a job runs with: tracking switched off, with one warning,
    when the store does not answer (the job itself goes on)."""
    cfg = resolve(cfg)
    reason = check_reachable(cfg)
    if reason:
        warnings.warn(f"MLflow at {cfg.uri} is unreachable ({reason}); {job} continues untracked", stacklevel=3)
        cfg = replace(cfg, enabled=False)
    return cfg
