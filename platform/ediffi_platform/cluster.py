"""Connecting to Ray: the cluster given by address / RAY_ADDRESS / `ray job submit`, else a local one."""

from __future__ import annotations

import os

import ray

from ediffi_platform.console import start_log


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the given cluster, or start a private local one (never someone else's on this host).
    A job's console (if one is open) sends Ray's output to its log from here on."""
    start_log()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's print patch copies every print of a training worker into its logger, which writes
    # it to stderr again: each training line reached the driver twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # With the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
        # dashboard) every second whether the train controller lives; without it, every ask fails
        # and logs a warning (160 lines in one demo run). ~1 s more at start; a busy port moves on.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
