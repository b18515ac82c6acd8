"""Batch generation: prompt files, determinism across batch sizes, resume, a dying actor, S3 output."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import randomize
from ediffi.checkpoint import save_checkpoint
from ediffi.encoders import EncoderConfig
from ediffi.ensemble import intervals_from_boundaries, write_manifest
from ediffi.pipeline import SamplerConfig
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform.config import to_dict
from ediffi_platform.generate import GenerateConfig, run_generate
from ediffi_platform.prompts import PromptFileError, read_prompts
from ediffi_platform.tracking import TrackingConfig

JSONL = "\n".join(
    [
        '{"prompt": "a small red circle in the center on a white background"}',
        "",
        '{"prompt": "a big blue square at the top left", "seed": 7, "images": 2}',
        '{"prompt": "broken", "seed": ',
        '{"seed": 3}',
        '{"prompt": "a green triangle", "guidance": 1.0, "steps": 3}',
        '{"prompt": "typo", "sede": 3}',
        '["not", "an", "object"]',
    ]
)


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text(JSONL)
    reqs, stats = read_prompts(str(tmp_path / "p.jsonl"))
    assert [r.line for r in reqs] == [1, 3, 6] and reqs[1].seed == 7 and reqs[1].images == 2
    assert reqs[2].guidance == 1.0 and reqs[2].steps == 3
    assert stats.blank == 1 and [n for n, _ in stats.bad] == [4, 5, 7, 8]
    reasons = dict(stats.bad)
    assert "invalid JSON" in reasons[4] and "prompt" in reasons[5] and "'sede'" in reasons[7] and "object" in reasons[8]
    with pytest.raises(PromptFileError, match=r"p\.jsonl: line 4: invalid JSON"):
        read_prompts(str(tmp_path / "p.jsonl"), on_bad_row="fail")

    (tmp_path / "p.txt").write_bytes(b"first prompt\n\n   \nsecond prompt\n\xff\xfe bad bytes\n")
    reqs, stats = read_prompts(str(tmp_path / "p.txt"))
    assert [(r.line, r.prompt) for r in reqs] == [(1, "first prompt"), (4, "second prompt")]
    assert stats.blank == 3 and stats.bad[0][0] == 5 and "UTF-8" in stats.bad[0][1]

    (tmp_path / "p.csv").write_text('text,seed\n"a, comma",5\nplain,x\n,\nlast,1,extra\n')
    reqs, stats = read_prompts(str(tmp_path / "p.csv"), column="text")
    assert [(r.line, r.prompt, r.seed) for r in reqs] == [(2, "a, comma", 5)]
    assert [n for n, _ in stats.bad] == [3, 5] and stats.blank == 1
    with pytest.raises(PromptFileError, match=r"no 'prompt' column"):
        read_prompts(str(tmp_path / "p.csv"))

    pq.write_table(pa.table({"prompt": ["one", None, "three"], "seed": [1, 2, None]}), tmp_path / "p.parquet")
    reqs, stats = read_prompts(str(tmp_path / "p.parquet"))
    assert [(r.line, r.seed) for r in reqs] == [(1, 1), (3, None)] and stats.bad[0][0] == 2
    with pytest.raises(PromptFileError, match="must end in one of"):
        read_prompts(str(tmp_path / "p.yaml"))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_row_values_in_range_finite_and_named(tmp_path):
    rows = [  # (row, a phrase the reason must contain, or None when the row is valid)
        (f'{{"prompt": "a", "seed": {2**64}}}', "'seed' must be in 0..9223372036854774784"),
        (f'{{"prompt": "a", "seed": {2**63 - 1024}}}', None),  # its images' seeds stay in int64
        (f'{{"prompt": "a", "seed": {2**63 - 1023}}}', "'seed' must be in"),
        ('{"prompt": "a", "seed": -1}', "'seed' must be in"),
        ('{"prompt": "a", "seed": NaN}', "'seed' is NaN"),
        ('{"prompt": "a", "seed": 1e400}', "'seed' is infinite"),
        ('{"prompt": "a", "seed": 2.5}', "'seed' must be an integer"),
        ('{"prompt": "a", "guidance": NaN}', "'guidance' is NaN"),
        ('{"prompt": "a", "guidance": -Infinity}', "'guidance' is infinite"),
        (f'{{"prompt": "a", "guidance": {10**400}}}', "'guidance' must be in 0..100"),  # float() would overflow
        ('{"prompt": "a", "guidance": true}', "'guidance' must be a number"),
        ('{"prompt": "a", "steps": Infinity}', "'steps' is infinite"),
        ('{"prompt": "a", "images": 0}', "'images' must be in 1..1024"),
        ('{"prompt": "a", "paint_strength": NaN}', "'paint_strength' is NaN"),
        ('{"prompt": "a b", "masks": {"a": {"rect": [0, NaN, 1, 1]}}}', "'masks' 'a': rect[1] is NaN"),
        (
            '{"prompt": "a b", "masks": {"a": {"polygon": [[0, 0], [1, Infinity], [0, 1]]}}}',
            "polygon[1][1] is infinite",
        ),
        ('{"prompt": "a b", "masks": {"a": {"rect": [0, 0, "1", 1]}}}', "rect[2] must be a number"),
        ('{"prompt": "a b", "masks": {"a": {"rect": [0, 0, 2, 1]}}}', "inside [0, 1]"),  # rasterize's own check
        ('{"prompt": "a b", "masks": {"a": {"rect": [0.5, 0, 0.5, 1]}}}', "x0 < x1"),
        ('{"prompt": "a b", "masks": {"a": {"rect": [0, 0, 0.5, 1]}, "b": "b.png"}}', None),
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(r for r, _ in rows))
    reqs, stats = read_prompts(str(tmp_path / "p.jsonl"))
    assert [r.line for r in reqs] == [n for n, (_, want) in enumerate(rows, 1) if want is None]
    bad = dict(stats.bad)
    for n, (_, want) in enumerate(rows, 1):
        assert want is None or want in bad.get(n, ""), (n, want, bad.get(n))
    (tmp_path / "p.csv").write_text("prompt,guidance,seed\na,nan,1\nb,inf,2\nc,1.5,-0\nd,1,1.0\n")
    reqs, stats = read_prompts(str(tmp_path / "p.csv"))
    assert [(r.line, r.seed) for r in reqs] == [(4, 0), (5, 1)]
    assert "'guidance' is NaN" in dict(stats.bad)[2] and "'guidance' is infinite" in dict(stats.bad)[3]
    for bad_cfg in ({"seed": -1}, {"seed": 2**62 + 1}, {"images_per_prompt": 1025}):
        with pytest.raises(ValueError, match=next(iter(bad_cfg))):
            GenerateConfig(**bad_cfg)
    # The top of the range: a row's last image seed is the largest int64 (Parquet's seed column).
    from ediffi_platform.generate import expand
    from ediffi_platform.prompts import SEED_MAX, Request

    seeds = [r["seed"] for r in expand([Request(1, "a", seed=SEED_MAX, images=1024)], GenerateConfig(), "m")]
    assert max(seeds) == 2**63 - 1 and pa.array(seeds, pa.int64())
    seeds = [r["seed"] for r in expand([Request(10**9, "a")], GenerateConfig(seed=2**62, images_per_prompt=1024), "m")]
    assert max(seeds) < 2**63


def test_ids_unknown_fields_and_normalised_text(tmp_path):
    lines = [
        '{"prompt": "a", "id": "../../etc/passwd"}',
        '{"prompt": "a", "id": 17}',
        '{"prompt": "a", "id": ""}',  # empty: the same as no id
        '{"prompt": "a", "id": "  "}',
        '{"prompt": "a", "id": [1]}',
        '{"prompt": "a", "id": "x\\u0000y"}',
        '{"prompt": "a", "guidence": 2}',
        '{"prompt": "a", "id": "dup"}',
        '{"prompt": "b", "id": "dup"}',
    ]
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # a BOM before line 1
    reqs, stats = read_prompts(str(tmp_path / "p.jsonl"))
    ids = [(1, "../../etc/passwd"), (2, "17"), (3, None), (4, None), (8, "dup"), (9, "dup")]
    assert [(r.line, r.id) for r in reqs] == ids
    bad = dict(stats.bad)
    assert sorted(bad) == [5, 6, 7] and "'id' must be a string or an integer" in bad[5]
    assert "'id' holds control" in bad[6] and "unknown field 'guidence' (did you mean 'guidance'?" in bad[7]
    assert stats.duplicate_ids == 1

    # CSV: a BOM before the header, an id column; an unknown column is an error for the whole file.
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfid,prompt\nrow-1,\xef\xbb\xbfa\tred\x00 circle\n,plain\n")
    reqs, stats = read_prompts(str(tmp_path / "p.csv"))
    assert [(r.id, r.prompt) for r in reqs] == [("row-1", "a red circle"), (None, "plain")]
    assert stats.normalized == 1 and not stats.bad
    (tmp_path / "typo.csv").write_text("prompt,guidence\na,2\n")
    with pytest.raises(PromptFileError, match=r"typo\.csv: unknown column 'guidence' \(did you mean 'guidance'\?"):
        read_prompts(str(tmp_path / "typo.csv"))
    pq.write_table(pa.table({"prompt": ["a", "b"], "id": [1, None], "sede": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(PromptFileError, match=r"p\.parquet: unknown column 'sede' \(did you mean 'seed'\?"):
        read_prompts(str(tmp_path / "p.parquet"))

    # .txt: a BOM and a NUL are removed and counted; emoji, CJK and Arabic pass byte-exact.
    text = "\ufefffirst\x00 prompt\n赤い丸 🔴\nدائرة حمراء\n\x00\u202e\n"
    (tmp_path / "p.txt").write_bytes(text.encode())
    reqs, stats = read_prompts(str(tmp_path / "p.txt"))
    assert [r.prompt for r in reqs] == ["first prompt", "赤い丸 🔴", "دائرة حمراء"]
    assert stats.normalized == 1 and [n for n, _ in stats.bad] == [4] and "empty" in stats.bad[0][1]
    (tmp_path / "u16.txt").write_bytes("a prompt\n".encode("utf-16"))
    with pytest.raises(PromptFileError, match="UTF-16"):
        read_prompts(str(tmp_path / "u16.txt"))


def _job_main(argv: list[str]) -> int:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main(argv)


def test_job_with_no_valid_prompt_fails_with_the_reasons(tmp_path, capsys):
    """Checked before Ray or the model: the model path here does not even exist."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "seed": -1}\n\n{"prompt": "b", "guidence": 2}\n')
    out = tmp_path / "out"
    assert _job_main(["--prompts", str(tmp_path / "bad.jsonl"), "--out", str(out), "model=nowhere"]) == 2
    err = capsys.readouterr().err
    assert "no valid prompts: all 2 rows are bad" in err and "line 1: 'seed' must be in" in err
    assert "line 3: unknown field 'guidence'" in err and "Traceback" not in err and not out.exists()
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert _job_main(["--prompts", str(tmp_path / "blank.txt"), "--out", str(out), "model=nowhere"]) == 2
    assert "blank.txt: no prompts (the file is empty or blank)" in capsys.readouterr().err
    argv = ["--prompts", str(tmp_path / "bad.jsonl"), "--out", str(out), "on_bad_row=fail"]
    assert _job_main(argv) == 2 and "bad.jsonl: line 1: 'seed' must be in" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """A tiny two-expert ensemble with distinct random weights, recording its (tiny) encoders."""
    d = tmp_path_factory.mktemp("ens")
    cfg = get_preset("tiny")
    paths = []
    for i in range(2):
        D = randomize(build_denoiser(cfg), seed=10 + i, std=0.2)  # logits large enough for painting to show
        paths.append(save_checkpoint(d / f"e{i}", cfg, D, ema=D, metadata={"encoders": to_dict(EncoderConfig())}))
    write_manifest(d / "manifest.json", intervals_from_boundaries([1.0]), [p.name for p in paths])
    return d


