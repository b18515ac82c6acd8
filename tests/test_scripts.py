"""jobs/*.py run as scripts, the way the README runs them: the venv's python from the repo root."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    """A job script in a fresh interpreter (one torch thread: on a busy 2-core machine two threads
    can make a tiny network's forward pass ~80x slower)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_sample_smoke_run(tmp_path):
    """The README's smoke run (fewer steps): exit 0, one image and the grid, and the line it prints."""
    out = tmp_path / "sample"
    p = _run("jobs/sample.py", "--prompts", "a small red circle", "--out", str(out), "--steps", "3")
    assert p.returncode == 0, p.stderr
    assert "sampling the untrained 'tiny' preset" in p.stdout
    assert "1 images (16x16, heun, 3 steps) in" in p.stdout and f"-> {out}/" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["00000_seed0.png", "grid.png"]
    img = np.asarray(Image.open(out / "00000_seed0.png"))
    assert img.shape == (16, 16, 3) and img.std() > 0


def test_generate_with_a_bad_prompt_file_exits_2_with_one_clear_line(tmp_path):
    """No valid row: exit 2 and the reasons on stderr, no traceback, nothing written (before Ray)."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "seed": -1}\n{"prompt": "b", "guidence": 2}\n')
    out = tmp_path / "out"
    p = _run("jobs/generate.py", "--prompts", str(tmp_path / "bad.jsonl"), "--out", str(out), "model=nowhere")
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'bad.jsonl'}: no valid prompts"), p.stderr
    assert "line 1: 'seed' must be in" in lines[0] and "line 2: unknown field 'guidence'" in lines[0]
    assert "Traceback" not in p.stderr and not out.exists()
