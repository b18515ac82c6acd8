"""Where jobs' results live on storage (a folder or s3://), and how a path given by a user is
resolved to them.

    {output}/{name}/checkpoint_*/    a training run's checkpoints (Ray Train's folders); each is an
                                     ediffi checkpoint directory with its training state
    {experts}/manifest.json          the ensemble manifest: each expert's noise interval and
                                     checkpoint, relative to the manifest (ediffi.ensemble)
    {data}/manifest.json             the embeddings manifest (ediffi_platform.precompute)

A *model* is an ensemble manifest, one checkpoint directory, or a training run folder (its latest
complete checkpoint); `resolve_model` turns any of them into a manifest or a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ediffi.checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, TRAINER_FILE, TRAINING_FILES
from ediffi.ensemble import write_manifest
from ediffi.unet import UNetConfig
from ediffi_platform.storage import (
    StorageConfig,
    absolute,
    filesystem,
    is_absolute,
    is_url,
    join,
    key,
    read_json,
    with_scheme,
)

ENSEMBLE_MANIFEST = "manifest.json"  # in the expert job's output folder
EMBEDDINGS_MANIFEST = "manifest.json"  # in an embeddings folder


# --- training runs and their checkpoints ----------------------------------------------------------


def latest_checkpoint(run: str, storage: StorageConfig = StorageConfig()) -> tuple[str | None, int]:
    """The complete checkpoint with the highest step in a run folder and its step; (None, -1) when
    there is none. A checkpoint missing any file (its copy was cut short) does not count."""
    fs, root = filesystem(run, storage)
    best, best_step = None, -1
    for marker in fs.glob(join(root, "checkpoint_*", TRAINER_FILE)):
        folder = marker.rsplit("/", 1)[0]
        if not all(fs.exists(join(folder, f)) for f in TRAINING_FILES):
            continue
        with fs.open(marker) as f:
            step = json.load(f)["state"]["step"]
        if step > best_step:
            best, best_step = folder, step
    return (None, -1) if best is None else (with_scheme(best, run), best_step)


def training_state(checkpoint: str, storage: StorageConfig = StorageConfig()) -> dict:
    """The training state (step, data position, EMA updates, MLflow run) saved in a checkpoint."""
    fs, p = filesystem(checkpoint, storage)
    f = join(p, TRAINER_FILE)
    if not fs.exists(f):
        raise FileNotFoundError(f"{checkpoint}: not a training checkpoint (no {TRAINER_FILE})")
    return read_json(fs, f)["state"]


def is_checkpoint(path: str, storage: StorageConfig = StorageConfig()) -> bool:
    """True when the path is an ediffi checkpoint directory."""
    fs, p = filesystem(path, storage)
    return fs.exists(join(p, CONFIG_FILE))


def resolve_checkpoint(path: str, storage: StorageConfig = StorageConfig()) -> str:
    """A checkpoint folder as given, or the latest checkpoint of a training run folder."""
    if is_checkpoint(path, storage):
        return absolute(path)
    ckpt, _ = latest_checkpoint(absolute(path), storage)
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint ({CONFIG_FILE}) nor a training run with complete checkpoints"
        )
    return ckpt


# --- models: an ensemble manifest, a checkpoint, or a run folder -----------------------------------


def is_ensemble_manifest(path: str) -> bool:
    return path.endswith(".json")


def resolve_model(uri: str, storage: StorageConfig = StorageConfig()) -> str:
    """A manifest or checkpoint as given; a training run folder -> its latest checkpoint."""
    if is_ensemble_manifest(uri):
        fs, p = filesystem(uri, storage)
        if not fs.exists(p):
            raise FileNotFoundError(f"{uri}: ensemble manifest not found")
        return uri
    return resolve_checkpoint(uri, storage)


def expert_folder(manifest: str, checkpoint: str) -> str:
    """A manifest entry's checkpoint folder as a filesystem path (entries are relative to the manifest)."""
    if is_absolute(checkpoint):
        return key(checkpoint)
    return join(manifest.rsplit("/", 1)[0], checkpoint)