def _cfg(ensemble, tmp_path, prompts, **kw):
    base = GenerateConfig(
        prompts=str(prompts),
        out=str(tmp_path / "out"),
        model=str(ensemble / "manifest.json"),
        sampler=SamplerConfig(steps=4, guidance=2.0),
        batch_size=4,
        num_cpus=0.5,
        grid_images=4,
        tracking=TrackingConfig(
            uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "mlruns").as_uri()
        ),
    )
    return replace(base, **kw)


def _images(out) -> dict[str, np.ndarray]:
    meta = pq.read_table(str(out / "metadata")).to_pylist()
    return {m["id"]: np.asarray(Image.open(out / m["image"])) for m in meta}


@pytest.mark.usefixtures("ray_local")
def test_jsonl_and_txt_deterministic_across_batch_sizes_and_resumable(ensemble, tmp_path):
    (tmp_path / "p.jsonl").write_text(JSONL)
    logs = []
    s4 = run_generate(_cfg(ensemble, tmp_path, tmp_path / "p.jsonl"), progress=logs.append)
    assert s4["images_total"] == 4 and [b["line"] for b in s4["bad_rows"]] == [4, 5, 7, 8]
    assert any("line 4: invalid JSON" in m for m in logs) and any("ETA" in m for m in logs)
    meta = pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()
    assert sorted((m["line"], m["seed"]) for m in meta) == [(1, 1000), (3, 7), (3, 8), (6, 6000)]
    green = next(m for m in meta if m["line"] == 6)
    assert green["steps"] == 3 and green["guidance"] == 1.0 and green["sampler"] == "heun"
    assert all("circle" not in m["image"] and m["image"].endswith(".png") for m in meta)  # named by id
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images_total"] == 4

    s1 = run_generate(_cfg(ensemble, tmp_path, tmp_path / "p.jsonl", batch_size=1, out=str(tmp_path / "b1")))
    a, b = _images(tmp_path / "out"), _images(tmp_path / "b1")
    assert s1["images_total"] == 4 and a.keys() == b.keys()
    for k in a:  # same prompt, seed and settings -> the same image, whatever the batch, up to
        # the rounding to uint8 of float sums whose order depends on the batch size
        diff = np.abs(a[k].astype(np.int16) - b[k].astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, (k, int(diff.max()), float((diff > 0).mean()))
    assert len({v.tobytes() for v in a.values()}) == 4

    # Resume: a first run over part of a txt file, then the whole file.
    lines = [f"prompt number {i}" for i in range(6)]
    (tmp_path / "part.txt").write_text("\n".join(lines[:3]))
    (tmp_path / "all.txt").write_text("\n".join(lines))
    cfg = _cfg(ensemble, tmp_path, tmp_path / "part.txt", out=str(tmp_path / "txt"))
    assert run_generate(cfg, progress=lambda *_: None)["generated_now"] == 3
    again = run_generate(replace(cfg, prompts=str(tmp_path / "all.txt")), progress=lambda *_: None)
    assert again["skipped_done"] == 3 and again["generated_now"] == 3 and again["images_total"] == 6


@pytest.mark.usefixtures("ray_local")
def test_actor_killed_mid_batch_still_every_image_once(ensemble, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"shape {i}" for i in range(6)))
    cfg = _cfg(ensemble, tmp_path, tmp_path / "p.txt", batch_size=3, fail_after=2, images_per_prompt=1)
    s = run_generate(cfg, progress=lambda *_: None)
    assert (tmp_path / "out" / ".fail_injected").exists()  # an actor did die mid-batch
    ids = pq.read_table(str(tmp_path / "out" / "metadata")).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and s["images_total"] == 6
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 6


