"""Ray Data: image-text Parquet shards -> embedding shards, resumable shard by shard.

    read (Parquet, include_paths) -> decode (CPU tasks: the training image, and CLIP's view of the
    source image) -> Embedder (actor pool, encoders loaded once) -> write parts (CPU tasks) ->
    driver: mark each input shard done once all its rows are accounted for, then write the manifest.

Output layout, per input shard `NAME.parquet`:
    {output}/NAME/part-<content hash>.parquet   embedding rows (see shards.py)
    {output}/NAME/_SUCCESS.json                 counts; present only when the shard is complete
    {output}/manifest.json                      totals, encoders, schema, and what this run did
                                                (`last_run`: rows read, shards processed / skipped)
A re-run skips shards with _SUCCESS.json and clears any partial output of the others first, so an
interrupted job, run again, ends with every row exactly once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ediffi.conditioning import cond_to_numpy
from ediffi.encoders import ConditioningEncoder, EncoderConfig, clip_image_size, encoder_spec
from ediffi_platform.actors import check_pool, pool_args, start_actor
from ediffi_platform.config import to_dict
from ediffi_platform.ingest import (
    DROP_REASONS,
    ImageFilter,
    InputConfig,
    check_schema,
    list_shards,
    read_and_decode,
    shard_name,
)
from ediffi_platform.runs import EMBEDDINGS_MANIFEST
from ediffi_platform.shards import TENSOR_COLUMNS, ShardMeta, build_table, read_meta
from ediffi_platform.storage import (
    StorageConfig,
    arrow_filesystem,
    filesystem,
    join,
    read_json,
    write_json,
)

SUCCESS = "_SUCCESS.json"
MANIFEST_FORMAT = "ediffi-embeddings"


@dataclass(frozen=True)
class PrecomputeConfig:
    """The embedding precompute job."""

    input: InputConfig = field(default_factory=InputConfig)  # where the image-text shards are
    output: str = "data/embeddings"  # folder or s3:// prefix for embedding shards
    image: ImageFilter = field(default_factory=ImageFilter)  # resolution and filters
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # T5 / CLIP and their dtype
    encode_images: bool = True  # also store the CLIP image embedding of each image
    storage_dtype: str = "float16"  # dtype of stored embeddings: float16 or float32
    batch_size: int = 64  # rows per encoder batch
    concurrency: int = 1  # embedding actors
    num_gpus: float = 0.0  # GPUs per embedding actor (0 on CPU machines)
    num_cpus: float = 0.5  # CPUs per embedding actor (fractional keeps small clusters from stalling)
    decode_cpus: float = 1.0  # CPUs per read-and-decode task (one per input shard at a time)
    threads_per_actor: int = 0  # torch CPU threads per actor; 0 = its CPU share rounded up
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials
    ray_address: str | None = None  # Ray cluster address; unset = RAY_ADDRESS or a local cluster

    def clip_size(self) -> int:
        """The side of the CLIP views decoded from the source images (0: no image embeddings)."""
        return clip_image_size(self.encoders) if self.encode_images else 0

    def __post_init__(self) -> None:
        check_pool(self)
        if not self.decode_cpus > 0:
            raise ValueError(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if self.storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be float16 or float32, got {self.storage_dtype!r}")


class Embedder:
    """Ray Data callable class: encoders loaded once per actor; encodes the kept rows of a batch."""

    def __init__(self, cfg: PrecomputeConfig):
        self.cfg = cfg
        self.device = start_actor(cfg)
        self.encoder = ConditioningEncoder(cfg.encoders).to(self.device)
        self.meta = ShardMeta(self.encoder.spec, cfg.image.resolution, cfg.storage_dtype)
        if cfg.encode_images and self.encoder.image_size != cfg.clip_size():
            raise ValueError(
                f"CLIP model {cfg.encoders.clip!r} takes {self.encoder.image_size} px images, its config says "
                f"{cfg.clip_size()} px"
            )
        self.ready = time.time()  # encoders loaded: start-up ends here (for throughput figures)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = np.asarray(batch.column("drop_reason").to_pylist()) == ""
        idx = np.flatnonzero(keep)
        R = self.cfg.image.resolution
        extra = {c: batch.column(c) for c in self.cfg.input.keep_columns}
        columns: dict = {
            "key": batch.column("key").take(idx),
            "caption": batch.column("caption").take(idx),
        }
        if len(idx):
            images = _square_images(batch.column("image").take(idx), R)
            prompts = columns["caption"].to_pylist()
            pixels = None
            if self.cfg.encode_images:  # CLIP's view of each source image (ingest.clip_view)
                views = _square_images(batch.column("clip_view").take(idx), self.encoder.image_size)
                pixels = torch.from_numpy(views).permute(0, 3, 1, 2)
            cond, stats = self.encoder.encode(prompts, pixels)
            columns.update(image=images, **cond_to_numpy(cond, self.cfg.storage_dtype))
            truncated = stats.truncated_rows
        else:
            layout = self.meta.layout()
            columns.update({k: np.zeros((0, *s), d) for k, (s, d) in layout.items()})
            truncated = []
        columns.update({c: v.take(idx) for c, v in extra.items()})
        kept = build_table(self.meta, columns)
        # Pass the batch's bookkeeping on to the writer alongside the kept rows.
        kept = kept.append_column("shard", batch.column("shard").take(idx))
        kept = kept.append_column("truncated", pa.array(truncated, pa.bool_()))
        kept = kept.append_column("normalized", batch.column("normalized").take(idx))
        dropped = batch.filter(pa.array(~keep)).select(["key", "shard", "drop_reason"])
        packed = _pack(kept, dropped)
        return packed.append_column("ready", pa.array([self.ready] * packed.num_rows, pa.float64()))


def _square_images(col: pa.ChunkedArray, side: int) -> np.ndarray:
    """A column of decoded RGB images (raw bytes) as uint8 [B, side, side, 3]."""
    return np.stack([np.frombuffer(b, np.uint8).reshape(side, side, 3) for b in col.to_pylist()])


def _pack(kept: pa.Table, dropped: pa.Table) -> pa.Table:
    """Kept rows plus one row per dropped input (tensor columns null), in one table."""
    kept = kept.append_column("drop_reason", pa.array([""] * kept.num_rows, pa.string()))
    if dropped.num_rows == 0:
        return kept
    fill = {
        n: pa.nulls(dropped.num_rows, kept.schema.field(n).type)
        for n in kept.schema.names
        if n not in dropped.schema.names
    }
    dropped = pa.table({**fill, **{c: dropped.column(c) for c in dropped.schema.names}})
    return pa.concat_tables([kept, dropped.select(kept.schema.names).cast(kept.schema)])


def write_parts(batch: pa.Table, output: str, storage: StorageConfig) -> pa.Table:
    """Ray Data stage: write each shard's kept rows as one part file; return one stats row per shard."""
    fs, root = filesystem(output, storage)
    afs = arrow_filesystem(fs)
    meta_schema = batch.schema
    stats = {"shard": [], "rows": [], "written": [], "truncated": [], "normalized": [], "dropped": [], "ready": []}
    for shard in sorted(set(batch.column("shard").to_pylist())):
        rows = batch.filter(pa.compute.equal(batch.column("shard"), shard))
        ok = pa.compute.equal(rows.column("drop_reason"), "")
        kept = rows.filter(ok).drop_columns(["shard", "drop_reason", "truncated", "normalized", "ready"])
        reasons = Counter(rows.filter(pa.compute.invert(ok)).column("drop_reason").to_pylist())
        if kept.num_rows:
            digest = hashlib.sha1("\n".join(rows.column("key").to_pylist()).encode()).hexdigest()[:16]
            fs.makedirs(join(root, shard), exist_ok=True)
            kept = kept.replace_schema_metadata(meta_schema.metadata)
            pq.write_table(kept, join(root, shard, f"part-{digest}.parquet"), filesystem=afs)
        stats["shard"].append(shard)
        stats["rows"].append(rows.num_rows)
        stats["written"].append(kept.num_rows)
        stats["truncated"].append(int(pa.compute.sum(rows.filter(ok).column("truncated")).as_py() or 0))
        stats["normalized"].append(int(pa.compute.sum(rows.filter(ok).column("normalized")).as_py() or 0))
        stats["dropped"].append(json.dumps(dict(reasons)))
        stats["ready"].append(pa.compute.min(rows.column("ready")).as_py())
    return pa.table(stats)


