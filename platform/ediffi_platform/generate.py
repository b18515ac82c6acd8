"""Batch generation: a prompt file -> images + metadata Parquet, with Ray Data generator actors.

Every requested image gets a stable id (a hash of prompt, seed and settings, never the prompt text)
that names its file; an actor writes a batch's images, then one metadata part named by a hash of
the batch's ids, so a retried batch overwrites rather than duplicates, and a re-run skips every id
already in the metadata. Seeds are per image (per-sample generators): the same prompt, seed and
settings give the same image whatever batch or actor runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ediffi.checkpoint import EMA_FILE, read_config
from ediffi.compilation import check_compile, for_sampling, use_compile
from ediffi.encoders import ConditioningEncoder, EncoderConfig, encoder_spec
from ediffi.pipeline import SamplerConfig, check_compatible, grid, sample, to_uint8
from ediffi.presets import memory_format
from ediffi.sr import Stage, cascade
from ediffi_platform import faults
from ediffi_platform.actors import check_pool, pool_args, start_actor
from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import JobFailed, from_dict, to_dict
from ediffi_platform.ingest import ImageFilter, clip_view, open_image
from ediffi_platform.prompts import MAX_IMAGES_PER_ROW, RANGES, PromptStats, Request, read_prompts, require_prompts
from ediffi_platform.runs import fetch_model, is_ensemble_manifest, model_config, model_id, model_network, resolve_model
from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem, is_absolute, is_url, join, write_json
from ediffi_platform.tracking import Tracker, TrackingConfig, flatten, usable

IMAGE_FORMATS = {"png": "PNG", "webp": "WEBP"}
AUTO_SEED_MAX = 2**62  # cfg.seed: seed + 1000 * line + k stays in int64 for any file under 4e15 lines
METADATA = "metadata"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class SRStageConfig:
    """A super-resolution stage of the cascade, run on the previous stage's output."""

    model: str  # its manifest, checkpoint folder or training run folder (an SR preset)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=18, guidance=1.0))
    aug_sigma: float = 0.1  # fixed noise-conditioning augmentation level of the low-resolution input

    def __post_init__(self) -> None:
        if self.aug_sigma < 0:
            raise ValueError(f"aug_sigma must be >= 0, got {self.aug_sigma}")


@dataclass(frozen=True)
class GenerateConfig:
    """The batch-generation job."""

    prompts: str = "prompts.txt"  # .txt / .jsonl / .csv / .parquet, local or s3://
    out: str = "outputs/generated"  # images/ + metadata/ + summary.json (folder or s3://)
    model: str = "runs/experts/manifest.json"  # ensemble manifest, checkpoint folder, or training run folder
    use_ema: bool = True  # EMA weights where the checkpoint has them
    encoders: EncoderConfig | None = None  # unset = the encoders recorded with the model's training data
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=32, guidance=2.0))  # defaults per row
    sr_stages: tuple[SRStageConfig, ...] = ()  # the cascade after the base model: text -> base -> SR -> SR
    images_per_prompt: int = 1  # images per row (a .jsonl/.csv row's `images` overrides)
    paint_strength: float = 0.5  # paint-with-words w' for rows with masks (a row's `paint_strength` overrides)
    seed: int = 0  # 0..2**62; a row without a seed uses seed + 1000 * line; its image k uses that + k
    prompt_column: str = "prompt"  # the prompt column of .csv / .parquet files
    on_bad_row: str = "skip"  # skip (report and count) or fail
    image_format: str = "png"  # png or webp
    batch_size: int = 8  # images per actor call
    concurrency: int = 1  # generator actors
    num_gpus: float = 0.0  # GPUs per actor
    num_cpus: float = 1.0  # CPUs per actor
    threads_per_actor: int = 0  # torch CPU threads per actor; 0 = its CPU share rounded up
    memory_format: str = "auto"  # conv layout: auto (channels_last on CPU, default on GPU), channels_last, contiguous
    compile: bool | str = (
        "auto"  # torch.compile the denoisers: auto (where bench_model.py shows a win: GPU), true, false
    )
    grid_images: int = 16  # images in the sample grid logged to MLflow (0 = none)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials
    ray_address: str | None = None  # Ray cluster address; unset = RAY_ADDRESS or a local cluster

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("skip", "fail"):
            raise ValueError(f"on_bad_row must be skip or fail, got {self.on_bad_row!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}")
        check_pool(self)
        if not 1 <= self.images_per_prompt <= MAX_IMAGES_PER_ROW:
            raise ValueError(f"images_per_prompt must be in 1..{MAX_IMAGES_PER_ROW}, got {self.images_per_prompt}")
        if not 0 <= self.seed <= AUTO_SEED_MAX:
            raise ValueError(f"seed must be in 0..2**62, got {self.seed}")
        lo, hi = RANGES["paint_strength"]
        if not lo <= self.paint_strength <= hi:  # NaN fails too
            raise ValueError(f"paint_strength must be in {lo}..{hi}, got {self.paint_strength}")
        memory_format(self.memory_format, "cpu")
        check_compile(self.compile)


