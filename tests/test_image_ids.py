"""Image ids cover everything that changes an image's pixels, and nothing that does not (no Ray)."""

import json
import shutil
from dataclasses import fields, replace

import pytest

from conftest import randomize
from ediffi.checkpoint import CONFIG_FILE, save_checkpoint
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import intervals_from_boundaries, write_manifest
from ediffi.pipeline import SamplerConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import to_dict
from ediffi_platform.generate import (
    NOT_IN_IMAGE_ID,
    GenerateConfig,
    SRStageConfig,
    check_encoders,
    expand,
    image_settings,
    job_encoders,
)
from ediffi_platform.prompts import Request
from ediffi_platform.runs import model_id, resolve_model
from ediffi_platform.storage import StorageConfig
from ediffi_platform.tracking import TrackingConfig

REQUESTS = [
    Request(1, "a red circle"),
    Request(2, "a blue square", seed=5, steps=3, guidance=1.5),
    Request(3, "a red circle on the left", masks={"red circle": {"rect": [0, 0, 0.5, 1]}}),
]

# An other value for every field that is part of the id; test_every_field_is_covered keeps the tables whole.
CHANGED = {
    "use_ema": False,
    "encoders": EncoderConfig(seed=1),
    "sampler": SamplerConfig(steps=5, guidance=3.0, sampler="euler"),
    "image_format": "webp",
}
SAMPLER_CHANGED = {
    "sampler": "dpmpp_2m",
    "steps": 7,
    "sigma_min": 0.01,
    "sigma_max": 40.0,
    "rho": 5.0,
    "S_churn": 10.0,
    "S_tmin": 0.1,
    "S_tmax": 10.0,
    "S_noise": 1.01,
    "guidance": 4.0,
    "guidance_mode": "text",
    "style_guidance": 2.0,
}
ENCODER_CHANGED = {
    "t5": "models/t5",
    "t5_len": 64,
    "clip": "ViT-B-32",
    "clip_pretrained": "x.bin",
    "dtype": "bfloat16",
    "seed": 3,
}
SR_CHANGED = {"sampler": SamplerConfig(steps=4), "aug_sigma": 0.3}
# Fields outside the id, changed: the same ids (seed, images_per_prompt, paint_strength enter per row).
NEUTRAL_CHANGED = {
    "prompts": "other/prompts.jsonl",
    "prompt_column": "caption",
    "on_bad_row": "fail",
    "out": "s3://bucket/elsewhere",
    "grid_images": 0,
    "tracking": TrackingConfig(enabled=False),
    "storage": StorageConfig(endpoint_url="http://127.0.0.1:9"),
    "ray_address": "ray://head:10001",
    "batch_size": 3,
    "concurrency": 4,
    "num_gpus": 1.0,
    "num_cpus": 2.0,
    "threads_per_actor": 3,
    "memory_format": "contiguous",
    "compile": True,
}
PER_ROW = {"model", "seed", "images_per_prompt", "paint_strength"}


def _net(seed: int, preset: str = "tiny"):
    return randomize(build_denoiser(get_preset(preset)), seed=seed)


