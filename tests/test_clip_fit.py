"""Contrastive fitting of the tiny CLIP: the loss falls, the weights load as encoders, bad rows are counted."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi_platform.clip_fit import ClipFitConfig, fit_clip
from ediffi_platform.ingest import InputConfig
from ediffi_platform.synthetic import SyntheticConfig, make_shard


def test_fit_lowers_the_loss_and_loads_as_encoder_weights(tmp_path):
    full = make_shard(SyntheticConfig(rows=192, shards=1), 0)
    table = full.select(["key", "jpg", "caption"])
    bad = pa.table({"key": ["x", "y"], "jpg": [b"not an image", table["jpg"][0].as_py()], "caption": ["a", None]})
    pq.write_table(pa.concat_tables([table, bad]), tmp_path / "s.parquet")
    cfg = ClipFitConfig(
        input=InputConfig(path=str(tmp_path)), output=str(tmp_path / "c.safetensors"), steps=200, batch_size=64
    )
    out = fit_clip(cfg, progress=lambda *_: None)
    assert out["pairs"] == 192 and out["skipped"] == {"decode_error": 1, "missing_caption": 1}
    assert out["loss_last"] < 0.8 * out["loss_first"] and out["loss_first"] == pytest.approx(
        out["chance_loss"], rel=0.2
    )

    fitted = ConditioningEncoder(EncoderConfig(clip_pretrained=cfg.output)).eval()
    random = ConditioningEncoder(EncoderConfig()).eval()
    captions = table["caption"].to_pylist()[:64]
    images = torch.stack([torch.from_numpy(_rgb(b)) for b in table["jpg"].to_pylist()[:64]]).permute(0, 3, 1, 2)
    # Each image's best-matching caption names the image's color more often than with random weights.
    colors = full["color"].to_pylist()[:64]
    hits = {}
    for name, enc in (("fitted", fitted), ("random", random)):
        cond, _ = enc.encode(captions, images)
        sim = (
            torch.nn.functional.normalize(cond.clip_image, dim=1)
            @ torch.nn.functional.normalize(cond.clip_pooled, dim=1).T
        )
        hits[name] = sum(colors[j] == c for j, c in zip(sim.argmax(1).tolist(), colors, strict=True)) / 64
    assert hits["fitted"] > hits["random"] + 0.2, hits


def _rgb(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"output must be a \.safetensors"):
        ClipFitConfig(output=str(tmp_path / "c.pt"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ClipFitConfig(steps=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit_clip(ClipFitConfig(input=InputConfig(path=str(tmp_path / "none")), output=str(tmp_path / "c.safetensors")))
