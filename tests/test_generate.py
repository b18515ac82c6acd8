"""Batch generation: prompt files, determinism across batch sizes and formats, resume, model vs EMA
weights against no-Ray samples, two actors with one dying, S3 input and output, cascades, and the
errors raised before Ray starts."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import randomize
from ediffi.checkpoint import load_checkpoint, save_checkpoint
from ediffi.encoders import ConditioningEncoder, EncoderConfig
from ediffi.ensemble import intervals_from_boundaries, load_ensemble, write_manifest
from ediffi.pipeline import SamplerConfig, sample, to_uint8
from ediffi.presets import build_denoiser, get_preset
from ediffi_platform import faults
from ediffi_platform.config import to_dict
from ediffi_platform.generate import GenerateConfig, SRStageConfig, image_settings, load_model, run_generate
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
    for bad_cfg in ({"seed": -1}, {"seed": 2**62 + 1}, {"images_per_prompt": 1025}, {"num_gpus": -1}, {"num_cpus": 0}):
        with pytest.raises(ValueError, match=next(iter(bad_cfg))):
            GenerateConfig(**bad_cfg)
    # The top of the range: a row's last image seed is the largest int64 (Parquet's seed column).
    from ediffi_platform.generate import expand
    from ediffi_platform.prompts import SEED_MAX, Request

    def seeds(request: Request, cfg: GenerateConfig) -> list[int]:
        return [r["seed"] for r in expand([request], cfg, image_settings(cfg, to_dict(EncoderConfig()), "m"))]

    top = seeds(Request(1, "a", seed=SEED_MAX, images=1024), GenerateConfig())
    assert max(top) == 2**63 - 1 and pa.array(top, pa.int64())
    assert max(seeds(Request(10**9, "a"), GenerateConfig(seed=2**62, images_per_prompt=1024))) < 2**63


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
    """A tiny two-expert ensemble with distinct random weights, recording its (tiny) encoders; each
    expert's EMA weights differ from its model weights, so which of them sampled shows in the pixels."""
    d = tmp_path_factory.mktemp("ens")
    cfg = get_preset("tiny")
    paths = []
    for i in range(2):
        D = randomize(build_denoiser(cfg), seed=10 + i, std=0.2)  # logits large enough for painting to show
        ema = randomize(build_denoiser(cfg), seed=20 + i, std=0.2)
        paths.append(save_checkpoint(d / f"e{i}", cfg, D, ema=ema, metadata={"encoders": to_dict(EncoderConfig())}))
    write_manifest(d / "manifest.json", intervals_from_boundaries([1.0]), [p.name for p in paths])
    return d


@pytest.fixture(scope="module")
def job(ensemble, tmp_path_factory) -> GenerateConfig:
    """The tests' job: the ensemble, a few steps, half-CPU actors, and one MLflow store for the
    module (creating a store costs about a second)."""
    d = tmp_path_factory.mktemp("mlflow")
    return GenerateConfig(
        model=str(ensemble / "manifest.json"),
        sampler=SamplerConfig(steps=4, guidance=2.0),
        batch_size=4,
        num_cpus=0.5,
        grid_images=4,
        tracking=TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "mlruns").as_uri()),
    )


@pytest.fixture(scope="module")
def encoder() -> ConditioningEncoder:
    """The encoders the ensemble records (the tiny ones), for samples taken without Ray."""
    return ConditioningEncoder(EncoderConfig()).eval()


def test_use_ema_picks_the_weights_of_a_checkpoint_or_of_each_expert(ensemble, tmp_path):
    """use_ema chooses EMA or model weights for one checkpoint and for every expert of a manifest;
    a checkpoint without EMA weights serves its model weights either way."""
    weights = lambda D: [p.detach().clone() for p in D.parameters()]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for ema in (True, False):
        single = weights(load_model(str(ensemble / "e0"), ema, "cpu")[0])
        experts = load_model(str(ensemble / "manifest.json"), ema, "cpu")[0].experts
        for i, expert in enumerate(experts):
            for want in (True, False):
                ref = weights(load_checkpoint(str(ensemble / f"e{i}"), use_ema=want)[0])
                assert same(weights(expert), ref) == (want == ema), (i, ema, want)
                if i == 0:
                    assert same(single, ref) == (want == ema), (ema, want)
    D = randomize(build_denoiser(get_preset("tiny")), seed=3)
    path = save_checkpoint(tmp_path / "no_ema", get_preset("tiny"), D)
    assert same(weights(load_model(str(path), True, "cpu")[0]), weights(D))


def _cfg(job: GenerateConfig, tmp_path, prompts, **kw) -> GenerateConfig:
    return replace(job, **{"prompts": str(prompts), "out": str(tmp_path / "out"), **kw})