def _save(path, model: int, ema: int, preset: str = "tiny"):
    """A checkpoint whose model and EMA weights are drawn from the given seeds, recording the tiny encoders."""
    meta = {"encoders": to_dict(EncoderConfig())}
    return save_checkpoint(path, get_preset(preset), _net(model, preset), ema=_net(ema, preset), metadata=meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base checkpoint, an SR checkpoint and a two-expert manifest."""
    d = tmp_path_factory.mktemp("ids")
    _save(d / "base", 1, 11)
    _save(d / "sr", 2, 12, "tiny_sr")
    _save(d / "e0", 3, 13)
    _save(d / "e1", 4, 14)
    write_manifest(d / "ens" / "manifest.json", intervals_from_boundaries([1.0]), ["../e0", "../e1"])
    return d


def _ids(cfg: GenerateConfig, requests=REQUESTS) -> list[str]:
    """The ids run_generate gives these rows: the model resolved, encoders chosen and checked, settings hashed."""
    model = resolve_model(cfg.model, cfg.storage)
    sr_models = tuple(resolve_model(st.model, cfg.storage) for st in cfg.sr_stages)
    encoders = job_encoders(cfg, model)
    settings = image_settings(
        cfg, encoders, model_id(model, cfg.storage), tuple(model_id(m, cfg.storage) for m in sr_models)
    )
    return [r["id"] for r in expand(requests, cfg, settings)]


def _cfg(models, **kw) -> GenerateConfig:
    return replace(GenerateConfig(model=str(models / "base"), sampler=SamplerConfig(steps=4, guidance=2.0)), **kw)


def test_every_field_is_covered():
    gen = {f.name for f in fields(GenerateConfig)}
    assert set(CHANGED) | {"sr_stages"} | NOT_IN_IMAGE_ID == gen and not (set(CHANGED) & NOT_IN_IMAGE_ID)
    assert set(NEUTRAL_CHANGED) | PER_ROW == NOT_IN_IMAGE_ID
    assert set(SAMPLER_CHANGED) == {f.name for f in fields(SamplerConfig)}
    assert set(ENCODER_CHANGED) == {f.name for f in fields(EncoderConfig)}
    assert set(SR_CHANGED) | {"model"} == {f.name for f in fields(SRStageConfig)}


def test_every_setting_that_changes_pixels_changes_every_id(models):
    base = _ids(_cfg(models))
    assert len(set(base)) == 3
    variants = {f"{k}": _cfg(models, **{k: v}) for k, v in CHANGED.items()}
    variants |= {
        f"sampler.{k}": _cfg(models, sampler=replace(SamplerConfig(steps=4, guidance=2.0), **{k: v}))
        for k, v in SAMPLER_CHANGED.items()
    }
    seen = {}
    for name, cfg in variants.items():
        ids = _ids(cfg)
        if name in ("sampler.steps", "sampler.guidance"):  # row 2 sets its own steps and guidance
            assert ids[0] != base[0] and ids[1] == base[1] and ids[2] != base[2], name
        else:
            assert not set(ids) & set(base), name
        seen[name] = tuple(ids)
    assert len(set(seen.values())) == len(seen)  # and no two settings collide
    # The encoders: every field, compared on the settings (most encoders cannot be built here).
    ref = image_settings(_cfg(models), to_dict(EncoderConfig()), "m")
    for k, v in ENCODER_CHANGED.items():
        enc = to_dict(replace(EncoderConfig(), **{k: v}))
        ids = [r["id"] for r in expand(REQUESTS, _cfg(models), image_settings(_cfg(models), enc, "m"))]
        assert not set(ids) & {r["id"] for r in expand(REQUESTS, _cfg(models), ref)}, k


def test_model_content_sr_stages_and_per_row_values(models, tmp_path):
    cfg = _cfg(models)
    base = _ids(cfg)
    # The model by content: a copy elsewhere keeps the ids; other weights (model or EMA alone) change them.
    shutil.copytree(models / "base", tmp_path / "copy")
    assert _ids(replace(cfg, model=str(tmp_path / "copy"))) == base
    assert not set(_ids(replace(cfg, model=str(_save(tmp_path / "m", 99, 11))))) & set(base)
    assert not set(_ids(replace(cfg, model=str(_save(tmp_path / "e", 1, 99))))) & set(base)
    # A checkpoint saved before weight digests were recorded: its weight files are hashed instead.
    for name, seed in (("old", 1), ("old-other", 99)):
        doc = json.loads((_save(tmp_path / name, seed, 11) / CONFIG_FILE).read_text())
        del doc["weights"]
        (tmp_path / name / CONFIG_FILE).write_text(json.dumps(doc))
    old = _ids(replace(cfg, model=str(tmp_path / "old")))
    assert old != base and not set(old) & set(_ids(replace(cfg, model=str(tmp_path / "old-other"))))
    # An ensemble: its experts' weights are part of its id, not just the manifest's text.
    ens = replace(cfg, model=str(models / "ens" / "manifest.json"))
    shutil.copytree(models, tmp_path / "m2", ignore=shutil.ignore_patterns("base", "sr"))
    _save(tmp_path / "m2" / "e1", 4, 7)  # only the second expert's EMA differs
    assert not set(_ids(ens)) & set(_ids(replace(ens, model=str(tmp_path / "m2" / "ens" / "manifest.json"))))
    # SR stages: the cascade, each stage's settings and its model's weights.
    stage = SRStageConfig(model=str(models / "sr"))
    one = _ids(replace(cfg, sr_stages=(stage,)))
    assert not set(one) & set(base)
    for k, v in SR_CHANGED.items():
        assert not set(_ids(replace(cfg, sr_stages=(replace(stage, **{k: v}),)))) & set(one), k
    assert not set(_ids(replace(cfg, sr_stages=(stage, stage)))) & set(one)
    _save(tmp_path / "sr2", 8, 12, "tiny_sr")
    assert not set(_ids(replace(cfg, sr_stages=(replace(stage, model=str(tmp_path / "sr2")),)))) & set(one)
    # Fields outside the id leave every id as it was.
    for k, v in NEUTRAL_CHANGED.items():
        assert _ids(replace(cfg, **{k: v})) == base, k
    # An encoder override equal to the recorded encoders is the same images.
    assert _ids(replace(cfg, encoders=EncoderConfig())) == base
    # Per-row values: the job seed moves rows without a seed, images_per_prompt adds images, the
    # paint strength moves painted rows only; a row's own values each make another image.
    assert [a == b for a, b in zip(_ids(replace(cfg, seed=1)), base, strict=True)] == [False, True, False]
    more = _ids(replace(cfg, images_per_prompt=2))
    assert len(more) == 6 and set(base) < set(more)
    assert [a == b for a, b in zip(_ids(replace(cfg, paint_strength=2.0)), base, strict=True)] == [True, True, False]
    r = REQUESTS[1]
    for change in (
        {"prompt": "a red square"},
        {"seed": 6},
        {"steps": 4},
        {"guidance": 1.0},
        {"style": "s.png"},
        {"masks": {"blue": {"rect": [0, 0, 1, 1]}}},
        {"id": "x"},
    ):
        (changed,) = _ids(cfg, [replace(r, **change)])
        assert changed != base[1], change
    assert _ids(cfg, [replace(r, paint_strength=1.0)]) == [base[1]]  # no masks: nothing to paint
    assert _ids(cfg, [replace(REQUESTS[2], paint_strength=1.0)]) != [base[2]]


def test_encoders_that_do_not_fit_the_model_fail_before_any_actor(models):
    base = str(models / "base")
    check_encoders(to_dict(EncoderConfig()), (base,), StorageConfig())
    with pytest.raises(
        ValueError,
        match=r"base: the encoders \(t5='tiny', clip='ViT-B-32'\) produce clip_dim=512, the model expects clip_dim=32",
    ):
        check_encoders(to_dict(EncoderConfig(clip="ViT-B-32")), (base,), StorageConfig())
    with pytest.raises(ValueError, match="produce t5_len=64, the model expects t5_len="):
        check_encoders(to_dict(EncoderConfig(t5_len=64)), (base, str(models / "sr")), StorageConfig())