@pytest.mark.usefixtures("ray_local")
def test_s3_model_and_output(ensemble, tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.put(str(ensemble), "ediffi/models/ens", recursive=True)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    cfg = _cfg(
        ensemble,
        tmp_path,
        tmp_path / "p.txt",
        model="s3://ediffi/models/ens/manifest.json",
        out="s3://ediffi/gen",
        storage=s3_server,
        image_format="webp",
    )
    s = run_generate(cfg, progress=lambda *_: None)
    assert s["images_total"] == 2
    assert len(fs.glob("ediffi/gen/images/*/*.webp")) == 2 and fs.exists("ediffi/gen/summary.json")
    assert math.isfinite(json.loads(fs.cat("ediffi/gen/summary.json"))["run"]["images_per_s"])


@pytest.mark.usefixtures("ray_local")
def test_style_references_and_paint_masks_in_jsonl_rows(ensemble, tmp_path):
    ref = np.zeros((40, 40, 3), np.uint8)
    ref[:, :, 0] = 230
    Image.fromarray(ref).save(tmp_path / "red.png")
    rows = [
        {"prompt": "a circle", "seed": 1},
        {"prompt": "a circle", "seed": 1, "style": "red.png"},
        {"style": "red.png", "seed": 1},  # style only
        {"prompt": "a red circle on the left", "seed": 2},
        {"prompt": "a red circle on the left", "seed": 2, "masks": {"red circle": {"rect": [0, 0, 0.5, 1]}}},
        {"prompt": "a red circle", "masks": {"blue square": {"rect": [0, 0, 1, 1]}}},
        {"prompt": "a circle", "style": "missing.png"},
        {"prompt": "a red circle", "masks": {"red": {"rect": [0.9, 0, 0.1, 1]}}},
        # User ids: metadata only, never a path; a row with an id is its own image, even when its
        # prompt and seed repeat another row's; identical rows (same id or none) are one image.
        *({"prompt": "a circle", "seed": 1, "id": i} for i in ("../../etc/passwd", "/abs/path", "a/b\\c:d*?")),
        {"prompt": "a square", "seed": 5, "id": "dup"},
        {"prompt": "a square", "seed": 6, "id": "dup"},
        {"prompt": "a square", "seed": 5, "id": "dup"},  # = line 12: one image
        {"prompt": "a square", "seed": 2**63 - 1024, "id": 17},  # the top of the seed range
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = run_generate(_cfg(ensemble, tmp_path, tmp_path / "p.jsonl", paint_strength=3.0), progress=lambda *_: None)
    bad = {b["line"]: b["reason"] for b in s["bad_rows"]}
    assert sorted(bad) == [6, 7, 8] and "'blue square' not found" in bad[6] and "not found" in bad[7]
    assert "x0 < x1" in bad[8]
    meta = {m["line"]: m for m in pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()}
    assert sorted(meta) == [1, 2, 3, 4, 5, 9, 10, 11, 13, 14, 15] and s["duplicate_ids"] == 1
    assert {meta[n]["prompt_id"] for n in (9, 10, 11)} == {"../../etc/passwd", "/abs/path", "a/b\\c:d*?"}
    assert meta[1]["prompt_id"] == "" and meta[13]["prompt_id"] == meta[14]["prompt_id"] == "dup"
    assert meta[15]["prompt_id"] == "17" and meta[15]["seed"] == 2**63 - 1024
    assert len({meta[n]["id"] for n in (1, 9, 10, 11)}) == 4  # same prompt and seed, four ids, four images
    out = tmp_path / "out"  # every image where its content hash says, nothing else, nothing outside
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "metadata/part-" not in str(p)}
    assert files == {f"images/{m['id'][:2]}/{m['id']}.png" for m in meta.values()} | {"summary.json"}
    assert {p.name for p in tmp_path.iterdir()} == {"p.jsonl", "red.png", "mlflow.db", "mlruns", "out"}
    assert not (tmp_path.parent / "etc").exists() and not os.path.exists("/abs/path")
    assert meta[5]["paint_strength"] == 3.0 and meta[4]["masks"] == ""
    assert meta[2]["style"] == str(tmp_path / "red.png") and meta[3]["prompt"] == ""
    img = {n: np.asarray(Image.open(tmp_path / "out" / m["image"]), dtype=np.int16) for n, m in meta.items()}
    assert np.abs(img[1] - img[2]).max() > 0  # the style reference changes the image
    assert np.abs(img[4] - img[5]).max() > 0  # so does painting


@pytest.mark.usefixtures("ray_local")
def test_cascade_base_then_sr_stage(ensemble, tmp_path):
    from ediffi_platform.generate import SRStageConfig

    sr = randomize(build_denoiser(get_preset("tiny_sr")), seed=4, std=0.2)
    save_checkpoint(tmp_path / "sr", get_preset("tiny_sr"), sr, metadata={"encoders": to_dict(EncoderConfig())})
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    stage = SRStageConfig(model=str(tmp_path / "sr"), sampler=SamplerConfig(steps=3), aug_sigma=0.2)
    s = run_generate(_cfg(ensemble, tmp_path, tmp_path / "p.txt", sr_stages=(stage,)), progress=lambda *_: None)
    imgs = _images(tmp_path / "out")
    assert s["images_total"] == 2 and all(v.shape == (32, 32, 3) for v in imgs.values())
    assert s["run"]["seconds_per_image"]["sr_network"] > 0
    meta = pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()
    assert {m["resolution"] for m in meta} == {32}
    plain = run_generate(_cfg(ensemble, tmp_path, tmp_path / "p.txt", out=str(tmp_path / "plain")))
    assert not set(_images(tmp_path / "plain")) & set(imgs)  # the cascade is part of each image's id
    assert plain["images_total"] == 2
