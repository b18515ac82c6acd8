"""Real encoder architectures offline: a T5 v1.1-style encoder saved to a local folder (d_model 64)
and open_clip's ViT-B-32 by its own name (random init), through precompute, training streamed from
the image-text shards with a preset whose conditioning shapes come from the data (rows equal to the
precomputed ones, dropped inputs counted, resumed), expert fine-tuning of that base on the
precomputed shards, and generation."""

import io
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import embeddings
from ediffi.checkpoint import load_checkpoint
from ediffi.conditioning import CondSpec
from ediffi.encoders import EncoderConfig, write_t5_v11
from ediffi.pipeline import SamplerConfig
from ediffi.presets import PRESETS
from ediffi_platform.config import load_config
from ediffi_platform.experts import ExpertPlan, FinetuneConfig, run_finetune
from ediffi_platform.generate import GenerateConfig, run_generate
from ediffi_platform.ingest import InputConfig
from ediffi_platform.precompute import PrecomputeConfig, stream_dataset, stream_meta
from ediffi_platform.reader import EpochCache, ray_dataset
from ediffi_platform.runs import training_state
from ediffi_platform.synthetic import SyntheticConfig, write_synthetic
from ediffi_platform.tracking import TrackingConfig
from ediffi_platform.train import TrainConfig, run_training, validate_training

pytestmark = pytest.mark.usefixtures("ray_local")

VIT_B_32 = CondSpec(t5_len=128, t5_dim=64, clip_len=77, clip_dim=512, clip_embed_dim=512)
DROPPED = {"decode_error": 1, "empty_caption": 1}


