"""Shared test helpers: tiny networks with non-trivial weights and a call-counting denoiser."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ediffi.conditioning import Cond
from ediffi.presets import build_denoiser, get_preset


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def random_cond(spec, batch: int, seed: int = 0, image: bool = True) -> Cond:
    """A random condition following the schema, with ragged text masks."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(batch, *s, generator=g)
    t5_len = torch.randint(1, spec.t5_len + 1, (batch,), generator=g)
    clip_len = torch.randint(2, spec.clip_len + 1, (batch,), generator=g)
    t5_mask = torch.arange(spec.t5_len)[None] < t5_len[:, None]
    clip_mask = torch.arange(spec.clip_len)[None] < clip_len[:, None]
    return Cond(
        t5=r(spec.t5_len, spec.t5_dim) * t5_mask[..., None],
        t5_mask=t5_mask,
        clip=r(spec.clip_len, spec.clip_dim) * clip_mask[..., None],
        clip_mask=clip_mask,
        clip_pooled=r(spec.clip_embed_dim),
        clip_image=r(spec.clip_embed_dim) * image,
        clip_image_mask=torch.full((batch,), image),
    )


def absent_filled(cond: Cond, seed: int = 0) -> Cond:
    """cond with every value its mask marks absent overwritten by large random numbers (masks unchanged)."""
    g = torch.Generator().manual_seed(seed)
    junk = lambda v, absent: torch.where(absent, torch.randn(v.shape, generator=g) * 1e4, v)
    return replace(
        cond,
        t5=junk(cond.t5, ~cond.t5_mask[..., None]),
        clip=junk(cond.clip, ~cond.clip_mask[..., None]),
        clip_pooled=junk(cond.clip_pooled, ~cond.clip_mask.any(1, keepdim=True)),  # belongs to the CLIP text
        clip_image=junk(cond.clip_image, ~cond.clip_image_mask[:, None]),
    )


class Counting:
    """Wraps a denoiser and records the batch size and sigmas of every call."""

    def __init__(self, D):
        self.D = D
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, sigma, cond):
        assert x.shape[0] == sigma.shape[0] == len(cond)
        self.calls.append(sigma.detach().clone())
        return self.D(x, sigma, cond)


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def tiny_D(tiny_cfg):
    return randomize(build_denoiser(tiny_cfg), seed=1).eval()


@pytest.fixture(scope="session")
def ray_local():
    """A private 2-CPU local Ray cluster for the whole session (never someone else's)."""
    import os
    import shutil
    import tempfile

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # as ensure_ray sets it: no doubled lines
    # Ray Train's controller polls its workers every 2 s: a fit then idles ~2 s after its last step
    # (~4 s to shut down in all), and there are some twenty fits in the suite.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    tmp = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 HTTP API (moto server) on 127.0.0.1 with a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket="ediffi")
    from ediffi_platform.storage import StorageConfig

    yield StorageConfig(endpoint_url=endpoint, key="test", secret="test", region="us-east-1")
    server.stop()


def embeddings(d, rows: int, resolution: int = 16, src: str = "in", out: str = "emb", encoders=None) -> None:
    """Synthetic captioned shards in d/src (written unless present) -> embedding shards in d/out."""
    from ediffi.encoders import EncoderConfig
    from ediffi_platform.ingest import ImageFilter, InputConfig
    from ediffi_platform.precompute import PrecomputeConfig, run_precompute
    from ediffi_platform.synthetic import SyntheticConfig, write_synthetic

    if not (d / src).exists():
        write_synthetic(SyntheticConfig(output=str(d / src), rows=rows, shards=2))
    cfg = PrecomputeConfig(
        input=InputConfig(path=str(d / src)),
        output=str(d / out),
        image=ImageFilter(resolution=resolution),
        encoders=encoders or EncoderConfig(),
        batch_size=16,
    )
    run_precompute(cfg, progress=lambda *_: None)


SHARED_ROWS = 384  # two shards of 192 rows
SHARED_SEED = 7  # the tiny encoders' init seed: not the default, so a run that forgets it differs


@pytest.fixture(scope="session")
def shared_emb(tmp_path_factory, ray_local):
    """Embedding shards (SHARED_ROWS synthetic rows at 32 px, tiny encoders of seed SHARED_SEED) in
    d/"emb", and d/"mlflow.db" + d/"mlruns" for tracking, shared by the training and expert tests:
    precomputing is a Ray Data job, and creating an MLflow store costs seconds."""
    from ediffi.encoders import EncoderConfig

    d = tmp_path_factory.mktemp("shared")
    embeddings(d, rows=SHARED_ROWS, resolution=32, encoders=EncoderConfig(seed=SHARED_SEED))
    return d