def _images(out) -> dict[str, np.ndarray]:
    meta = pq.read_table(str(out / "metadata")).to_pylist()
    return {m["id"]: np.asarray(Image.open(out / m["image"])) for m in meta}


def _by_prompt_seed(out) -> dict[tuple[str, int], np.ndarray]:
    meta = pq.read_table(str(out / "metadata")).to_pylist()
    return {(m["prompt"], m["seed"]): np.asarray(Image.open(out / m["image"])) for m in meta}


def _reference(ensemble, encoder, wanted, use_ema: bool) -> list[np.ndarray]:
    """Without Ray: (prompt, seed, steps, guidance) rows sampled as ImageGenerator samples them (one
    batch per steps and guidance, a seed per image), by the ensemble with its EMA weights (use_ema)
    or its model weights."""
    D = load_ensemble(ensemble / "manifest.json", use_ema=use_ema)
    R = get_preset("tiny").img_resolution
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, steps, guidance) in enumerate(wanted):
        groups.setdefault((steps, guidance), []).append(i)
    out: list = [None] * len(wanted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: on a busy 2-core machine a second thread makes them ~20x slower
    try:
        with torch.no_grad():
            for (steps, guidance), idx in groups.items():
                cond, _ = encoder.encode([wanted[i][0] for i in idx])
                x = sample(
                    D, cond, (3, R, R), [wanted[i][1] for i in idx], SamplerConfig(steps=steps, guidance=guidance)
                )
                for i, img in zip(idx, to_uint8(x).numpy(), strict=True):
                    out[i] = img
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_close(a: np.ndarray, b: np.ndarray, what) -> None:
    """The same image up to the rounding to uint8 of float sums whose order depends on the batch
    (size, memory layout): at most 1 level, in few pixels."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, (what, int(diff.max()), float((diff > 0).mean()))


def _assert_differ(a: np.ndarray, b: np.ndarray, what) -> None:
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() > 4, what


CIRCLE, SQUARE, TRIANGLE = (
    "a small red circle in the center on a white background",
    "a big blue square at the top left",
    "a green triangle",
)


@pytest.mark.usefixtures("ray_local")
def test_jsonl_then_parquet_ema_weights_batch_sizes_and_resume(job, ensemble, encoder, tmp_path, monkeypatch):
    """A JSONL file, then its rows plus one more from Parquet into the same folder (a resume: the same
    rows are the same ids). use_ema=True samples the EMA weights: every image equals the one sampled
    without Ray in other batches by the ensemble with its EMA weights, and differs from its model weights'.
    The JSONL run compiles the experts (torch.compile traced with aot_eager; batches of 3 and 1 padded
    to powers of two): its images still equal the eager reference's."""
    (tmp_path / "p.jsonl").write_text(JSONL)
    logs = []
    monkeypatch.setenv(faults.COMPILE_ENV, "aot_eager")
    s4 = run_generate(_cfg(job, tmp_path, tmp_path / "p.jsonl", compile=True), progress=logs.append)
    monkeypatch.delenv(faults.COMPILE_ENV)
    assert s4["run"]["compiled"] and s4["images_total"] == 4 and [b["line"] for b in s4["bad_rows"]] == [4, 5, 7, 8]
    assert any("line 4: invalid JSON" in m for m in logs) and any("ETA" in m for m in logs)
    meta = pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()
    assert sorted((m["line"], m["seed"]) for m in meta) == [(1, 1000), (3, 7), (3, 8), (6, 6000)]
    green = next(m for m in meta if m["line"] == 6)
    assert green["steps"] == 3 and green["guidance"] == 1.0 and green["sampler"] == "heun"
    assert all("circle" not in m["image"] and m["image"].endswith(".png") for m in meta)  # named by id
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images_total"] == 4
    first = _images(tmp_path / "out")
    assert len({v.tobytes() for v in first.values()}) == 4

    # Parquet (the prompt column named by prompt_column, nulls for defaults), one image a batch.
    table = {
        "text": [CIRCLE, SQUARE, TRIANGLE, "a yellow star"],
        "seed": [1000, 7, 6000, 9],
        "images": [None, 2, None, None],
        "steps": [None, None, 3, None],
        "guidance": [None, None, 1.0, None],
    }
    pq.write_table(pa.table(table), tmp_path / "p.parquet")
    cfg = _cfg(job, tmp_path, tmp_path / "p.parquet", prompt_column="text", batch_size=1)
    again = run_generate(cfg, progress=lambda *_: None)
    assert again["skipped_done"] == 4 and again["generated_now"] == 1 and again["images_total"] == 5
    after = _images(tmp_path / "out")
    assert all(np.array_equal(after[k], v) for k, v in first.items())  # kept, not redone

    # The job's batches were 3 + 1 + 1 images; the reference's are 4 + 1.
    wanted = [(CIRCLE, 1000, 4, 2.0), (SQUARE, 7, 4, 2.0), (SQUARE, 8, 4, 2.0), (TRIANGLE, 6000, 3, 1.0)]
    wanted.append(("a yellow star", 9, 4, 2.0))
    got = _by_prompt_seed(tmp_path / "out")
    ema, model = _reference(ensemble, encoder, wanted, True), _reference(ensemble, encoder, wanted, False)
    for (prompt, seed, *_), ref, other in zip(wanted, ema, model, strict=True):
        _assert_close(got[prompt, seed], ref, (prompt, seed))
        _assert_differ(got[prompt, seed], other, (prompt, seed))


LONG = " ".join(["a small red circle"] * 8)  # 151 bytes: over the tiny T5's 128 tokens (bytes + end)


@pytest.mark.usefixtures("ray_local")
def test_two_actors_one_killed_model_weights_csv_and_truncation(job, ensemble, encoder, tmp_path, monkeypatch):
    """Two actors, one killed mid-batch: every image exactly once. The same run: use_ema=False samples
    the model weights; CSV seeds (a blank cell: the seed of the row's line); a repeated row is one
    image; a prompt over the T5 context is counted as truncated, in the summary and on its row."""
    rows = [
        ("shape 0", 5),
        ("shape 1", ""),
        (LONG, 11),
        ("shape 3", ""),
        ("shape 0", 5),
        ("shape 5", 3),
        ("shape 6", ""),
    ]
    (tmp_path / "p.csv").write_text("prompt,seed\n" + "".join(f"{p},{s}\n" for p, s in rows))
    monkeypatch.setenv(faults.ENV, json.dumps({"generate": 2}))  # an actor dies after 2 images of a batch
    cfg = _cfg(job, tmp_path, tmp_path / "p.csv", batch_size=3, concurrency=2, use_ema=False)
    s = run_generate(cfg, progress=lambda *_: None)
    assert (tmp_path / "out" / ".fail_injected").exists()  # an actor did die mid-batch
    meta = pq.read_table(str(tmp_path / "out" / "metadata")).to_pylist()
    ids = [m["id"] for m in meta]
    assert len(ids) == len(set(ids)) == 6 and s["images_total"] == 6 and s["images_requested"] == 6
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 6
    # A blank seed cell: the seed of the row's line, 1000 * line (the header is line 1).
    want = sorted({(p, 1000 * line if seed == "" else seed) for line, (p, seed) in enumerate(rows, start=2)})
    assert sorted((m["prompt"], m["seed"]) for m in meta) == want
    assert {m["prompt"]: m["truncated"] for m in meta} == {p: p == LONG for p, _ in rows}
    assert s["run"]["truncated_prompts"] == 1

    got = _by_prompt_seed(tmp_path / "out")
    wanted = [(p, seed, 4, 2.0) for p, seed in want]
    model, ema = _reference(ensemble, encoder, wanted, False), _reference(ensemble, encoder, wanted, True)
    for (prompt, seed, *_), ref, other in zip(wanted, model, ema, strict=True):
        _assert_close(got[prompt, seed], ref, (prompt, seed))
        _assert_differ(got[prompt, seed], other, (prompt, seed))


@pytest.mark.usefixtures("ray_local")
def test_s3_prompts_model_and_output(job, ensemble, tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    fs.put(str(ensemble), "ediffi/models/ens", recursive=True)
    fs.pipe("ediffi/prompts/p.txt", b"a red circle\na blue square\n")
    cfg = _cfg(
        job,
        tmp_path,
        "s3://ediffi/prompts/p.txt",
        model="s3://ediffi/models/ens/manifest.json",
        out="s3://ediffi/gen",
        storage=s3_server,
        image_format="webp",
    )
    s = run_generate(cfg, progress=lambda *_: None)
    assert s["images_total"] == 2 and s["prompts"] == "s3://ediffi/prompts/p.txt"
    assert len(fs.glob("ediffi/gen/images/*/*.webp")) == 2 and fs.exists("ediffi/gen/summary.json")
    assert math.isfinite(json.loads(fs.cat("ediffi/gen/summary.json"))["run"]["images_per_s"])
    meta = pq.read_table("ediffi/gen/metadata", filesystem=fs).to_pylist()
    assert sorted(m["prompt"] for m in meta) == ["a blue square", "a red circle"]


@pytest.mark.usefixtures("ray_local")
def test_style_references_and_paint_masks_in_jsonl_rows(job, tmp_path):
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
    s = run_generate(_cfg(job, tmp_path, tmp_path / "p.jsonl", paint_strength=3.0), progress=lambda *_: None)
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
    assert {p.name for p in tmp_path.iterdir()} == {"p.jsonl", "red.png", "out"}
    assert not (tmp_path.parent / "etc").exists() and not os.path.exists("/abs/path")
    assert meta[5]["paint_strength"] == 3.0 and meta[4]["masks"] == ""
    assert meta[2]["style"] == str(tmp_path / "red.png") and meta[3]["prompt"] == ""
    img = {n: np.asarray(Image.open(tmp_path / "out" / m["image"]), dtype=np.int16) for n, m in meta.items()}
    assert np.abs(img[1] - img[2]).max() > 0  # the style reference changes the image
    assert np.abs(img[4] - img[5]).max() > 0  # so does painting


@pytest.mark.usefixtures("ray_local")
def test_cascade_base_then_one_and_two_sr_stages(job, tmp_path):
    meta = {"encoders": to_dict(EncoderConfig())}
    sr32 = get_preset("tiny_sr")  # 16 -> 32
    sr64 = replace(sr32, img_resolution=64, patch_size=2)  # 32 -> 64 at the cost of the 32 px stage
    for name, cfg, seed in (("sr32", sr32, 4), ("sr64", sr64, 5)):
        save_checkpoint(tmp_path / name, cfg, randomize(build_denoiser(cfg), seed=seed, std=0.2), metadata=meta)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    stage = SRStageConfig(model=str(tmp_path / "sr32"), sampler=SamplerConfig(steps=3), aug_sigma=0.2)
    cascades = {32: (stage,), 64: (stage, replace(stage, model=str(tmp_path / "sr64")))}
    images = {}
    for R, stages in cascades.items():
        cfg = _cfg(job, tmp_path, tmp_path / "p.txt", sr_stages=stages, out=str(tmp_path / f"out{R}"))
        s = run_generate(cfg, progress=lambda *_: None)
        images[R] = _images(tmp_path / f"out{R}")
        assert s["images_total"] == 2 and all(v.shape == (R, R, 3) for v in images[R].values()), R
        assert s["run"]["seconds_per_image"]["sr_network"] > 0
        assert {m["resolution"] for m in pq.read_table(str(tmp_path / f"out{R}" / "metadata")).to_pylist()} == {R}
    assert not set(images[32]) & set(images[64])  # every stage is part of each image's id


def test_bad_rows_and_encoders_that_do_not_fit_fail_before_ray(job, ensemble, tmp_path, monkeypatch):
    """on_bad_row=fail: the first bad row (malformed, or a style image that is not there) stops the
    job naming file and line; encoders whose shapes do not fit the model, or an SR stage that is no
    SR model, are named. All before Ray is attached: no actor, nothing written."""
    import ediffi_platform.generate as generate

    def no_ray(*_):
        raise AssertionError("Ray attached for a job that cannot run")

    monkeypatch.setattr(generate, "ensure_ray", no_ray)
    quiet = lambda *_: None
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a red circle"}\n{"prompt": "a square"}\n{"prompt": "b", "steps": 0}\n'
    )
    with pytest.raises(PromptFileError, match=r"p\.jsonl: line 3: 'steps' must be in 1\.\.1000"):
        run_generate(_cfg(job, tmp_path, tmp_path / "p.jsonl", on_bad_row="fail"), progress=quiet)
    (tmp_path / "p.csv").write_text("prompt,seed\na red circle,1\na square,x\n")
    with pytest.raises(PromptFileError, match=r"p\.csv: line 3: 'seed' must be an integer"):
        run_generate(_cfg(job, tmp_path, tmp_path / "p.csv", on_bad_row="fail"), progress=quiet)
    (tmp_path / "style.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a", "style": "gone.png"}\n')
    with pytest.raises(ValueError, match=r"style\.jsonl: line 2: style image 'gone\.png' not found"):
        run_generate(_cfg(job, tmp_path, tmp_path / "style.jsonl", on_bad_row="fail"), progress=quiet)

    (tmp_path / "ok.txt").write_text("a red circle\n")
    ok = _cfg(job, tmp_path, tmp_path / "ok.txt")
    with pytest.raises(
        ValueError, match=r"manifest\.json: the encoders .* produce t5_len=64, the model expects t5_len=128"
    ):
        run_generate(replace(ok, encoders=EncoderConfig(t5_len=64)), progress=quiet)
    with pytest.raises(ValueError, match=r"e0.* is not a super-resolution model"):
        run_generate(replace(ok, sr_stages=(SRStageConfig(model=str(ensemble / "e0")),)), progress=quiet)
    assert not (tmp_path / "out").exists()