def _empty_stats() -> dict:
    return {
        "rows_read": 0,
        "decoded": 0,
        "written": 0,
        "truncated_prompts": 0,
        "normalized_captions": 0,  # written rows whose caption text.clean_text changed
        "dropped": dict.fromkeys(DROP_REASONS, 0),
    }


@dataclass
class _Ledger:
    """The driver's per-shard accounting: a shard is done (its _SUCCESS.json written) once every row
    it holds came back from write_parts, written or dropped."""

    fs: object  # the output's filesystem
    root: str  # the output folder on it
    expected: dict[str, int]  # rows per input shard
    done: set[str]  # shards complete, in an earlier run or this one
    seen: dict[str, dict] = field(default_factory=dict)  # this run's counts per shard (_empty_stats)
    ready: list[float] = field(default_factory=list)  # when each embedding actor had its encoders loaded

    def add(self, row: dict) -> dict | None:
        """Count one stats row of write_parts; the shard's counts when this row completed it."""
        self.ready.append(row["ready"])
        s = self.seen.setdefault(row["shard"], _empty_stats())
        s["rows_read"] += row["rows"]
        s["written"] += row["written"]
        s["truncated_prompts"] += row["truncated"]
        s["normalized_captions"] += row["normalized"]
        for reason, n in json.loads(row["dropped"]).items():
            s["dropped"][reason] += n
        if s["rows_read"] != self.expected[row["shard"]]:
            return None
        s["decoded"] = s["rows_read"] - sum(
            s["dropped"][r] for r in ("empty_caption", "missing_image", "decode_error", "too_large")
        )
        write_json(self.fs, join(self.root, row["shard"], SUCCESS), s)
        self.done.add(row["shard"])
        return s

    def throughput(self, t0: float) -> dict:
        """Rows read and rows/s since t0 (and since the first actor was ready); raises when a shard is short."""
        missing = sorted(set(self.expected) - self.done)
        if missing:
            raise RuntimeError(f"shards not fully processed: {missing[:5]} (row counts did not add up)")
        end, rows = time.time(), sum(s["rows_read"] for s in self.seen.values())
        return {
            "rows": rows,
            "rows_per_s": rows / (end - t0),
            "rows_per_s_after_startup": rows / (end - min(self.ready)),
        }