# --- the model (found and fetched by ediffi_platform.runs) ---------------------------------------


def load_model(local: str, use_ema: bool, device: str, layout: str = "contiguous"):
    """(denoiser, network config, metadata of the first checkpoint) from a local manifest or checkpoint,
    its convolutions in the given memory format (GenerateConfig.memory_format)."""
    from ediffi.checkpoint import load_checkpoint
    from ediffi.ensemble import load_ensemble, read_manifest

    fmt = memory_format(layout, device)
    if is_ensemble_manifest(local):
        first = read_manifest(local)[1][0]
        net_cfg, meta = read_config(first)
        ensemble = load_ensemble(local, use_ema=use_ema, device=device)
        for expert in ensemble.experts:
            expert.to(memory_format=fmt)
        return ensemble, net_cfg, meta
    ema = use_ema and os.path.isfile(os.path.join(local, EMA_FILE))
    D, meta = load_checkpoint(local, use_ema=ema, device=device)
    return D.to(memory_format=fmt), read_config(local)[0], meta


# --- rows: one per requested image ---------------------------------------------------------------


# GenerateConfig fields that cannot change an image's pixels, or that enter its id in another form.
# Every other field is part of every image's id (image_settings), so a new field is covered unless
# it is listed here.
NOT_IN_IMAGE_ID = frozenset(
    {
        # where rows come from and results go
        *("prompts", "prompt_column", "on_bad_row", "out", "grid_images", "tracking", "storage", "ray_address"),
        # enter in another form: the model by content (model_id), a row's own seed and paint strength
        *("model", "seed", "images_per_prompt", "paint_strength"),
        # how the work is spread: the same pixels up to float rounding
        *("batch_size", "concurrency", "num_gpus", "num_cpus", "threads_per_actor", "memory_format", "compile"),
    }
)


def image_settings(cfg: GenerateConfig, encoders: dict, mid: str, sr_ids: tuple[str, ...] = ()) -> dict:
    """The job-wide part of every image's id: each GenerateConfig field not in NOT_IN_IMAGE_ID, with
    the encoders as they will run and each model (base, SR stages) by its content id."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_IMAGE_ID}
    settings["encoders"] = encoders
    settings["sr_stages"] = [{**st, "model": m} for st, m in zip(settings["sr_stages"], sr_ids, strict=True)]
    settings["model"] = mid
    return settings


def expand(requests: list[Request], cfg: GenerateConfig, settings: dict) -> list[dict]:
    """One row per image with its resolved settings and stable id: a hash of the row's own values
    (prompt, seed, steps, guidance, style, masks, paint strength, user id) and the job's settings."""
    rows = []
    for r in requests:
        base = r.seed if r.seed is not None else cfg.seed + 1000 * r.line
        masks = json.dumps(_resolve_masks(r.masks, cfg.prompts), sort_keys=True) if r.masks else ""
        for k in range(r.images or cfg.images_per_prompt):
            row = {
                "prompt": r.prompt,
                "seed": base + k,
                "steps": r.steps or cfg.sampler.steps,
                "guidance": cfg.sampler.guidance if r.guidance is None else r.guidance,
                "sampler": cfg.sampler.sampler,
                "style": _resolve(r.style, cfg.prompts) if r.style else "",
                "masks": masks,
                "paint_strength": float(cfg.paint_strength if r.paint_strength is None else r.paint_strength)
                if masks
                else 0.0,
                "line": r.line,
                "prompt_id": r.id or "",
            }
            own = {k: row[k] for k in ("prompt", "seed", "style", "masks", "paint_strength", "prompt_id")}
            sampler = {**settings["sampler"], "steps": row["steps"], "guidance": row["guidance"]}
            key = json.dumps({**settings, **own, "sampler": sampler}, sort_keys=True)
            row["id"] = hashlib.sha1(key.encode()).hexdigest()[:20]
            rows.append(row)
    return rows


