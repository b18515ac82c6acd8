"""The docs' generated tables (job reference from the config dataclasses, preset table from
ediffi.presets) are kept in step with the code by this test."""

import re
from pathlib import Path

import pytest

from ediffi_platform.config_docs import (
    DOC,
    SECTIONS,
    anchor,
    current_section,
    jobs,
    main,
    markdown,
    preset_markdown,
    rows,
    shared_sections,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", DOC]  # the files that may hold generated sections


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_generated_sections_match_the_code(name):
    begin, end, render = SECTIONS[name]
    held = {doc: current_section((ROOT / doc).read_text(), begin, end) for doc in DOCS}
    held = {doc: text for doc, text in held.items() if text is not None}
    assert len(held) == 1, f"section {name!r} must sit in exactly one of {DOCS}, found in {sorted(held)}"
    (doc, section), fresh = held.popitem(), render()
    assert section == fresh, f"{doc}: {name} is stale: run python -m ediffi_platform.config_docs"


def test_preset_table_lists_every_preset_with_its_report():
    from ediffi.presets import PRESETS, preset_report

    lines = [line for line in preset_markdown().splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == list(PRESETS)
    base = next(line for line in lines if line.startswith("| `base64`")).split(" | ")
    report = preset_report("base64")
    assert (
        base[2] == f"{report['params'] / 1e6:,.0f} M" and base[3] == f"{report['forward_flops_per_image'] / 1e9:,.0f}"
    )


def test_main_rewrites_only_the_sections_it_finds(tmp_path, capsys):
    begin, end, render = SECTIONS["preset-table"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{begin}\nold rows\n{end}\noutro\n")
    assert main([str(doc)]) == 0
    assert doc.read_text() == f"intro\n{render()}\noutro\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    assert main([str(tmp_path / "plain.md")]) == 2 and "no generated-section markers" in capsys.readouterr().err


def test_every_job_script_is_documented_with_the_class_it_parses():
    scripts = {}
    for path in sorted((ROOT / "jobs").glob("*.py")):
        m = re.search(r"job_config\((\w+),", path.read_text())
        if m:
            scripts[f"jobs/{path.name}"] = m.group(1)
    documented = {k: v.__name__ for k, v in jobs().items() if k.startswith("jobs/")}
    assert scripts == documented


def test_every_key_has_a_type_default_and_meaning():
    for job, cls in (jobs() | shared_sections()).items():
        for key, tp, default, text in rows(cls):
            assert tp and text, f"{job}: key {key} lacks a type or a comment"
            assert default or tp == "section", f"{job}: key {key} lacks a default"


def test_shared_sections_are_listed_once_and_linked_with_the_defaults_a_job_changes():
    from ediffi_platform.demo import DemoConfig

    text = markdown()
    for title, cls in shared_sections().items():
        for key, *_ in rows(cls, shared={}):
            assert text.count(f"| `{title.removesuffix('*')}{key}` |") == 1, (title, key)
        assert text.count(f"### `{title}`") == 1 and f"(#{anchor(title)})" in text
    nested = {"sampler.steps", "sr_stages[].sampler.steps", "encoders.t5", "clip.t5", "storage.key", "tracking.uri"}
    for job, cls in jobs().items():
        assert not nested & {key for key, *_ in rows(cls)}, job
    demo = {key: (default, meaning) for key, _, default, meaning in rows(DemoConfig)}
    sampler = DemoConfig().sampler
    assert demo["sampler.*"][0] == f"steps={sampler.steps}, guidance={sampler.guidance}"
    assert "[`sampler.*`](#sampler)" in demo["sampler.*"][1]


def test_main_without_arguments_rewrites_the_config_reference(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    begin, end, render = SECTIONS["config-tables"]
    (tmp_path / DOC).write_text(f"{begin}\nold\n{end}\n")
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0 and (tmp_path / DOC).read_text() == f"{render()}\n"
    monkeypatch.chdir(tmp_path / "docs")
    assert main([]) == 2 and "run from the repository root" in capsys.readouterr().err
