"""The README and docs/ hold together: every relative link resolves to a file (and a heading, when
it names one), the README stays a short guide, and its commands are the ones CI runs."""

import re
from pathlib import Path

from ediffi_platform.config_docs import anchor

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def headings(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(m.group(1).strip()) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, frag = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists() or (frag and path.suffix == ".md" and frag not in headings(path)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_a_short_guide_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    ci = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.startswith(("python3 -m venv", ".venv/bin/python -m pytest"))
    ]
    assert len(ci) == 3 and all(f"\n{line}" in readme for line in ci), ci  # setup, the default suite, the slow runs
