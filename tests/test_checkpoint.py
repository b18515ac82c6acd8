"""Checkpoints: bitwise round trip, refusal of pickles, clear errors for corrupt or mismatched files."""

import json
import pickle

import pytest
import torch

from conftest import random_cond, randomize
from ediffi.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from ediffi.presets import build_denoiser, get_preset


def _saved(tmp_path, cfg):
    D, ema = randomize(build_denoiser(cfg), seed=1), randomize(build_denoiser(cfg), seed=2)
    save_checkpoint(tmp_path / "ck", cfg, D, ema=ema, metadata={"step": 7})
    return D, ema, tmp_path / "ck"


def test_round_trip_is_bitwise(tmp_path, tiny_cfg):
    D, ema, path = _saved(tmp_path, tiny_cfg)
    for src, use_ema in ((D, False), (ema, True)):
        loaded, meta = load_checkpoint(path, use_ema=use_ema)
        assert meta == {"step": 7}
        a, b = src.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x, s, c = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), random_cond(tiny_cfg.cond, 2)
        assert torch.equal(src.eval()(x, s, c), loaded(x, s, c))
    assert read_config(path)[0] == tiny_cfg


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_pickle_bearing_files_are_refused_unread(tmp_path, tiny_cfg, kind):
    _, _, path = _saved(tmp_path, tiny_cfg)
    marker = tmp_path / "unpickled"
    if kind == "torch_save":
        torch.save({"x": _Boom(marker)}, path / "model.safetensors")
    else:
        (path / "model.safetensors").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_every_safetensors_header_length_loads(tmp_path):
    """The header length opens the file as a u64: ~1 in 32 lengths start with 0x80, pickle's first byte."""
    from safetensors.torch import save_file

    from ediffi.checkpoint import read_weights

    first_bytes = set()
    for n in range(0, 320, 3):  # metadata of growing length sweeps the header length over every 8 mod 256
        f = tmp_path / f"w{n}.safetensors"
        save_file({"w": torch.arange(4.0)}, str(f), metadata={"pad": "x" * n})
        first_bytes.add(f.read_bytes()[0])
        assert torch.equal(read_weights(f)["w"], torch.arange(4.0)), n
    assert 0x80 in first_bytes and len(first_bytes) == 32


@pytest.mark.parametrize("data", [b"", b"\x00" * 3, (10**9).to_bytes(8, "little") + b"{}", b"\x80\x02junk"])
def test_non_safetensors_bytes_are_refused(tmp_path, data):
    from ediffi.checkpoint import read_weights

    (tmp_path / "w.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: (not a readable safetensors|is a pickle)"):
        read_weights(tmp_path / "w.safetensors")


def test_corrupt_weights_name_the_file(tmp_path, tiny_cfg):
    _, _, path = _saved(tmp_path, tiny_cfg)
    data = (path / "ema.safetensors").read_bytes()
    (path / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: not a readable safetensors file"):
        load_checkpoint(path, use_ema=True)


def test_mismatched_network_is_named(tmp_path, tiny_cfg):
    _, _, path = _saved(tmp_path, tiny_cfg)
    doc = json.loads((path / "config.json").read_text())
    doc["network"]["model_channels"] = 64
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match .* shape mismatches"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{oops", "not valid JSON"),
        ('{"format": "x"}', "not an ediffi checkpoint"),
        (
            '{"format": "ediffi-checkpoint", "version": 1, "network": {"bogus": 1}}',
            "unknown UNetConfig keys",
        ),
    ],
)
def test_bad_config_is_named(tmp_path, tiny_cfg, text, message):
    _, _, path = _saved(tmp_path, tiny_cfg)
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config not found"):
        load_checkpoint(tmp_path / "absent")
    save_checkpoint(tmp_path / "noema", get_preset("tiny"), build_denoiser(get_preset("tiny")))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: weights file not found"):
        load_checkpoint(tmp_path / "noema", use_ema=True)


def test_training_state_round_trip(tmp_path, tiny_cfg):
    from ediffi.checkpoint import load_training_state, save_training_state

    D = build_denoiser(tiny_cfg)
    opt = torch.optim.AdamW(D.parameters(), lr=1e-3)
    D(torch.randn(2, 3, 16, 16), torch.ones(2), random_cond(tiny_cfg.cond, 2)).square().mean().backward()
    opt.step()
    save_checkpoint(tmp_path, tiny_cfg, D)
    save_training_state(tmp_path, opt, {"step": 5, "epoch": 1})
    expected_noise = torch.randn(3)
    opt2 = torch.optim.AdamW(D.parameters(), lr=1e-3)
    assert load_training_state(tmp_path, opt2) == {"step": 5, "epoch": 1}
    assert torch.equal(torch.randn(3), expected_noise)  # RNG restored to the saved point
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k]))
    assert a["param_groups"] == b["param_groups"]
