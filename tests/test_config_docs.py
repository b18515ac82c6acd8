"""The README's job reference is generated from the config dataclasses and kept in step by this test."""

import re
from pathlib import Path

from ediffi_platform.config_docs import current_section, jobs, markdown, rows

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_the_dataclasses():
    section = current_section((ROOT / "README.md").read_text())
    assert section is not None, "README.md lacks the generated config-table markers"
    assert section == markdown(), "README config tables are stale: run python -m ediffi_platform.config_docs README.md"


def test_every_job_script_is_documented_with_the_class_it_parses():
    scripts = {}
    for path in sorted((ROOT / "jobs").glob("*.py")):
        m = re.search(r"job_config\((\w+),", path.read_text())
        if m:
            scripts[f"jobs/{path.name}"] = m.group(1)
    documented = {k: v.__name__ for k, v in jobs().items() if k.startswith("jobs/")}
    assert scripts == documented


def test_every_key_has_a_type_default_and_meaning():
    for job, cls in jobs().items():
        for key, tp, default, text in rows(cls):
            assert tp and text, f"{job}: key {key} lacks a type or a comment"
            assert default or tp == "section", f"{job}: key {key} lacks a default"
