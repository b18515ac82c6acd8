"""The end-to-end demo at reduced size: every stage runs, the summary's alignment is the judge's on the
images it wrote, and a second run resumes (every stage skipped, nothing rewritten)."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ediffi.pipeline import SamplerConfig
from ediffi_platform.demo import DemoConfig, run_demo
from ediffi_platform.judge import alignment
from ediffi_platform.synthetic import BACKGROUNDS, COLORS, POSITION_PHRASES, SHAPES, SIZES, draw

ROOT = Path(__file__).resolve().parents[1]


def caption_labels(caption: str) -> dict[str, str]:
    """The labels a synthetic caption names, read back from its words (independent of the demo's bookkeeping)."""
    words = caption.replace(",", " ").split()
    one = lambda names: next(n for n in names if n in words)
    return {
        "color": one(COLORS),
        "shape": one(SHAPES),
        "size": one(SIZES),
        "position": next(p for p, phrases in POSITION_PHRASES.items() if any(f in caption for f in phrases)),
        "background": one(BACKGROUNDS),
    }


def judged(out: Path) -> tuple[dict[str, float], list[tuple[Path, dict]]]:
    """The judge's alignment on a generation output's images, each against its own prompt's labels."""
    rows = pq.read_table(str(out / "metadata")).to_pylist()
    pairs = [(out / r["image"], caption_labels(r["prompt"])) for r in rows]
    images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in pairs]
    return alignment(images, [lab for _, lab in pairs]), pairs


def files(w: Path) -> dict[Path, int]:
    """Every weight, Parquet and image file the stages wrote, with its mtime."""
    keep = (".safetensors", ".parquet", ".png")
    stages = ("data", "runs", "experts", "outputs")
    return {p: p.stat().st_mtime_ns for s in stages for p in (w / s).rglob("*") if p.suffix in keep}


def _run_demo_job(cfg: DemoConfig) -> tuple[dict, str]:
    """`jobs/demo.py` with cfg's settings, attached to the suite's Ray cluster: (its summary, its stdout)."""
    import ray

    args = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.name != "sampler"]
    args += [f"sampler.steps={cfg.sampler.steps}", f"sampler.guidance={cfg.sampler.guidance}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "jobs/demo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(cfg.workdir, "summary.json").read_text()), p.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_demo_end_to_end_small_and_resumed(tmp_path):
    w = tmp_path / "demo"
    cfg = DemoConfig(
        workdir=str(w),
        rows=128,
        preset="tiny32",
        clip_steps=5,
        base_steps=2,
        expert_steps=2,
        eval_prompts=6,
        sampler=SamplerConfig(steps=4, guidance=3.0),
    )
    # The first run as a user starts it (attached to the suite's cluster): a short terminal that ends
    # with the summary, Ray's output in the log it names, each training line there once.
    s, terminal = _run_demo_job(cfg)
    lines = terminal.splitlines()
    assert len(lines) < 60 and lines[-1].startswith("  MLflow UI:  mlflow ui") and "RayTrainWorker" not in terminal
    (log,) = (w / "_logs").glob("demo-*.log")
    assert f"log: {log}" in terminal
    text = log.read_text()
    assert "RayTrainWorker" in text and text.count("[train base] step 2/2 loss") == 1
    assert "experts: manifest" in text and "experts: manifest" in terminal
    for k in ("grid", "report"):
        assert Path(s[k]).is_file()
    assert json.loads((w / "summary.json").read_text())["report"] == s["report"]
    report = Path(s["report"]).read_text()
    assert "Text alignment" in report and report.count("<img") == 12 and "<svg" in report
    assert "mlflow ui --backend-store-uri sqlite:///" in s["mlflow"]
    for name in ("base", "ensemble"):
        got, pairs = judged(w / "outputs" / name)
        assert len(pairs) == 6 and s["alignment"][name] == got

    # Resume: replace the ensemble's images by drawings of their prompts, then run again. Every stage
    # is skipped (nothing regenerated or rewritten), and the judge now finds every drawn label.
    for path, labels in judged(w / "outputs" / "ensemble")[1]:
        draw(**labels, image_size=32).save(path)
    before = files(w)
    logs2 = []
    s2 = run_demo(cfg, progress=logs2.append)
    assert files(w) == before
    text = "\n".join(logs2)
    assert "clip fit: " in text and "skipped" in text.split("clip fit: ")[1].split("\n")[0]
    assert "4 already done, 0 to do" in text and "train base: already at step 2 >= 2; nothing to do" in text
    assert text.count("finished earlier (step 2); skipped") == 2 and text.count("6 already written, 0 to do") == 2
    assert s2["alignment"]["base"] == s["alignment"]["base"]
    got, _ = judged(w / "outputs" / "ensemble")
    assert s2["alignment"]["ensemble"] == got and got["color"] == got["background"] == got["position"] == 1.0


def test_the_demo_bar_and_its_standard_errors():
    from ediffi_platform.demo import acceptance, standard_error

    assert standard_error(0.5, 100) == 0.05 and standard_error(1.0, 100) == 0.0
    a = {
        "base": {"color": 0.95, "position": 0.92, "all": 0.50},
        "ensemble": {"color": 0.91, "position": 0.99, "all": 0.45},
    }
    assert all(acceptance(a, 100).values())  # 5 points below, one SE of the difference is 7.1
    a["ensemble"]["all"] = 0.42
    assert acceptance(a, 100)["ensemble all five >= base - 1 SE"] is False
    a["base"]["color"] = 0.89
    assert acceptance(a, 100)["color >= 90 %"] is False
