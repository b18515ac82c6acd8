"""Ray Data precompute on a local 2-CPU cluster: counts, schema, parity, resume, S3, the reader."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi_platform.ingest import ImageFilter, InputConfig
from ediffi_platform.precompute import Embedder, PrecomputeConfig, run_precompute
from ediffi_platform.reader import EpochCache, iter_batches, iter_torch, ray_dataset, shard_files
from ediffi_platform.shards import to_tensors
from ediffi_platform.synthetic import LABELS, SyntheticConfig, write_synthetic

pytestmark = pytest.mark.usefixtures("ray_local")


def _jpeg(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_ROWS = [  # (key, caption, image bytes, expected fate)
    ("bad0", "\ufeffa fine\tgreen\x00 picture", _jpeg(64, 64), "written"),  # its caption normalised
    ("bad1", "\x00\u202e ", _jpeg(64, 64), "empty_caption"),  # empty once normalised
    ("bad2", None, _jpeg(64, 64), "empty_caption"),
    ("bad3", "corrupt", b"\xff\xd8\xff\xe0garbage", "decode_error"),
    ("bad4", "truncated", _jpeg(300, 300)[:400], "decode_error"),
    ("bad5", "text bytes", b"just some text", "decode_error"),
    ("bad6", "no image", None, "missing_image"),
    ("bad7", "tiny", _jpeg(8, 8), "too_small"),
    ("bad8", "wide", _jpeg(200, 50), "bad_aspect"),
]


def _inputs(tmp_path, rows=120, shards=3):
    write_synthetic(SyntheticConfig(output=str(tmp_path / "in"), rows=rows, shards=shards))
    n = len(BAD_ROWS)
    pq.write_table(
        pa.table(
            {
                "key": [r[0] for r in BAD_ROWS],
                "jpg": pa.array([r[2] for r in BAD_ROWS], pa.binary()),
                "caption": pa.array([r[1] for r in BAD_ROWS], pa.string()),
                **{k: ["x"] * n for k in LABELS},
            }
        ),
        tmp_path / "in" / "zz_bad.parquet",
    )


def _cfg(tmp_path, **kw):
    return PrecomputeConfig(
        input=InputConfig(path=str(tmp_path / "in"), keep_columns=("color", "shape")),
        output=str(tmp_path / "out"),
        image=ImageFilter(resolution=32, min_size=16),
        batch_size=16,
        concurrency=2,
        **kw,
    )


def _written_keys(root):
    files, _ = shard_files(str(root))
    return sorted(k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist())


def test_synthetic_and_bad_rows_to_embedding_shards(tmp_path):
    _inputs(tmp_path)
    m = run_precompute(_cfg(tmp_path), progress=lambda *_: None)
    t = m["totals"]
    assert t["rows_read"] == 129 and t["written"] == 121
    assert t["dropped"] == {
        "empty_caption": 2,
        "decode_error": 3,
        "missing_image": 1,
        "too_small": 1,
        "bad_aspect": 1,
        "too_large": 0,
    }
    assert t["decoded"] == 129 - 2 - 3 - 1 and t["normalized_captions"] == 1
    assert m["shards"]["zz_bad"]["written"] == 1 and m["shards"]["00000"]["written"] == 40
    assert m["meta"]["spec"]["t5_dim"] == 32 and m["meta"]["resolution"] == 32
    keys = _written_keys(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 121 and "bad0" in keys and "bad1" not in keys
    assert pq.read_table(str(tmp_path / "out" / "zz_bad")).column("caption").to_pylist() == ["a fine green picture"]

    # Parity: stored embeddings are the encoder's output for that caption and image (fp16).
    files, meta = shard_files(str(tmp_path / "out"))
    table = pq.read_table(files[0])
    assert set(table.column_names) >= {
        "key",
        "caption",
        "image",
        "t5",
        "clip_image",
        "color",
        "shape",
    }
    images, cond = to_tensors(table.slice(0, 4), meta)
    enc = ConditioningEncoder(EncoderConfig())
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    ref, _ = enc.encode(table.column("caption").to_pylist()[:4], pixels)
    torch.testing.assert_close(cond.t5, ref.t5, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cond.clip_pooled, ref.clip_pooled, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cond.clip_image, ref.clip_image, atol=2e-3, rtol=2e-3)
    assert torch.equal(cond.clip_mask, ref.clip_mask) and cond.clip_image_mask.all()

    # The readers: single-process and Ray, every row once.
    n = sum(len(imgs) for imgs, _ in iter_batches(str(tmp_path / "out"), batch_size=32, shuffle_buffer=64))
    assert n == 121
    ds, meta = ray_dataset(str(tmp_path / "out"))
    batches = list(iter_torch(ds, meta, batch_size=50, shuffle_buffer=100, seed=0))
    assert sum(len(b[0]) for b in batches) == 121 and batches[0][1].t5.shape[1:] == (128, 32)
    _check_epoch_cache(ds, meta)


class _OnePass:
    """A dataset that can be iterated once: a second Ray Data pass fails the test."""

    def __init__(self, ds):
        self.ds, self.passes = ds, 0

    def iter_batches(self, **kw):
        self.passes += 1
        assert self.passes == 1, "the cached epoch re-read the dataset"
        return self.ds.iter_batches(**kw)


def _check_epoch_cache(ds, meta):
    def key(batches):  # each row (image, T5 tokens, pooled CLIP) as one tuple, in order
        return [
            tuple(torch.cat([x[i].flatten(), c.t5[i].flatten(), c.clip_pooled[i]]).tolist())
            for x, c in batches
            for i in range(len(x))
        ]

    rows = lambda batches: sorted(key(batches))

    streamed = list(iter_torch(ds, meta, batch_size=50))
    one = _OnePass(ds)
    cache = EpochCache(max_mb=64)
    first = list(cache.batches(one, meta, batch_size=50, seed=0))
    second = list(cache.batches(one, meta, batch_size=50, seed=1))
    third = list(cache.batches(one, meta, batch_size=50, seed=1))
    assert [len(b[0]) for b in second] == [len(b[0]) for b in first] == [50, 50, 21]
    # Every row once per epoch, its image still with its embeddings; later epochs from memory.
    assert rows(first) == rows(second) == rows(streamed)
    assert key(second) != key(first) and key(second) == key(third)  # reshuffled, by the epoch's seed
    # Too big for the budget, or another worker's shard too big: every epoch streams.
    for cache in (EpochCache(max_mb=0.01), EpochCache(max_mb=64, agree=lambda fits: False)):
        again = _OnePass(ds)
        list(cache.batches(again, meta, batch_size=50))
        assert cache.data is None


def test_interrupted_run_resumes_to_exactly_one_copy_of_every_row(tmp_path):
    _inputs(tmp_path, rows=80, shards=4)
    cfg = _cfg(tmp_path)
    run_precompute(cfg, progress=lambda *_: None)
    out = tmp_path / "out"
    full = _written_keys(out)
    # Make it look like a run killed part-way: shard 00001 half-written (no _SUCCESS, a stray
    # extra part), shard 00002 never started, the others complete.
    os.remove(out / "00001" / "_SUCCESS.json")
    part = next((out / "00001").glob("part-*.parquet"))
    (out / "00001" / "part-stray.parquet").write_bytes(part.read_bytes())
    for f in (out / "00002").iterdir():
        f.unlink()
    (out / "00002").rmdir()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "00000").glob("part-*")}
    logs = []
    m = run_precompute(cfg, progress=logs.append)
    assert "3 already done, 2 to do" in logs[0] and "2 shards processed, 3 skipped" in logs[-1]
    assert m["last_run"]["skipped_shards"] == ["00000", "00003", "zz_bad"]
    assert m["last_run"]["processed_shards"] == ["00001", "00002"] and m["last_run"]["rows"] == 40
    assert {p: p.stat().st_mtime_ns for p in (out / "00000").glob("part-*")} == done_before  # skipped
    assert _written_keys(out) == full and m["totals"]["written"] == len(full) == 81


def test_schema_problems_fail_before_any_work(tmp_path):
    _inputs(tmp_path, rows=20, shards=1)
    cfg = _cfg(tmp_path)
    bad = PrecomputeConfig(**{**cfg.__dict__, "input": InputConfig(path=cfg.input.path, image_column="png")})
    with pytest.raises(ValueError, match=r"00000\.parquet: column 'png' not found"):
        run_precompute(bad, progress=lambda *_: None)
    assert not (tmp_path / "out").exists()
    run_precompute(cfg, progress=lambda *_: None)
    other = PrecomputeConfig(**{**cfg.__dict__, "encoders": EncoderConfig(seed=3)})
    with pytest.raises(ValueError, match="made with encoders="):
        run_precompute(other, progress=lambda *_: None)


def test_s3_input_and_output(s3_server):
    import s3fs

    storage = s3_server
    write_synthetic(SyntheticConfig(output="s3://ediffi/in", rows=30, shards=2), storage)
    cfg = PrecomputeConfig(
        input=InputConfig(path="s3://ediffi/in"),
        output="s3://ediffi/emb",
        batch_size=8,
        concurrency=1,
        storage=storage,
    )
    m = run_precompute(cfg, progress=lambda *_: None)
    assert m["totals"]["written"] == 30
    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": storage.endpoint_url})
    assert fs.exists("ediffi/emb/manifest.json") and fs.exists("ediffi/emb/00001/_SUCCESS.json")
    assert json.loads(fs.cat("ediffi/emb/manifest.json"))["totals"]["rows_read"] == 30
    n = sum(len(imgs) for imgs, _ in iter_batches("s3://ediffi/emb", batch_size=7, storage=storage))
    assert n == 30
    assert m["last_run"]["processed_shards"] == ["00000", "00001"] and m["last_run"]["skipped_shards"] == []
    parts = {p: fs.info(p)["LastModified"] for p in fs.glob("ediffi/emb/*/*")}
    again = run_precompute(cfg, progress=lambda *_: None)  # everything already done: nothing redone
    assert again["last_run"]["skipped_shards"] == ["00000", "00001"] and again["last_run"]["processed_shards"] == []
    assert again["last_run"]["rows"] == 0 and again["totals"] == m["totals"]
    fs.invalidate_cache()
    assert {p: fs.info(p)["LastModified"] for p in fs.glob("ediffi/emb/*/*")} == parts  # not rewritten


# The real job, SIGKILLed (driver and its local Ray, one process group) once its n-th shard is marked
# done and a later shard has part files but no _SUCCESS yet: the interruption point is a state of the
# output, not a moment, so the machine's speed cannot change what the rerun has to repair.
KILL_AFTER_SHARDS = """
import glob, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import precompute_embeddings as job

