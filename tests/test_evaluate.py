"""Evaluation: the Frechet distance against closed forms; the Ray job's FID / CLIP score against a direct computation."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi_platform.evaluate import EvalConfig, frechet_distance, load_extractor, run_evaluate
from ediffi_platform.synthetic import SyntheticConfig, make_shard, write_synthetic


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


def _resized(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, size, size] in [0, 1], bilinear (as evaluate.py documents)."""
    x = [torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 for im in images]
    x = [F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False) for t in x]
    return torch.cat(x).clamp(0, 1)


def _fid_reference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """FID without Ray: tiny-extractor features, sample moments, tr sqrt(S1 S2) from eigenvalues."""
    net, size = load_extractor("tiny", None)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        fa, fb = (net((_resized(x, size) - mean) / std).double().numpy() for x in (a, b))
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix
    e, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(e.clip(0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(0)).sum()
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _clip_score_reference(images: list[np.ndarray], prompts: list[str]) -> float:
    """Mean of 100 * max(cos(CLIP image, CLIP text), 0), without Ray."""
    enc = ConditioningEncoder(EncoderConfig()).eval()
    img = enc.encode_images(_resized(images, enc.image_size))
    txt = enc.encode_clip_text(prompts)[2]
    return float((F.cosine_similarity(img.double(), txt.double(), dim=-1).clamp(min=0) * 100).mean())


def _decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.usefixtures("ray_local")
def test_fid_and_clip_score_match_a_computation_without_ray(tmp_path):
    # Generated: a generation job's output (metadata with prompts), 48 varied 32px shapes + one broken file.
    gen = make_shard(SyntheticConfig(rows=48, shards=1, seed=7, image_size=32, image_format="png"), 0)
    (tmp_path / "gen" / "metadata").mkdir(parents=True)
    (tmp_path / "gen" / "images").mkdir()
    for i, data in enumerate(gen.column("jpg").to_pylist()):
        (tmp_path / "gen" / "images" / f"{i:03d}.png").write_bytes(data)
    (tmp_path / "gen" / "images" / "999.png").write_bytes(b"not an image")
    prompts = gen.column("caption").to_pylist()
    pq.write_table(
        pa.table({"image": [f"images/{i:03d}.png" for i in (*range(48), 999)], "prompt": [*prompts, "broken"]}),
        tmp_path / "gen" / "metadata" / "part-0.parquet",
    )
    # Reference: image-text Parquet shards (64px JPEGs of other shapes).
    write_synthetic(SyntheticConfig(output=str(tmp_path / "shards"), rows=48, shards=2))
    cfg = EvalConfig(
        generated=str(tmp_path / "gen"),
        reference=str(tmp_path / "shards"),
        fid_extractor="tiny",
        clip=EncoderConfig(),
        num_cpus=0.5,
    )
    out = run_evaluate(cfg, progress=lambda *_: None)
    gen_images = [_decode(b) for b in gen.column("jpg").to_pylist()]
    ref_images = [_decode(b) for b in pq.read_table(str(tmp_path / "shards")).column("jpg").to_pylist()]
    assert out["generated_images"] == out["clip_scored_images"] == 48 and out["reference_images"] == 48
    assert out["skipped_unreadable"] == {"generated": 1, "reference": 0}
    assert out["fid"] == pytest.approx(_fid_reference(gen_images, ref_images), rel=1e-6)
    assert out["clip_score"] == pytest.approx(_clip_score_reference(gen_images, prompts), rel=1e-5)

    # A plain folder of the same images (no prompts) against the job output: FID 0, no CLIP score.
    same = run_evaluate(
        EvalConfig(generated=str(tmp_path / "gen" / "images"), reference=str(tmp_path / "gen"), fid_extractor="tiny"),
        progress=lambda *_: None,
    )
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["clip_score"] is None
    assert same["skipped_unreadable"] == {"generated": 1, "reference": 1} and same["generated_images"] == 48


def test_bad_evaluation_settings(tmp_path):
    with pytest.raises(ValueError, match="needs fid_weights"):
        EvalConfig(fid_extractor="inception_v3")
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        run_evaluate(EvalConfig(fid_weights=str(tmp_path / "nope.safetensors")))
    # Inception-v3 weights from a user path (random here): loaded by name; other weights are refused
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "inc.safetensors"))
    ext, size = load_extractor("inception_v3", str(tmp_path / "inc.safetensors"))
    with torch.no_grad():
        assert size == 299 and ext(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not Inception-v3 weights"):
        load_extractor("inception_v3", str(tmp_path / "other.safetensors"))