def model_config(model: str, storage: StorageConfig = StorageConfig()) -> dict:
    """config.json of the model's (first) checkpoint."""
    fs, p = filesystem(model, storage)
    if is_ensemble_manifest(model):
        p = expert_folder(p, json.loads(fs.cat(p))["experts"][0]["checkpoint"])
    return json.loads(fs.cat(join(p, CONFIG_FILE)))


def model_network(model: str, storage: StorageConfig = StorageConfig()) -> UNetConfig:
    """The network configuration of the model's (first) checkpoint."""
    return UNetConfig.from_dict(model_config(model, storage)["network"])


def model_id(uri: str, storage: StorageConfig = StorageConfig()) -> str:
    """A short hash of what the model is: the manifest (if any) and every checkpoint's config.json,
    whose weight digests change with the weights; a checkpoint saved before digests were recorded
    has its weight files hashed here instead."""
    fs, p = filesystem(uri, storage)
    h = hashlib.sha1()
    folders = [p]
    if is_ensemble_manifest(uri):
        doc = fs.cat(p)
        h.update(doc)
        try:
            folders = [expert_folder(p, e["checkpoint"]) for e in json.loads(doc)["experts"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{uri}: not a valid ensemble manifest ({e!r})") from None
    for folder in folders:
        config = fs.cat(join(folder, CONFIG_FILE))
        h.update(config)
        if "weights" not in json.loads(config):
            for f in (MODEL_FILE, EMA_FILE):
                if fs.exists(join(folder, f)):
                    with fs.open(join(folder, f), "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
    return h.hexdigest()[:12]


def fetch_model(uri: str, storage: StorageConfig = StorageConfig(), cache: str | None = None) -> str:
    """A local path to the model: as given when local, else downloaded (a manifest with the
    checkpoints it names, or one checkpoint folder) into `cache`."""
    if not is_url(uri):
        return uri
    fs, path = filesystem(uri, storage)
    cache = cache or tempfile.mkdtemp(prefix="ediffi-model-")
    if not is_ensemble_manifest(path):
        fs.get(path.rstrip("/") + "/", cache, recursive=True)
        return cache
    local = os.path.join(cache, os.path.basename(path))
    fs.get(path, local)
    doc = json.loads(Path(local).read_text())
    for e in doc.get("experts", []):
        ck = e.get("checkpoint", "")
        rel = hashlib.sha1(ck.encode()).hexdigest()[:12] if is_absolute(ck) else ck
        fs.get(expert_folder(path, ck).rstrip("/") + "/", os.path.join(cache, rel), recursive=True)
        e["checkpoint"] = rel
    Path(local).write_text(json.dumps(doc, indent=2))
    return local


def write_ensemble_manifest(output: str, intervals, checkpoints, metadata: dict, storage: StorageConfig) -> str:
    """The ensemble manifest in `output`, checkpoints relative to it (so the folder can move)."""
    fs, root = filesystem(output, storage)
    rel = [key(c) for c in checkpoints]
    rel = [os.path.relpath(c, root) if c.startswith(root.rstrip("/") + "/") else c for c in rel]
    if not is_url(output):
        return str(write_manifest(os.path.join(output, ENSEMBLE_MANIFEST), intervals, rel, metadata))
    with tempfile.TemporaryDirectory() as d:
        local = write_manifest(os.path.join(d, ENSEMBLE_MANIFEST), intervals, rel, metadata)
        fs.put(str(local), join(root, ENSEMBLE_MANIFEST))
    return join(output, ENSEMBLE_MANIFEST)


# --- embeddings ------------------------------------------------------------------------------------


def data_encoders(data: str, storage: StorageConfig = StorageConfig()) -> dict | None:
    """The encoder settings recorded in an embeddings folder's manifest (None if it has none)."""
    fs, root = filesystem(data, storage)
    return read_json(fs, join(root, EMBEDDINGS_MANIFEST)).get("encoders")
