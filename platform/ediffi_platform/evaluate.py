"""Evaluation on real data: FID and CLIP score of generated vs reference images, on Ray Data actors.

Feature extractors load from a path the user gives (nothing is downloaded): FID uses the
torchvision Inception-v3 architecture with weights from `fid_weights` (.safetensors; FID values are
comparable only between runs that use the same weights), or `tiny`, a seeded random network for
tests. The CLIP score is 100 * max(cos(image, prompt), 0) averaged over generated images whose
prompts are known (a generation job's output), with the CLIP model of an EncoderConfig.
Unreadable images are skipped and counted.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from scipy import linalg

from ediffi.encoders import EncoderConfig
from ediffi_platform.actors import check_pool, pool_args, start_actor
from ediffi_platform.config import to_dict
from ediffi_platform.storage import StorageConfig, arrow_filesystem, filesystem, is_url, join, with_scheme

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
EXTRACTORS = ("inception_v3", "tiny")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation job."""

    generated: str = "outputs/generated"  # a generation job's output folder, or any folder of images
    reference: str = "data/reference"  # a folder of images, or image-text Parquet shards (a `jpg` column)
    fid_extractor: str = "inception_v3"  # inception_v3 (weights from fid_weights) or tiny (random, tests)
    fid_weights: str | None = None  # .safetensors weights of the extractor (required for inception_v3)
    clip: EncoderConfig | None = None  # CLIP for the CLIP score (clip, clip_pretrained); None = no CLIP score
    batch_size: int = 32  # images per actor call
    concurrency: int = 1  # feature actors
    num_cpus: float = 1.0  # CPUs per actor
    num_gpus: float = 0.0  # GPUs per actor
    threads_per_actor: int = 0  # torch CPU threads per actor; 0 = its CPU share rounded up
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials

    def __post_init__(self) -> None:
        check_pool(self)
        if self.fid_extractor not in EXTRACTORS:
            raise ValueError(f"fid_extractor must be one of {EXTRACTORS}, got {self.fid_extractor!r}")
        if self.fid_extractor == "inception_v3" and not self.fid_weights:
            raise ValueError(
                "fid_extractor inception_v3 needs fid_weights (a .safetensors path); nothing is downloaded"
            )


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as is customary
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _tiny_extractor() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )


def load_extractor(name: str, weights: str | None) -> tuple[torch.nn.Module, int]:
    """(feature network in eval mode, input size)."""
    if name == "tiny":
        return _tiny_extractor().eval(), 64
    from torchvision.models import inception_v3

    from ediffi.checkpoint import read_weights

    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()  # 2048-d pool features
    state = {k: v for k, v in read_weights(weights).items() if not k.startswith(("fc.", "AuxLogits."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: not Inception-v3 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval(), 299


class Features:
    """Ray Data callable class: images (files or bytes) -> FID features and, with prompts, CLIP scores."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.device = start_actor(cfg)
        self.net, self.size = load_extractor(cfg.fid_extractor, cfg.fid_weights)
        self.net.to(self.device)
        self.clip = None
        if cfg.clip is not None:
            from ediffi.encoders import ConditioningEncoder

            self.clip = ConditioningEncoder(cfg.clip).to(self.device).eval()

    def _decode(self, row: dict) -> np.ndarray | None:
        from PIL import Image

        try:
            if row.get("jpg") is not None:
                data = row["jpg"]
            else:
                fs, p = filesystem(row["uri"], self.cfg.storage)
                with fs.open(p, "rb") as f:
                    data = f.read()
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception:  # corrupt or missing: skipped, counted by the caller
            return None

    @staticmethod
    def _resized(img: np.ndarray, size: int) -> torch.Tensor:
        """uint8 [H, W, 3] -> float [3, size, size] in [0, 1]."""
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        imgs = [self._decode(r) for r in rows]
        ok = [i for i, im in enumerate(imgs) if im is not None]
        feats = np.zeros((len(rows), 0), np.float32)
        scores = np.full(len(rows), np.nan, np.float32)
        if ok:
            x = torch.stack([self._resized(imgs[i], self.size) for i in ok]).to(self.device)
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
            f = self.net((x - mean) / std).float().cpu().numpy()
            feats = np.zeros((len(rows), f.shape[1]), np.float32)
            feats[ok] = f
            prompted = [i for i in ok if rows[i].get("prompt")]
            if self.clip is not None and prompted:
                pix = torch.stack([self._resized(imgs[i], self.clip.image_size) for i in prompted])
                img_emb = self.clip.encode_images(pix.to(self.device))
                _, _, txt, _ = self.clip.encode_clip_text([rows[i]["prompt"] for i in prompted])
                cos = F.cosine_similarity(img_emb.float(), txt.float(), dim=-1).clamp(min=0) * 100
                scores[prompted] = cos.cpu().numpy()
        return pa.table(
            {
                "ok": [i in set(ok) for i in range(len(rows))],
                "feature": [feats[i].tobytes() for i in range(len(rows))],
                "clip_score": scores,
            }
        )


def _image_items(root: str, storage: StorageConfig) -> list[dict]:
    """Images of a folder (recursively), with prompts when it is a generation job's output."""
    fs, p = filesystem(root, storage)
    if not fs.exists(p):
        raise FileNotFoundError(f"{root}: not found")
    meta = join(p, "metadata")
    if fs.exists(meta) and fs.glob(join(meta, "part-*.parquet")):
        afs = arrow_filesystem(fs)
        rows = []
        for part in sorted(fs.glob(join(meta, "part-*.parquet"))):
            rows += pq.read_table(part, columns=["image", "prompt"], filesystem=afs).to_pylist()
        return [{"uri": with_scheme(join(p, r["image"]), root), "prompt": r["prompt"], "jpg": None} for r in rows]
    files = [f for f in fs.find(p) if f.lower().endswith(IMAGE_EXT)]
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXT)})")
    return [{"uri": with_scheme(f, root), "prompt": "", "jpg": None} for f in sorted(files)]