def _resolve(path: str, prompts: str) -> str:
    """A path from a prompt row: absolute and URLs as given, others relative to the prompt file."""
    if is_absolute(path):
        return path
    base = prompts.rsplit("/", 1)[0] if "/" in prompts else "."
    return join(base, path) if is_url(base) else os.path.abspath(os.path.join(base, path))


def _resolve_masks(masks: dict, prompts: str) -> dict:
    return {ph: _resolve(m, prompts) if isinstance(m, str) else m for ph, m in masks.items()}


def check_requests(requests: list[Request], cfg: GenerateConfig, tokenizers) -> list[tuple[Request, str]]:
    """Rows whose style image or masks cannot work, with the reason (reported like malformed rows)."""
    from ediffi.paint import phrase_tokens, rasterize

    bad = []
    for r in requests:
        try:
            if r.style:
                fs, p = filesystem(_resolve(r.style, cfg.prompts), cfg.storage)
                if not fs.exists(p):
                    raise ValueError(f"style image {r.style!r} not found")
            for phrase, spec in _resolve_masks(r.masks or {}, cfg.prompts).items():
                phrase_tokens(tokenizers, r.prompt, phrase)
                if isinstance(spec, str) and is_url(spec):
                    fs, p = filesystem(spec, cfg.storage)
                    if not fs.exists(p):
                        raise ValueError(f"mask image {spec!r} not found")
                elif isinstance(spec, str):  # a local mask image (rect / polygon shapes were checked when read)
                    rasterize(spec, 8)
        except ValueError as e:
            bad.append((r, str(e).removeprefix("paint-with-words: ")))
    return bad


def done_ids(cfg: GenerateConfig) -> set[str]:
    """Ids already in the output's metadata parts."""
    return set(_metadata_ids(cfg))


def _metadata_ids(cfg: GenerateConfig) -> list[str]:
    """The id of every row of the output's metadata parts, repeats kept."""
    fs, root = filesystem(cfg.out, cfg.storage)
    afs = arrow_filesystem(fs)
    ids: list[str] = []
    for p in fs.glob(join(root, METADATA, "part-*.parquet")):
        ids += pq.read_table(p, columns=["id"], filesystem=afs).column("id").to_pylist()
    return ids


def image_path(cfg: GenerateConfig, id_: str) -> str:
    """Where an image goes, relative to the output folder."""
    return f"images/{id_[:2]}/{id_}.{cfg.image_format}"


class _Timed:
    """A denoiser wrapper that adds up the time spent inside the network."""

    def __init__(self, D):
        self.D, self.seconds = D, 0.0

    def __call__(self, x, sigma, cond):
        t = time.perf_counter()
        out = self.D(x, sigma, cond)
        self.seconds += time.perf_counter() - t
        return out


@dataclass
class Seconds:
    """Seconds spent per part of the work; network is inside sample, sr_network a part of network."""

    encode: float = 0.0  # text (and style image) encoding
    sample: float = 0.0  # sampling, the whole cascade
    network: float = 0.0  # inside the denoisers (base and SR)
    sr_network: float = 0.0  # inside the SR stages' denoisers
    write: float = 0.0  # writing the images

    def add(self, batch: pa.Table) -> None:
        """Add a batch of the generator actors' output (a `{part}_s` column per field)."""
        for k in asdict(self):
            setattr(self, k, getattr(self, k) + float(pa.compute.sum(batch.column(f"{k}_s")).as_py()))


