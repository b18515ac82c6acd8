"""Evaluation: the Frechet distance against closed forms; FID / CLIP score plumbing on Ray."""

import numpy as np
import pytest

from ediffi.encoders import EncoderConfig
from ediffi_platform.evaluate import EvalConfig, frechet_distance, run_evaluate
from ediffi_platform.synthetic import SyntheticConfig, draw, write_synthetic


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # a common rotation leaves it unchanged; identical Gaussians are at distance 0
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-6)
    m = rng.normal(size=(5, 5))
    s = m @ m.T
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-6)


def _folder(path, colors, n=12):
    path.mkdir(parents=True)
    for i in range(n):
        draw(colors[i % len(colors)], "circle", "big", "center", "white", 32).save(path / f"{i:03d}.png")
    return path


@pytest.mark.usefixtures("ray_local")
def test_fid_and_clip_score_plumbing(tmp_path):
    red = _folder(tmp_path / "red", ["red", "orange"])
    red2 = _folder(tmp_path / "red2", ["red", "orange"])
    blue = _folder(tmp_path / "blue", ["blue", "green"])
    (red2 / "broken.png").write_bytes(b"not an image")
    cfg = EvalConfig(generated=str(red2), reference=str(red), fid_extractor="tiny", num_cpus=0.5)
    same = run_evaluate(cfg, progress=lambda *_: None)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["skipped_unreadable"]["generated"] == 1
    assert same["clip_score"] is None  # no prompts for a plain folder
    far = run_evaluate(EvalConfig(generated=str(blue), reference=str(red), fid_extractor="tiny", num_cpus=0.5))
    assert far["fid"] > 1e-3

    # a generation-job-like output (metadata with prompts) against image-text Parquet shards
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "gen" / "metadata").mkdir(parents=True)
    _folder(tmp_path / "gen" / "images", ["red"], n=4)
    pq.write_table(
        pa.table({"image": [f"images/{i:03d}.png" for i in range(4)], "prompt": ["a big red circle"] * 4}),
        tmp_path / "gen" / "metadata" / "part-0.parquet",
    )
    write_synthetic(SyntheticConfig(output=str(tmp_path / "shards"), rows=16, shards=2))
    out = run_evaluate(
        EvalConfig(
            generated=str(tmp_path / "gen"),
            reference=str(tmp_path / "shards"),
            fid_extractor="tiny",
            clip=EncoderConfig(),
            num_cpus=0.5,
        ),
        progress=lambda *_: None,
    )
    assert out["reference_images"] == 16 and out["clip_scored_images"] == 4 and 0 <= out["clip_score"] <= 100


def test_bad_evaluation_settings(tmp_path):
    with pytest.raises(ValueError, match="needs fid_weights"):
        EvalConfig(fid_extractor="inception_v3")
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        run_evaluate(EvalConfig(fid_weights=str(tmp_path / "nope.safetensors")))
    # Inception-v3 weights from a user path (random here): loaded by name; other weights are refused
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    from ediffi_platform.evaluate import load_extractor

    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "inc.safetensors"))
    ext, size = load_extractor("inception_v3", str(tmp_path / "inc.safetensors"))
    with torch.no_grad():
        assert size == 299 and ext(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not Inception-v3 weights"):
        load_extractor("inception_v3", str(tmp_path / "other.safetensors"))