def run_precompute(cfg: PrecomputeConfig, progress=print) -> dict:
    """Run the job (Ray must be initialised) and return the manifest it wrote."""
    t0 = time.time()
    # 1. The input shards (each one's row count) and an output that holds compatible embeddings, if any.
    fs, root = filesystem(cfg.output, cfg.storage)
    shards = list_shards(cfg.input.path, cfg.storage)
    expected = {shard_name(p): check_schema(p, cfg.input, cfg.storage) for p in shards}
    if len(expected) != len(shards):
        raise ValueError("input shards must have distinct file names (they name the output shards)")
    _check_output_compatible(fs, root, cfg)
    # 2. Shards an earlier run finished are neither read nor rewritten; partial output of the others is cleared.
    done = {s for s in expected if fs.exists(join(root, s, SUCCESS))}
    pending = [p for p in shards if shard_name(p) not in done]
    for p in pending:
        if fs.exists(join(root, shard_name(p))):
            fs.rm(join(root, shard_name(p)), recursive=True)
    progress(f"precompute: {len(shards)} input shards, {len(done)} already done, {len(pending)} to do")
    # 3. Read, encode and write the others, marking each shard done once all its rows are accounted for.
    run = {"rows": 0}
    if pending:
        ledger = _Ledger(fs, root, expected, set(done))
        for row in _embeddings(cfg, pending).iter_rows():
            s = ledger.add(row)
            if s is not None:
                progress(
                    f"precompute: {len(ledger.done)}/{len(shards)} shards; shard {row['shard']} done "
                    f"({s['written']} of {s['rows_read']} rows kept, {s['normalized_captions']} captions normalised), "
                    f"{time.time() - t0:.0f}s"
                )
        run = ledger.throughput(t0)
    # 4. The manifest: totals over every shard, and what this run did.
    run.update(processed_shards=sorted(shard_name(p) for p in pending), skipped_shards=sorted(done))
    run["seconds"] = round(time.time() - t0, 2)
    return _write_embeddings_manifest(fs, root, cfg, sorted(expected), run, progress)