class ImageGenerator:
    """Ray Data callable class: model and encoders loaded once; a batch of rows -> images, metadata."""

    def __init__(
        self,
        cfg: GenerateConfig,
        model: str,
        mid: str,
        encoders: dict,
        sr_models: tuple = (),
        *,
        fail_after=None,
        compile_options: dict | None = None,
    ):
        self.cfg, self.model, self.mid, self.fail_after = cfg, model, mid, fail_after
        self.device = start_actor(cfg)
        local = fetch_model(model, cfg.storage)
        D, self.net_cfg, _ = load_model(local, cfg.use_ema, self.device, cfg.memory_format)
        self.compiled = compiled = use_compile(cfg.compile, self.device, "sample")
        self.eager = D  # paint-with-words changes its attention blocks: it runs eagerly
        self.D = _Timed(for_sampling(D, compiled, **(compile_options or {})))
        self.encoder = ConditioningEncoder(from_dict(EncoderConfig, encoders)).to(self.device).eval()
        check_compatible(self.encoder.spec, self.net_cfg.cond)
        self.sr = []  # the cascade's SR stages, each timed on its own
        for st, uri in zip(cfg.sr_stages, sr_models, strict=True):
            D_sr, net_sr, _ = load_model(fetch_model(uri, cfg.storage), cfg.use_ema, self.device, cfg.memory_format)
            if not net_sr.sr:
                raise ValueError(f"sr_stages: {uri} is not a super-resolution model")
            check_compatible(self.encoder.spec, net_sr.cond)
            self.sr.append(
                Stage(
                    _Timed(for_sampling(D_sr, compiled, **(compile_options or {}))),
                    net_sr.img_resolution,
                    st.sampler,
                    st.aug_sigma,
                )
            )
        self.fs, self.root = filesystem(cfg.out, cfg.storage)
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # 1. Text (and style images) -> conditioning.
        t0 = time.perf_counter()
        cond, stats = self._encode(rows)
        # 2. Sampling, a group of rows with the same sampler settings at a time.
        t1 = time.perf_counter()
        for D in (self.D, *(st.denoiser for st in self.sr)):
            D.seconds = 0.0
        images = self._sample(rows, cond)
        # 3. The images, then the batch's metadata part (its name a hash of the ids: a retry overwrites it).
        t2 = time.perf_counter()
        self._write_images(rows, images)
        t3 = time.perf_counter()
        self._write_metadata(rows, images, stats.truncated_rows, seconds=(t3 - t0) / len(rows))
        # 4. What the driver adds up: truncated prompts, seconds per part, when this actor was ready.
        sr_network = sum(st.denoiser.seconds for st in self.sr)
        network = self.D.seconds + sr_network
        seconds = Seconds(encode=t1 - t0, sample=t2 - t1, network=network, sr_network=sr_network, write=t3 - t2)
        n = len(rows)
        return pa.table(
            {
                "id": [r["id"] for r in rows],
                "truncated": stats.truncated_rows,
                **{f"{k}_s": [v / n] * n for k, v in asdict(seconds).items()},
                "ready": [self.ready] * n,
                "compiled": [self.compiled] * n,
            }
        )

    def _encode(self, rows: list[dict]):
        """(conditioning, encoding stats) of the rows; style rows condition through the CLIP image embedding."""
        cond, stats = self.encoder.encode([r["prompt"] for r in rows])
        styled = [i for i, r in enumerate(rows) if r["style"]]
        if styled:
            emb = self.encoder.encode_images(torch.stack([self._image(rows[i]["style"]) for i in styled]))
            cond.clip_image[styled] = emb.to(cond.clip_image.dtype)
            cond.clip_image_mask[styled] = True
        return cond, stats

    def _sample(self, rows: list[dict], cond) -> list[np.ndarray]:
        """uint8 [R, R, 3] images of the rows, sampled a group of equal settings at a time."""
        images: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):  # painted rows apart: their attention takes another code path
            groups.setdefault((r["steps"], r["guidance"], r["sampler"], r["paint_strength"]), []).append(i)
        for (steps, guidance, sampler, strength), idx in groups.items():
            scfg = replace(self.cfg.sampler, steps=steps, guidance=guidance, sampler=sampler)
            x = self._sample_group([rows[i] for i in idx], cond[idx], scfg, strength)
            for i, img in zip(idx, to_uint8(x).numpy(), strict=True):
                images[i] = img
        return images

    def _sample_group(self, rows: list[dict], cond, scfg: SamplerConfig, strength: float) -> torch.Tensor:
        """One group's images through the base model (painted with words when strength > 0) and the SR stages."""
        R = self.net_cfg.img_resolution
        D = self.D
        if strength > 0:
            from ediffi.paint import PaintWithWords, paint_masks

            masks = paint_masks(self.encoder, [r["prompt"] for r in rows], [self._masks(r) for r in rows], R)
            D = _Timed(PaintWithWords(self.eager, masks, strength))
        seeds = [r["seed"] for r in rows]
        if self.sr:
            x = cascade([Stage(D, R, scfg), *self.sr], cond, seeds, self.device)[-1]
        else:
            x = sample(D, cond, (3, R, R), seeds, scfg, self.device)
        if D is not self.D:
            self.D.seconds += D.seconds
        return x

    def _write_images(self, rows: list[dict], images: list[np.ndarray]) -> None:
        for n, (r, img) in enumerate(zip(rows, images, strict=True)):
            self._write_image(r["id"], img)
            if n + 1 == self.fail_after:  # testing only (EDIFFI_TEST_FAULTS)
                faults.die_once(join(self.root, faults.MARKER), self.cfg.storage)

    def _write_metadata(self, rows: list[dict], images: list[np.ndarray], truncated: list, seconds: float) -> None:
        """The batch's metadata part, one row per image; `seconds` is each image's share of the batch."""
        n = len(rows)
        meta = {
            "id": [r["id"] for r in rows],
            "prompt_id": pa.array([r["prompt_id"] for r in rows], pa.string()),  # the user's id ("" = none)
            **{k: [r[k] for r in rows] for k in ("prompt", "line", "seed", "sampler", "steps")},
            "guidance": [float(r["guidance"]) for r in rows],
            **{k: [r[k] for r in rows] for k in ("style", "masks", "paint_strength")},
            "model": [self.model] * n,
            "model_id": [self.mid] * n,
            "resolution": [int(images[0].shape[0])] * n,
            "image": [image_path(self.cfg, r["id"]) for r in rows],
            "truncated": truncated,
            "seconds": [seconds] * n,
        }
        digest = hashlib.sha1("\n".join(sorted(meta["id"])).encode()).hexdigest()[:16]
        self.fs.makedirs(join(self.root, METADATA), exist_ok=True)
        path = join(self.root, METADATA, f"part-{digest}.parquet")
        pq.write_table(pa.table(meta), path, filesystem=arrow_filesystem(self.fs))

    def _image(self, uri: str) -> torch.Tensor:
        """A reference image as CLIP sees it (ingest.clip_view, as the precompute gave it the training
        images), uint8 [3, S, S]."""
        fs, p = filesystem(uri, self.cfg.storage)
        with fs.open(p, "rb") as f:
            img, why = open_image(f.read(), ImageFilter(max_aspect=math.inf))
        if img is None:
            raise ValueError(f"style image {uri}: {why.replace('_', ' ')}")
        return torch.from_numpy(clip_view(img, self.encoder.image_size).copy()).permute(2, 0, 1)

    def _masks(self, row: dict) -> dict:
        """The row's masks, with image files on object stores fetched as arrays."""
        from PIL import Image

        out = {}
        for phrase, spec in json.loads(row["masks"]).items():
            if isinstance(spec, str) and is_url(spec):
                fs, p = filesystem(spec, self.cfg.storage)
                with fs.open(p, "rb") as f:
                    spec = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
            out[phrase] = spec
        return out

    def _write_image(self, id_: str, img: np.ndarray) -> None:
        from PIL import Image

        path = join(self.root, image_path(self.cfg, id_))
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            Image.fromarray(img).save(f, format=IMAGE_FORMATS[self.cfg.image_format])


