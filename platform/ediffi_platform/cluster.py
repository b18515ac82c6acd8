"""Connecting to Ray: the cluster given by address / RAY_ADDRESS / `ray job submit`, else a local one."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the given cluster, or start a private local one (never someone else's on this host)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # With the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
        # dashboard) every second whether the train controller lives; without it, every ask fails
        # and logs a warning (160 lines in one demo run). ~1 s more at start; a busy port moves on.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
