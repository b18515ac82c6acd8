"""Typed configs: nested keys, overrides, and errors that name the key."""

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
        ({"encoders": {"dtype": "int4"}}, "EncoderConfig.dtype"),
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


def test_jobs_end_bad_input_with_one_clear_line(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from ediffi_platform.config import run_job

    def bad():
        raise FileNotFoundError("input path /x does not exist")

    assert run_job(bad) == 2 and capsys.readouterr().err == "error: input path /x does not exist\n"
    job = Path(__file__).resolve().parents[1] / "jobs" / "make_synthetic_data.py"
    out = subprocess.run([sys.executable, str(job), "data.rows=0"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "need 1 <= shards <= rows" in out.stderr and "Traceback" not in out.stderr