@dataclass(frozen=True)
class _Job:
    """What the checks before any actor starts settled."""

    requests: list[Request]  # the usable rows of the prompt file
    pstats: PromptStats  # what reading it found (bad rows include those whose style / masks cannot work)
    model: str  # the base model's manifest or checkpoint
    sr_models: tuple[str, ...]  # each SR stage's
    mid: str  # the base model's content id
    encoders: dict  # the encoders as they will run
    settings: dict  # the job-wide part of every image's id (image_settings)


def run_generate(cfg: GenerateConfig, progress=print) -> dict:
    """Check the inputs, then attach to Ray (ensure_ray: none is started for input that cannot work)
    and run the job; returns the summary it writes to {out}/summary.json."""
    t_start = time.time()
    # 1. Everything checkable before any actor starts: prompts, model, encoders, tracking.
    job = _check_job(cfg, progress)
    tracking = usable(cfg.tracking, "generation")
    ensure_ray(cfg.ray_address)
    # 2. Rows, minus what an earlier run wrote.
    unique = {r["id"]: r for r in expand(job.requests, cfg, job.settings)}
    done = done_ids(cfg) & set(unique)
    todo = [r for i, r in unique.items() if i not in done]
    _report_rows(job, len(unique), len(done), len(todo), progress)
    # 3. Generate.
    run = _generate(cfg, job, todo, progress) if todo else {"images": 0, "truncated_prompts": 0}
    # 4. Check: every requested id exactly once in the metadata; the summary.
    summary = _finish(cfg, job, unique=unique, run=run, seconds=time.time() - t_start)
    _track(cfg, tracking, summary, job.encoders)
    progress(
        f"generate: {summary['images_total']} images in {cfg.out} ({summary['generated_now']} now); "
        f"metadata {join(cfg.out, METADATA)}/"
    )
    return summary


