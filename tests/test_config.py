"""Typed configs: nested keys, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from ediffi_platform.config import ConfigError, from_dict, load_config, to_dict
from ediffi_platform.precompute import PrecomputeConfig


def test_nested_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("input:\n  path: x\n  keep_columns: [color]\nimage:\n  resolution: 64\n")
    cfg = load_config(PrecomputeConfig, f, ["encoders.dtype=bfloat16", "concurrency=3", "num_gpus=0.5"])
    assert cfg.input.path == "x" and cfg.input.keep_columns == ("color",) and cfg.image.resolution == 64
    assert cfg.encoders.dtype == "bfloat16" and cfg.concurrency == 3 and cfg.num_gpus == 0.5
    assert from_dict(PrecomputeConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputt": {}}, "unknown config key 'inputt'"),
        ({"input": {"image_colum": "x"}}, "unknown config key 'input.image_colum'"),
        ({"batch_size": "big"}, "batch_size: expected an integer"),
        ({"image": {"resolution": 4}}, "image: resolution must be >= 8"),
        ({"encoders": {"dtype": "int4"}}, "encoders: EncoderConfig.dtype must be one of"),
        ({"encode_images": "yes"}, "encode_images: expected true/false"),
        ({"input": {"keep_columns": "color"}}, "input.keep_columns: expected a list"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PrecomputeConfig, data)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PrecomputeConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PrecomputeConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(PrecomputeConfig, None, ["concurrency"])
    with pytest.raises(ConfigError, match="'concurrency' is not a section"):
        load_config(PrecomputeConfig, None, ["concurrency=3", "concurrency.x=1"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(PrecomputeConfig, tmp_path / "list.yaml")


def test_jobs_end_bad_input_with_one_clear_line(tmp_path, capsys):
    import subprocess
    import sys

    from ediffi_platform.config import run_job

    def bad():
        raise FileNotFoundError("input path /x does not exist")

    assert run_job(bad) == 2 and capsys.readouterr().err == "error: input path /x does not exist\n"
    job = Path(__file__).resolve().parents[1] / "jobs" / "make_synthetic_data.py"
    out = subprocess.run([sys.executable, str(job), "data.rows=0"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "need 1 <= shards <= rows" in out.stderr and "Traceback" not in out.stderr
    for script, args, msg in (
        ("generate.py", ["--prompts", "p.txt", "on_bad_row=maybe"], "on_bad_row must be skip or fail"),
        ("finetune_experts.py", ["plan.quantiles=[2]"], "quantiles must lie strictly between 0 and 1"),
    ):
        job = Path(__file__).resolve().parents[1] / "jobs" / script
        out = subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr


SHIPPED = {  # configs/NAME.yaml -> the config class its job parses it into
    "precompute_demo": "ediffi_platform.precompute:PrecomputeConfig",
    "train_demo": "ediffi_platform.train:TrainConfig",
    "train_sr_demo": "ediffi_platform.train:TrainConfig",
    "finetune_demo": "ediffi_platform.experts:FinetuneConfig",
    "generate_demo": "ediffi_platform.generate:GenerateConfig",
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _leaves(data: dict, prefix: str = ""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    import importlib

    import yaml

    assert path.stem in SHIPPED, f"configs/{path.name} is not listed in SHIPPED (which config class parses it?)"
    module, attr = SHIPPED[path.stem].split(":")
    cfg = load_config(getattr(importlib.import_module(module), attr), path)
    data = to_dict(cfg)
    for key, value in _leaves(yaml.safe_load(path.read_text())):  # every value as written, none corrected
        node = data
        for k in key.split("."):
            node = node[k]
        assert node == value, f"configs/{path.name}: {key} is {node!r} in the config, {value!r} in the file"
    assert from_dict(type(cfg), data) == cfg


def test_every_listed_config_is_shipped():
    assert sorted(SHIPPED) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_memory_format_is_checked_where_it_is_set():
    from ediffi_platform.generate import GenerateConfig
    from ediffi_platform.train import TrainConfig

    assert TrainConfig().memory_format == GenerateConfig().memory_format == "auto"
    for cls in (TrainConfig, GenerateConfig):
        with pytest.raises(ValueError, match=r"memory_format must be one of \['auto', 'channels_last', 'contiguous'\]"):
            cls(memory_format="nhwc")
    with pytest.raises(ValueError, match="channels_last is not supported with strategy=fsdp"):
        TrainConfig(strategy="fsdp", memory_format="channels_last")
    TrainConfig(strategy="fsdp")  # auto: the default layout under FSDP2