def encoded_rows(cfg: PrecomputeConfig, paths: list[str]) -> ray.data.Dataset:
    """read_and_decode (a task per input shard, streaming decoded batches) -> Embedder actors: the
    embedding rows of the shards, each input's dropped rows among them with their reason."""
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={
            **{"cfg": cfg.input, "filt": cfg.image, "storage": cfg.storage, "batch_size": cfg.batch_size},
            "clip_size": cfg.clip_size(),
        },
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=cfg.decode_cpus,
    )
    return ds.map_batches(Embedder, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", **pool_args(cfg))


def _embeddings(cfg: PrecomputeConfig, pending: list[str]) -> ray.data.Dataset:
    """encoded_rows -> write_parts: one stats row per shard and written part."""
    return encoded_rows(cfg, pending).map_batches(
        write_parts,
        fn_kwargs={"output": cfg.output, "storage": cfg.storage},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )


def stream_meta(cfg: PrecomputeConfig) -> ShardMeta:
    """The layout of the rows `encoded_rows` makes, from the encoders' configs (no encoder is built)."""
    spec = encoder_spec(cfg.encoders)
    if spec is None:
        raise ValueError(
            f"CLIP model {cfg.encoders.clip!r}: its shapes are known only by building it; precompute the "
            f"embeddings (jobs/precompute_embeddings.py) and train on those"
        )
    return ShardMeta(spec, cfg.image.resolution, cfg.storage_dtype)


def stream_dataset(cfg: PrecomputeConfig) -> ray.data.Dataset:
    """Image-text shards encoded on the fly, for Ray Train's streaming split (nothing is written).
    The caller checks the shards' schemas and the rows' layout first (train.validate_training)."""
    paths = list_shards(cfg.input.path, cfg.storage)
    return encoded_rows(cfg, paths).select_columns(["key", "caption", *TENSOR_COLUMNS, "drop_reason"])


def _check_output_compatible(fs, root: str, cfg: PrecomputeConfig) -> None:
    path = join(root, EMBEDDINGS_MANIFEST)
    if not fs.exists(path):
        return
    old = read_json(fs, path)
    for key, now in (
        ("encoders", to_dict(cfg.encoders)),
        ("resolution", cfg.image.resolution),
        ("storage_dtype", cfg.storage_dtype),
        ("encode_images", cfg.encode_images),
    ):
        if old.get(key) != now:
            raise ValueError(
                f"{cfg.output} holds embeddings made with {key}={old.get(key)!r}, this run has "
                f"{key}={now!r}: use a new output folder"
            )


def _first_meta(fs, root: str, names: list[str]) -> dict | None:
    """The layout recorded in the first part file (None when no row was kept anywhere)."""
    afs = arrow_filesystem(fs)
    for n in names:
        parts = sorted(fs.glob(join(root, n, "part-*.parquet")))
        if parts:
            return json.loads(read_meta(pq.read_schema(parts[0], filesystem=afs), parts[0]).to_json())
    return None


def _write_embeddings_manifest(fs, root: str, cfg: PrecomputeConfig, names: list[str], run: dict, progress) -> dict:
    per_shard = {n: read_json(fs, join(root, n, SUCCESS)) for n in names}
    totals = _empty_stats()
    for s in per_shard.values():
        for k in ("rows_read", "decoded", "written", "truncated_prompts", "normalized_captions"):
            totals[k] += s.get(k, 0)  # shards done before captions were normalised have no count
        for r, n in s["dropped"].items():
            totals["dropped"][r] = totals["dropped"].get(r, 0) + n
    doc = {
        "format": MANIFEST_FORMAT,
        "meta": _first_meta(fs, root, names),
        "encoders": to_dict(cfg.encoders),
        "resolution": cfg.image.resolution,
        "storage_dtype": cfg.storage_dtype,
        "encode_images": cfg.encode_images,
        "input": cfg.input.path,
        "totals": totals,
        "shards": per_shard,
        "last_run": run,
    }
    write_json(fs, join(root, EMBEDDINGS_MANIFEST), doc)
    progress(
        f"precompute: {totals['written']} of {totals['rows_read']} rows written, dropped {totals['dropped']}, "
        f"{totals['normalized_captions']} captions normalised; this run: {len(run['processed_shards'])} shards "
        f"processed, {len(run['skipped_shards'])} skipped (done earlier); manifest {join(cfg.output, EMBEDDINGS_MANIFEST)}"
    )
    return doc