def _dataset(root: str, storage: StorageConfig) -> ray.data.Dataset:
    fs, p = filesystem(root, storage)
    shards = [f for f in (fs.find(p) if fs.exists(p) and fs.isdir(p) else []) if f.endswith(".parquet")]
    if shards and not fs.exists(join(p, "metadata")):  # image-text shards: decode the jpg column
        ds = ray.data.read_parquet(shards, filesystem=arrow_filesystem(fs), columns=["jpg"])
        return ds.map_batches(
            lambda t: t.append_column("uri", pa.array([""] * t.num_rows)).append_column(
                "prompt", pa.array([""] * t.num_rows)
            ),
            batch_format="pyarrow",
        )
    items = _image_items(root, storage)
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 64)))


def _moments(ds: ray.data.Dataset, cfg: EvalConfig) -> dict:
    out = ds.map_batches(
        Features,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="pyarrow",
        **pool_args(cfg),
    )
    n, skipped, s1, s2, clip = 0, 0, None, None, []
    for b in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok = np.asarray(b.column("ok").to_pylist())
        skipped += int((~ok).sum())
        feats = [np.frombuffer(v, np.float32) for v, k in zip(b.column("feature").to_pylist(), ok, strict=True) if k]
        if feats:
            f = np.stack(feats).astype(np.float64)
            s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
            s2 = f.T @ f if s2 is None else s2 + f.T @ f
            n += len(f)
        sc = np.asarray(b.column("clip_score").to_numpy(zero_copy_only=False), np.float64)
        clip += [float(v) for v in sc if np.isfinite(v)]
    if n < 2:
        raise ValueError(f"need at least 2 readable images for FID statistics, got {n} ({skipped} unreadable)")
    mu = s1 / n
    cov = (s2 - n * np.outer(mu, mu)) / (n - 1)
    return {"n": n, "skipped": skipped, "mu": mu, "cov": cov, "clip": clip}


def run_evaluate(cfg: EvalConfig, progress=print) -> dict:
    """FID between the generated and reference sets, and the mean CLIP score of generated images."""
    if cfg.fid_weights and not is_url(cfg.fid_weights) and not os.path.isfile(cfg.fid_weights):
        raise FileNotFoundError(f"fid_weights {cfg.fid_weights}: not found")
    gen = _moments(_dataset(cfg.generated, cfg.storage), cfg)
    ref = _moments(_dataset(cfg.reference, cfg.storage), cfg)
    fid = frechet_distance(gen["mu"], gen["cov"], ref["mu"], ref["cov"])
    out = {
        "fid": fid,
        "fid_extractor": cfg.fid_extractor,
        "generated_images": gen["n"],
        "reference_images": ref["n"],
        "skipped_unreadable": {"generated": gen["skipped"], "reference": ref["skipped"]},
        "clip_score": float(np.mean(gen["clip"])) if gen["clip"] else None,
        "clip_scored_images": len(gen["clip"]),
        "clip": to_dict(cfg.clip) if cfg.clip else None,
    }
    progress(
        f"evaluate: FID {fid:.3f} ({gen['n']} generated vs {ref['n']} reference, {cfg.fid_extractor}); "
        f"CLIP score {out['clip_score'] if out['clip_score'] is None else round(out['clip_score'], 2)}"
    )
    return out
