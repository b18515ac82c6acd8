"""Checkpoints: safetensors weights (+ EMA) and a JSON config that rebuilds the network.

Layout of a checkpoint directory:
    config.json        {"format", "version", "network": UNetConfig, "metadata": {...},
                        "weights": {file name: sha256 of its bytes}}
    model.safetensors  network weights
    ema.safetensors    EMA weights (optional)
Loading never unpickles: a pickle or torch.save file in place of safetensors is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ediffi.edm import EDMPrecond
from ediffi.presets import build_denoiser
from ediffi.unet import UNetConfig

FORMAT = "ediffi-checkpoint"
VERSION = 1
CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
OPTIM_FILE, TRAINER_FILE = "optimizer.safetensors", "trainer.json"  # training state (save_training_state)
TRAINING_FILES = (CONFIG_FILE, MODEL_FILE, EMA_FILE, OPTIM_FILE, TRAINER_FILE)  # a complete training checkpoint


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe, or does not match its network."""


def read_json_file(f: Path, what: str, error: type[Exception] = CheckpointError):
    """Parse a JSON file; a missing or malformed file raises `error` naming the file and `what` it is."""
    try:
        return json.loads(Path(f).read_text())
    except FileNotFoundError:
        raise error(f"{f}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{f}: {what} is not valid JSON ({e})") from None


def _state(module_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(module_or_state, EDMPrecond):
        module_or_state = module_or_state.net
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    cfg: UNetConfig,
    model: nn.Module | dict[str, torch.Tensor],
    ema: nn.Module | dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a checkpoint directory (the network as EDMPrecond, UNet, or a UNet state dict)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {MODEL_FILE: model} if ema is None else {MODEL_FILE: model, EMA_FILE: ema}
    for f, m in weights.items():
        save_file(_state(m), str(path / f))
    if ema is None:
        (path / EMA_FILE).unlink(missing_ok=True)  # an older save's EMA is not these weights' EMA
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "network": cfg.to_dict(),
        "metadata": metadata or {},
        # What the weights are, readable from config.json alone: generation's image ids change with them.
        "weights": {f: file_digest(path / f) for f in weights},
    }
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return path


def file_digest(file: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_config(path: str | Path) -> tuple[UNetConfig, dict]:
    """The network config and metadata stored in a checkpoint directory."""
    f = Path(path) / CONFIG_FILE
    doc = read_json_file(f, "checkpoint config")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not an ediffi checkpoint config (format != {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{f}: unsupported checkpoint version {doc.get('version')!r} (expected {VERSION})")
    try:
        cfg = UNetConfig.from_dict(doc["network"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: invalid network config ({e})") from None
    return cfg, doc.get("metadata", {})


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with its JSON header's length (u64, little-endian), then the header."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; pickles and torch.save archives are refused unread."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    with open(file, "rb") as fh:
        head = fh.read(9)
    if not _is_safetensors(head, file.stat().st_size):
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":  # pickle protocol 2+ / zip (torch.save)
            raise CheckpointError(
                f"{file}: is a pickle / torch.save file; ediffi loads only safetensors and never unpickles"
            )
        raise CheckpointError(f"{file}: not a readable safetensors file (no safetensors header)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _check_matches(file: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(weights[k].shape)} vs network "
                f"{tuple(expected[k].shape)})"
            )
        raise CheckpointError(f"{file}: does not match the network in config.json: " + "; ".join(parts))


def load_checkpoint(
    path: str | Path, use_ema: bool = False, device: torch.device | str = "cpu"
) -> tuple[EDMPrecond, dict]:
    """Rebuild the denoiser from a checkpoint directory (EMA weights if use_ema) and its metadata."""
    path = Path(path)
    cfg, metadata = read_config(path)
    file = path / (EMA_FILE if use_ema else MODEL_FILE)
    weights = read_weights(file)
    D = build_denoiser(cfg, "meta")
    _check_matches(file, weights, D.net.state_dict())
    D = build_denoiser(cfg, "cpu")
    D.net.load_state_dict(weights, strict=True)
    return D.to(device).eval(), metadata


# --- training state (optimizer, step, RNG) beside the weights; still no pickles -----------------


def save_training_state(path: str | Path, optimizer: torch.optim.Optimizer | dict, state: dict) -> None:
    """Optimizer tensors as safetensors; its hyper-parameters, `state` (step, data position, ...) and
    the torch RNG as JSON/safetensors, so training resumes exactly. `optimizer` is an optimizer or
    its state dict (e.g. the full, name-keyed one of `ediffi.distributed.full_optimizer_state`)."""
    path = Path(path)
    sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path / OPTIM_FILE))
    doc = {"param_groups": sd["param_groups"], "scalars": scalars, "state": state}
    (path / TRAINER_FILE).write_text(json.dumps(doc, indent=2))


def _param_id(pid: str) -> int | str:
    return int(pid) if pid.isdigit() else pid  # optimizer index, or a parameter name (full state)


def read_optimizer_state(path: str | Path) -> dict:
    """The optimizer state dict saved in a checkpoint directory, as `save_training_state` got it."""
    path = Path(path)
    doc = read_json_file(path / TRAINER_FILE, "training state (of a weights-only checkpoint?)")
    state: dict = {}
    for k, v in read_weights(path / OPTIM_FILE).items():
        if k.startswith("state."):
            pid, name = k.removeprefix("state.").rsplit(".", 1)  # parameter names contain dots
            state.setdefault(_param_id(pid), {})[name] = v
    for k, v in doc["scalars"].items():
        pid, name = k.rsplit(".", 1)
        state.setdefault(_param_id(pid), {})[name] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore the torch RNG (and `optimizer`, when given and saved from a plain optimizer) from a
    checkpoint directory; returns the saved `state` dict (step, data position, ...)."""
    path = Path(path)
    doc = read_json_file(path / TRAINER_FILE, "training state (of a weights-only checkpoint?)")
    tensors = read_weights(path / OPTIM_FILE)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(read_optimizer_state(path))
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path / OPTIM_FILE}: does not match the optimizer ({e})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return doc["state"]