def _check_job(cfg: GenerateConfig, progress) -> _Job:
    """The prompt file read, the models resolved and the encoders checked against them: nothing an actor
    would find out later."""
    requests, pstats = read_prompts(cfg.prompts, cfg.storage, cfg.prompt_column, cfg.on_bad_row)
    for line, reason in pstats.bad[:20]:
        progress(f"generate: {cfg.prompts}: line {line}: {reason} (skipped)")
    if len(pstats.bad) > 20:
        progress(f"generate: ... and {len(pstats.bad) - 20} more bad rows")
    require_prompts(cfg.prompts, requests, pstats)  # nothing valid: fail now, with the reasons
    model = resolve_model(cfg.model, cfg.storage)
    sr_models = tuple(resolve_model(st.model, cfg.storage) for st in cfg.sr_stages)
    for uri in sr_models:
        if not model_network(uri, cfg.storage).sr:
            raise ValueError(f"sr_stages: {uri} is not a super-resolution model")
    mid = model_id(model, cfg.storage)
    encoders = job_encoders(cfg, model)
    check_encoders(encoders, (model, *sr_models), cfg.storage)
    settings = image_settings(cfg, encoders, mid, tuple(model_id(m, cfg.storage) for m in sr_models))
    if any(r.style or r.masks for r in requests):
        requests = _drop_unusable(cfg, requests, pstats, model=model, encoders=encoders, progress=progress)
    require_prompts(cfg.prompts, requests, pstats)
    return _Job(requests, pstats, model, sr_models, mid, encoders, settings)


def _drop_unusable(
    cfg: GenerateConfig, requests: list[Request], pstats: PromptStats, *, model: str, encoders: dict, progress
) -> list[Request]:
    """The requests minus those whose style image or masks cannot work (each reported and counted as a
    bad row in pstats, or the job fails on the first with on_bad_row=fail)."""
    from ediffi.encoders import load_tokenizers

    tokenizers = load_tokenizers(from_dict(EncoderConfig, encoders), model_network(model, cfg.storage).cond)
    for r, reason in check_requests(requests, cfg, tokenizers):
        if cfg.on_bad_row == "fail":
            raise ValueError(f"{cfg.prompts}: line {r.line}: {reason}")
        progress(f"generate: {cfg.prompts}: line {r.line}: {reason} (skipped)")
        pstats.bad.append((r.line, reason))
        requests = [q for q in requests if q is not r]
    return requests


def _report_rows(job: _Job, images: int, done: int, todo: int, progress) -> None:
    p = job.pstats
    progress(
        f"generate: {len(job.requests)} prompts ({p.rows} rows, {len(p.bad)} bad, {p.blank} blank, "
        f"{p.normalized} normalised) -> {images} images; {done} already written, {todo} to do"
    )
    if p.duplicate_ids:
        progress(f"generate: {p.duplicate_ids} ids name more than one row (each row keeps its own images)")


def _generate(cfg: GenerateConfig, job: _Job, todo: list[dict], progress) -> dict:
    """Run the rows through a pool of ImageGenerator actors; what the run did and how fast (summary's `run`)."""
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / cfg.batch_size)))
    ds = ds.map_batches(
        ImageGenerator,
        fn_constructor_kwargs={
            "cfg": cfg,
            "model": job.model,
            "mid": job.mid,
            "encoders": job.encoders,
            "sr_models": job.sr_models,
            "fail_after": faults.planned("generate"),
            "compile_options": faults.compile_options(),
        },
        batch_format="pyarrow",
        **pool_args(cfg),
    )
    t0, last = time.time(), 0.0
    images, truncated, ready, seconds, compiled = 0, 0, math.inf, Seconds(), False
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        images += b.num_rows
        compiled |= bool(pa.compute.any(b.column("compiled")).as_py())
        truncated += int(pa.compute.sum(b.column("truncated")).as_py() or 0)
        ready = min(ready, pa.compute.min(b.column("ready")).as_py())  # the first actor's start-up done
        seconds.add(b)
        now = time.time()
        if now - last > 5 or images == len(todo):
            rate = images / (now - t0)
            eta = (len(todo) - images) / rate if rate > 0 else math.inf
            progress(f"generate: {images}/{len(todo)} images, {rate:.2f} img/s, ETA {eta:.0f} s")
            last = now
    end = time.time()
    busy = seconds.encode + seconds.sample + seconds.write
    return {
        "images": images,
        "truncated_prompts": truncated,
        "seconds": end - t0,
        "images_per_s": images / (end - t0),
        "images_per_s_after_startup": images / (end - ready),
        "seconds_per_image": {k: v / images for k, v in asdict(seconds).items()},
        "network_share": seconds.network / busy if busy else 0.0,
        "compiled": compiled,  # the denoisers ran under torch.compile (GenerateConfig.compile)
    }