n, out, done = int(sys.argv[2]), sys.argv[3], []

def half_written():
    return [p for p in glob.glob(os.path.join(out, "*", "part-*.parquet"))
            if not os.path.exists(os.path.join(os.path.dirname(p), "_SUCCESS.json"))]

def watch(msg):
    if msg.startswith("precompute: ") and " shards; shard " in msg and " done (" in msg:
        done.append(msg)
        if len(done) == n:  # the driver waits here; Ray Data's executor keeps writing parts meanwhile
            deadline = time.time() + 120
            while not half_written():
                if time.time() > deadline:
                    print("no half-written shard appeared", flush=True)
                    os._exit(3)
                time.sleep(0.02)
            assert os.getpgid(0) == os.getpid(), "run me as a process group leader"
            os.killpg(0, signal.SIGKILL)

def run_precompute(cfg, progress):  # the job's console still prints each line; this watches them too
    return real(cfg, progress=lambda msg: (progress(msg), watch(msg)))

real, job.run_precompute = job.run_precompute, run_precompute
sys.exit(job.main(sys.argv[4:]))
"""


@pytest.fixture
def ray_tmp(tmp_path):
    """A Ray temp folder in tmp_path, or a fresh short one when tmp_path is too long for Ray's sockets."""
    import shutil
    import tempfile

    # Ray's sockets live at {dir}/ray/session_<date>_<time>_<pid>/sockets/plasma_store: < 108 chars
    d = tmp_path / "r" if len(str(tmp_path)) < 36 else Path(tempfile.mkdtemp(prefix="ek"))
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_killed_job_rerun_gives_every_row_once(tmp_path, ray_tmp):
    """SIGKILL the real job after 2 of 6 shards (another half-written), run it again: each row once, 2 shards skipped."""
    import contextlib
    import signal
    import subprocess
    import sys

    write_synthetic(SyntheticConfig(output=str(tmp_path / "in"), rows=120, shards=6))
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "kill_after.py").write_text(KILL_AFTER_SHARDS)
    args = [
        sys.executable,
        str(tmp_path / "kill_after.py"),
        str(root / "jobs"),
        "2",
        str(tmp_path / "out"),
        f"input.path={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        "batch_size=4",
        "concurrency=1",
    ]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        proc.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything left of the job's group (none unless it hung)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "job.log").read_text()[-3000:]
    done = sorted(p.parent.name for p in (tmp_path / "out").glob("*/_SUCCESS.json"))
    half = {p.parent.name for p in (tmp_path / "out").glob("*/part-*.parquet")} - set(done)
    assert len(done) == 2 and half and not (tmp_path / "out" / "manifest.json").exists(), (done, half)
    m = run_precompute(
        PrecomputeConfig(input=InputConfig(path=str(tmp_path / "in")), output=str(tmp_path / "out"), batch_size=32),
        progress=lambda *_: None,
    )
    assert m["last_run"]["skipped_shards"] == done and m["last_run"]["rows"] == 80
    keys = _written_keys(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 120 and m["totals"]["written"] == 120


def test_the_image_embedding_is_of_the_source_image_whatever_the_training_resolution():
    """CLIP sees the source image through its own preprocessing (open_clip's evaluation transform),
    not the training image: the same rows at 16 and 32 px store the same image embedding, which is
    not the embedding of the (upsampled) training image."""
    import open_clip

    from ediffi_platform.ingest import clip_view, decode_batch

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    blobs = []
    for p in photos:
        buf = io.BytesIO()
        p.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table({"key": ["a", "b", "c"], "caption": ["x", "y", "z"], "jpg": blobs})
    stored, training_views = {}, {}
    threads = torch.get_num_threads()
    try:
        for R in (16, 32):
            cfg = PrecomputeConfig(image=ImageFilter(resolution=R))
            embedder = Embedder(cfg)
            batch = decode_batch(table, InputConfig(), cfg.image, "s", cfg.clip_size())
            out = embedder(batch)
            stored[R] = out.column("clip_image").to_pylist()
            training_views[R], cond = to_tensors(out, embedder.meta)
    finally:
        torch.set_num_threads(threads)
    assert stored[16] == stored[32] and len(stored[16][0]) == 2 * embedder.encoder.spec.clip_embed_dim

    enc = embedder.encoder
    S = enc.image_size
    own = open_clip.image_transform(S, is_train=False)  # resize, centre crop, to tensor, normalise
    view = torch.from_numpy(clip_view(photos[0], S).copy()).permute(2, 0, 1)[None]
    torch.testing.assert_close(enc.clip_pixels(view)[0], own(photos[0]), atol=1e-6, rtol=0)
    from_training = enc.encode_images(((training_views[16] + 1) * 127.5).round().to(torch.uint8))
    assert not torch.allclose(from_training.half().float(), cond.clip_image, atol=1e-3)
