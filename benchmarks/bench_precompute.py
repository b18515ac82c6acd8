"""Embedding precompute throughput: the Ray Data pipeline vs a plain single-process loop.

    python benchmarks/bench_precompute.py --rows 2000
    python benchmarks/bench_precompute.py --rows 256 --ray --t5 v1_1-small --clip ViT-B-32   # real sizes, plain loop

Both do the same work on the same synthetic shards: decode, the training view and CLIP's view of
each source image, T5 + CLIP text + CLIP image encoding, Parquet write. Prints rows/s for the plain
loop and for Ray at 1 and 2 actors (target: Ray at 1 actor >= 90% of the plain loop). Ray's time is measured from job start to manifest
(cluster start excluded), and again from the moment the actors' encoders are loaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import torch

from ediffi.conditioning import cond_to_numpy
from ediffi.encoders import ConditioningEncoder, EncoderConfig, write_t5_v11
from ediffi_platform.ingest import InputConfig, clip_view, list_shards, open_image, square
from ediffi_platform.precompute import PrecomputeConfig, run_precompute
from ediffi_platform.shards import ShardMeta, build_table
from ediffi_platform.synthetic import SyntheticConfig, write_synthetic

T5_SMALL = "v1_1-small"  # T5 v1.1-small's shape: d_model 512, 8 layers, 6 heads of 64


def plain_loop(cfg: PrecomputeConfig, out: str) -> tuple[int, int, float]:
    """Single process, no Ray: read, decode, encode, write — shard by shard. (rows, bytes written,
    seconds once the encoders are loaded)"""
    enc = ConditioningEncoder(cfg.encoders)
    t0 = time.perf_counter()
    meta = ShardMeta(enc.spec, cfg.image.resolution, cfg.storage_dtype)
    os.makedirs(out, exist_ok=True)
    n = 0
    for path in list_shards(cfg.input.path):
        table = pq.read_table(path, columns=["key", "caption", "jpg"])
        keys, caps, blobs = (table.column(c).to_pylist() for c in ("key", "caption", "jpg"))
        parts = []
        for i in range(0, len(keys), cfg.batch_size):
            decoded = [open_image(b, cfg.image)[0] for b in blobs[i : i + cfg.batch_size]]
            images = np.stack([square(img, cfg.image.resolution) for img in decoded])
            views = np.stack([clip_view(img, enc.image_size) for img in decoded])  # CLIP sees the source image
            cond, _ = enc.encode(caps[i : i + cfg.batch_size], torch.from_numpy(views).permute(0, 3, 1, 2))
            n += len(decoded)
            cols = {
                "key": keys[i : i + cfg.batch_size],
                "caption": caps[i : i + cfg.batch_size],
                "image": images,
            }
            parts.append(build_table(meta, {**cols, **cond_to_numpy(cond, cfg.storage_dtype)}))
        for j, t in enumerate(parts):
            pq.write_table(t, f"{out}/{os.path.basename(path)}-{j}.parquet")
    return n, sum(os.path.getsize(f"{out}/{f}") for f in os.listdir(out)), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--ray", nargs="*", default=["1x2", "1x1", "2x1"], help="Ray runs as ACTORSxTHREADS (none: plain loop only)"
    )
    p.add_argument("--t5", default="tiny", help=f"tiny, a local T5 folder, or {T5_SMALL} (random init, built here)")
    p.add_argument("--clip", default="tiny", help="tiny or an open_clip model name (random init, e.g. ViT-B-32)")
    a = p.parse_args()
    import ray

    tmp = tempfile.mkdtemp()
    write_synthetic(SyntheticConfig(output=f"{tmp}/in", rows=a.rows, shards=a.shards))
    t5 = a.t5
    if t5 == T5_SMALL:
        captions = pq.read_table(f"{tmp}/in", columns=["caption"]).column("caption").to_pylist()
        t5 = str(write_t5_v11(f"{tmp}/t5", captions, d_model=512, layers=8, heads=6, d_kv=64))
    encoders = EncoderConfig(t5=t5, clip=a.clip)
    base = PrecomputeConfig(input=InputConfig(path=f"{tmp}/in"), batch_size=a.batch_size, encoders=encoders)
    print(
        f"{a.rows} rows in {a.shards} shards, batch {a.batch_size}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, encoders t5={a.t5} clip={a.clip}"
    )
    t = time.perf_counter()
    n, nbytes, loaded = plain_loop(base, f"{tmp}/plain")
    plain = n / (time.perf_counter() - t)
    print(
        f"plain single-process loop: {plain:.1f} rows/s; once the encoders are loaded {1000 * loaded / n:.1f} ms "
        f"and {nbytes / n / 1024:.1f} KiB a row"
    )
    if not a.ray:
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    # Warm-up (not counted): starts Ray's worker processes once, as on a long-running cluster.
    run_precompute(
        replace(base, output=f"{tmp}/warmup", input=replace(base.input, path=f"{tmp}/in/00000.parquet")),
        progress=lambda *_: None,
    )
    for actors, threads in (tuple(int(v) for v in r.split("x")) for r in a.ray):
        cfg = replace(base, output=f"{tmp}/ray{actors}x{threads}", concurrency=actors, threads_per_actor=threads)
        run = run_precompute(cfg, progress=lambda *_: None)["last_run"]
        rate, steady = run["rows_per_s"], run["rows_per_s_after_startup"]
        print(
            f"ray data, {actors} actor(s) x {threads} torch thread(s): {rate:.1f} rows/s end to end "
            f"({100 * rate / plain:.0f}% of the plain loop), {steady:.1f} rows/s once its encoders are loaded "
            f"({100 * steady / plain:.0f}%)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
