"""The end-to-end demo at reduced size: every stage runs, the report and summary point at real files."""

import json
from pathlib import Path

import pytest

from ediffi_platform.demo import DemoConfig, run_demo


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_demo_end_to_end_small(tmp_path):
    cfg = DemoConfig(
        workdir=str(tmp_path / "demo"),
        rows=256,
        preset="tiny32",
        clip_steps=5,
        base_steps=4,
        expert_steps=2,
        eval_prompts=6,
    )
    logs = []
    s = run_demo(cfg, progress=logs.append)
    for k in ("grid", "report"):
        assert Path(s[k]).is_file()
    assert set(s["alignment"]) == {"base", "ensemble"} and all(0 <= v["color"] <= 1 for v in s["alignment"].values())
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["report"] == s["report"]
    report = Path(s["report"]).read_text()
    assert "Text alignment" in report and report.count("<img") == 12 and "<svg" in report
    assert len(list((tmp_path / "demo" / "outputs" / "ensemble" / "images").rglob("*.png"))) == 6
    assert any("experts: manifest" in m for m in logs) and "mlflow ui --backend-store-uri sqlite:///" in s["mlflow"]