def _bad_shard(path):
    """A shard of a corrupt image and an empty caption: both dropped, each with its reason."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, format="PNG")
    bad = {"key": ["bad0", "bad1"], "caption": ["a red circle", ""], "jpg": [b"not an image", buf.getvalue()]}
    pq.write_table(pa.table(bad), path)


@pytest.mark.slow
def test_local_t5_folder_and_vit_b_32_precompute_train_finetune_and_generate(tmp_path):
    src = tmp_path / "in"
    write_synthetic(SyntheticConfig(output=str(src), rows=24, shards=2))
    captions = pq.read_table(str(src), columns=["caption"]).column("caption").to_pylist()
    _bad_shard(src / "bad.parquet")
    enc = EncoderConfig(t5=str(write_t5_v11(tmp_path / "t5", captions)), clip="ViT-B-32")
    embeddings(tmp_path, rows=24, resolution=32, encoders=enc)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["meta"]["spec"] == VIT_B_32.__dict__

    # The rows a stream of the same shards makes, held and sorted by key as a worker's epoch cache
    # holds them, are the precomputed rows bit for bit (one Embedder, one storage dtype).
    pre = PrecomputeConfig(input=InputConfig(path=str(src)), encoders=enc, batch_size=16)
    epochs = {}
    for name, (ds, meta) in {
        "stream": (stream_dataset(pre), stream_meta(pre)),
        "stored": ray_dataset(str(tmp_path / "emb")),
    }.items():
        cache = EpochCache(512)
        epochs[name] = (list(cache.batches(ds, meta, 8, seed=3)), meta, cache.dropped)
    (streamed, meta_s, dropped), (stored, meta_p, _) = epochs["stream"], epochs["stored"]
    assert meta_s == meta_p and dropped == DROPPED and sum(len(x) for x, _ in streamed) == 24
    for (x_s, c_s), (x_p, c_p) in zip(streamed, stored, strict=True):
        assert torch.equal(x_s, x_p) and all(torch.equal(getattr(c_s, k), v) for k, v in c_p.tensors().items())

    # preset=demo and nothing else about shapes: they come from the data (the workers build
    # cfg.network(meta.spec), the same call for embedding shards and streams); model.* changes the network.
    off = "tracking.enabled=false"
    common = [f"data={tmp_path / 'emb'}", "preset=demo", "batch_size=4", "num_workers=1", "cpus_per_worker=0.25", off]
    common += ["sample_images=0"]
    cfg = load_config(TrainConfig, None, [*common, "steps=2", f"output={tmp_path / 'runs'}"])
    assert cfg.network(validate_training(cfg).spec) == replace(PRESETS["demo"], cond=VIT_B_32)

    # Streamed from the image-text shards (cache_mb=0: every epoch read, decoded and encoded anew),
    # with model.model_channels=32: stopped at step 4, re-run to step 10, it goes on from step 4.
    streamed = [
        *common[1:],
        f"stream.input.path={src}",
        f"stream.encoders.t5={enc.t5}",
        "stream.encoders.clip=ViT-B-32",
    ]
    streamed += ["stream.batch_size=16", "stream.num_cpus=0.25", "stream.decode_cpus=0.5", "cache_mb=0"]
    streamed += ["model.model_channels=32", "checkpoint_every=2", f"output={tmp_path / 's'}"]
    logs = []
    first = run_training(load_config(TrainConfig, None, [*streamed, "steps=4"]), progress=logs.append)
    assert first["step"] == 4 and training_state(first["checkpoint"])["batches_into_epoch"] == 4
    again = run_training(load_config(TrainConfig, None, [*streamed, "steps=10"]), progress=logs.append)
    assert any("resuming from" in m and "(step 4)" in m for m in logs)
    # 24 rows in batches of 4: 6 batches a pass, or 7 when the two dropped rows split a batch.
    state = training_state(again["checkpoint"])
    assert state["step"] == 10 and (state["epoch"], state["batches_into_epoch"]) in {(1, 4), (1, 3)}
    # The re-run read all of epoch 0 (the batches it skips are read too) and most of epoch 1.
    read, dropped = again["stream"]["read"], again["stream"]["dropped"]
    assert dropped.keys() == DROPPED.keys() and read >= 26 + 12
    assert any(f"the stream read {read} image-text rows, dropped {sum(dropped.values())} (" in m for m in logs)
    D, ckpt = load_checkpoint(again["checkpoint"])
    assert D.net.cfg == replace(PRESETS["demo"], model_channels=32, cond=VIT_B_32)
    assert ckpt["encoders"]["t5"] == enc.t5 and ckpt["encoders"]["clip"] == "ViT-B-32"

    # Explicit shapes that disagree with the data are an error naming both.
    with pytest.raises(ValueError, match="shards have t5_dim=64, the model expects t5_dim=32"):
        validate_training(replace(cfg, model={"cond": {"t5_dim": 32}}))

    # Experts fine-tune the streamed base's network from the embedding shards (train.preset=demo
    # says 64 channels; the base has 32) ...
    ft = FinetuneConfig(
        base=str(tmp_path / "s" / "base"),
        plan=ExpertPlan(boundaries=(1.0,)),
        train=load_config(TrainConfig, None, [*common, "steps=1"]),
        output=str(tmp_path / "experts"),
        experts={"expert1": {"model": {"dropout": 0.1}}},  # ... whose dropout an expert may change
    )
    with pytest.raises(ValueError, match=r"train\.model\.model_channels=64: experts fine-tune the base's network"):
        run_finetune(replace(ft, train=replace(ft.train, model={"model_channels": 64})), progress=lambda *_: None)
    done = run_finetune(ft, progress=lambda *_: None)
    experts = [load_checkpoint(done["experts"][e]["checkpoint"]) for e in ("expert0", "expert1")]
    assert [D.net.cfg.model_channels for D, _ in experts] == [32, 32]
    assert [D.net.cfg.dropout for D, _ in experts] == [0.0, 0.1] and experts[0][0].net.cfg.cond == VIT_B_32
    assert all(m["encoders"]["t5"] == enc.t5 and m["encoders"]["clip"] == "ViT-B-32" for _, m in experts)

    # Generation encodes prompts with the encoders the checkpoints recorded.
    (tmp_path / "p.txt").write_text("a small red circle\na big blue square\n")
    gen = GenerateConfig(
        prompts=str(tmp_path / "p.txt"),
        out=str(tmp_path / "gen"),
        model=done["manifest"],
        sampler=SamplerConfig(steps=2),
        batch_size=2,
        num_cpus=0.5,
        grid_images=0,
        tracking=TrackingConfig(enabled=False),
    )
    assert run_generate(gen, progress=lambda *_: None)["images_total"] == 2
    assert len(list(Path(tmp_path / "gen").rglob("*.png"))) == 2