def check_encoders(encoders: dict, models: tuple[str, ...], storage: StorageConfig) -> None:
    """Fail before any actor starts when the encoders' output shapes do not fit a model's conditioning."""
    spec = encoder_spec(from_dict(EncoderConfig, encoders))
    for m in models:
        if spec is not None:
            diff = spec.first_difference(model_network(m, storage).cond)
            if diff:
                name, got, want = diff
                raise ValueError(
                    f"{m}: the encoders (t5={encoders['t5']!r}, clip={encoders['clip']!r}) produce {name}={got}, "
                    f"the model expects {name}={want}"
                )


def job_encoders(cfg: GenerateConfig, model: str) -> dict:
    """The encoders the job runs: cfg.encoders when set, else those recorded with the model."""
    if cfg.encoders:
        return to_dict(cfg.encoders)
    meta = model_config(model, cfg.storage).get("metadata", {})
    if not meta.get("encoders"):
        raise ValueError(
            f"{model}: the checkpoint does not record its encoders (trained before they were recorded); "
            "set encoders.* in the generation config"
        )
    return meta["encoders"]


def _finish(cfg: GenerateConfig, job: _Job, *, unique: dict, run: dict, seconds: float) -> dict:
    """Check that every requested id is in the metadata exactly once; write and return the summary."""
    counts = Counter(_metadata_ids(cfg))
    missing = [i for i in unique if i not in counts]
    dupes = [i for i, n in counts.items() if n > 1]
    if missing or dupes:
        raise JobFailed(f"{cfg.out}: {len(missing)} requested images missing, {len(dupes)} duplicated in metadata")
    p = job.pstats
    summary = {
        "prompts": cfg.prompts,
        "model": job.model,
        "model_id": job.mid,
        "rows": p.rows,
        "bad_rows": [{"line": n, "reason": r} for n, r in p.bad],
        "blank_lines": p.blank,
        "normalized_prompts": p.normalized,  # valid rows whose text normalisation changed (text.py)
        "duplicate_ids": p.duplicate_ids,
        "images_requested": len(unique),
        "images_total": len(counts),
        "generated_now": run["images"],
        "skipped_done": len(unique) - run["images"],
        "run": run,
        "seconds": seconds,
    }
    fs, root = filesystem(cfg.out, cfg.storage)
    write_json(fs, join(root, SUMMARY), summary)
    return summary


def _track(cfg, tracking, summary: dict, encoders: dict) -> None:
    tracker = Tracker(tracking, run_name="generate")
    if not tracker.run_id:
        return
    tracker.params(flatten({**to_dict(replace(cfg, tracking=tracking)), "encoders": encoders}))
    run = summary["run"]
    metrics = {k: run[k] for k in ("images", "images_per_s", "images_per_s_after_startup", "network_share") if k in run}
    metrics.update({f"seconds_per_image/{k}": v for k, v in run.get("seconds_per_image", {}).items()})
    metrics.update(bad_rows=len(summary["bad_rows"]), truncated_prompts=run["truncated_prompts"])
    tracker.metrics(metrics, 0)
    if cfg.grid_images:
        fs, root = filesystem(cfg.out, cfg.storage)
        from PIL import Image

        paths = sorted(fs.glob(join(root, "images", "*", f"*.{cfg.image_format}")))[: cfg.grid_images]
        if paths:
            imgs = [np.asarray(Image.open(fs.open(p, "rb")).convert("RGB")) for p in paths]
            tracker.image(grid(torch.from_numpy(np.stack(imgs))).numpy(), "samples/grid.png")
    tracker.tag("output", cfg.out)
    tracker.finish()
