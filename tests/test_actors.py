"""The one actor-pool sizing shared by the precompute, generation and evaluation jobs (no Ray started)."""

import math

import pytest
import ray
import torch

from ediffi_platform.actors import actor_device, actor_threads, check_pool, pool_args, start_actor
from ediffi_platform.evaluate import EvalConfig
from ediffi_platform.generate import GenerateConfig
from ediffi_platform.precompute import PrecomputeConfig

JOBS = (PrecomputeConfig, GenerateConfig, lambda **kw: EvalConfig(fid_extractor="tiny", **kw))


@pytest.mark.parametrize("make", JOBS)
def test_pool_args_size_a_fixed_pool_with_the_configs_resources(make):
    cfg = make(concurrency=3, num_cpus=0.5, num_gpus=0.0, batch_size=7)
    args = pool_args(cfg)
    assert {k: args[k] for k in ("batch_size", "num_cpus", "num_gpus")} == {
        "batch_size": 7,
        "num_cpus": 0.5,
        "num_gpus": None,  # no GPU request at all, rather than a request for 0
    }
    assert isinstance(args["compute"], ray.data.ActorPoolStrategy)
    assert (args["compute"].min_size, args["compute"].max_size) == (3, 3)
    assert pool_args(make(num_gpus=0.25))["num_gpus"] == 0.25
    assert set(args) == {"batch_size", "num_cpus", "num_gpus", "compute"}  # never the deprecated concurrency=


@pytest.mark.parametrize("make", JOBS)
@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"concurrency": 0},
        {"num_cpus": 0},
        {"num_cpus": math.nan},
        {"num_gpus": -1},
        {"num_gpus": math.nan},
        {"threads_per_actor": -1},
    ],
)
def test_impossible_pool_settings_fail_naming_the_field(make, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        make(**bad)


def test_threads_are_the_cpu_share_rounded_up_unless_set():
    cfg = PrecomputeConfig(num_cpus=0.5)
    assert actor_threads(cfg) == 1
    assert actor_threads(GenerateConfig(num_cpus=2.5)) == 3
    assert actor_threads(GenerateConfig(num_cpus=2.5, threads_per_actor=1)) == 1
    assert actor_threads(EvalConfig(fid_extractor="tiny", num_cpus=2.0)) == 2  # evaluate's old rule, kept


def test_actors_run_on_cuda_only_when_they_asked_for_gpus_and_it_is_there():
    assert actor_device(GenerateConfig(num_gpus=0.0)) == "cpu"
    assert actor_device(GenerateConfig(num_gpus=1.0)) == ("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.get_num_threads()
    try:
        assert start_actor(PrecomputeConfig(threads_per_actor=1)) == "cpu"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_check_pool_takes_any_config_with_the_fields():
    class Pool:
        batch_size, concurrency, num_cpus, num_gpus, threads_per_actor = 1, 1, 0.25, 0.0, 0

    check_pool(Pool())
    Pool.concurrency = 0
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        check_pool(Pool())
