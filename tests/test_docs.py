"""The design document the code cites is in the repository, and every section it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
CITATION = re.compile(r'docs/design\.md`?,?\s*\(?"([^"]+)"')
SOURCES = ("repopt", "hypersearch", "target_train", "pipelines", "tests", "conf", "docs")


def _sources() -> list[Path]:
    files = [REPO / "README.md"]
    for top in SOURCES:
        files += [p for p in (REPO / top).rglob("*") if p.suffix in (".py", ".md", ".yaml") and p != DESIGN]
    return files


def test_every_cited_section_exists():
    headings = {line.lstrip("#").strip() for line in DESIGN.read_text().splitlines() if line.startswith("#")}
    cited = {}
    for path in _sources():
        for section in CITATION.findall(path.read_text()):
            cited.setdefault(section, []).append(path.relative_to(REPO))
    assert len(cited) >= 4, cited  # the math, the model family, the scales file, performance
    missing = {s: [str(p) for p in ps] for s, ps in cited.items() if s not in headings}
    assert not missing, f"cited sections not in docs/design.md: {missing}"


def test_no_file_cites_a_design_file_outside_the_repository():
    outside = "DESIGN" + ".md"  # spelt in two parts so that this file does not match itself
    offenders = [str(p.relative_to(REPO)) for p in _sources() if outside in p.read_text()]
    assert not offenders, offenders


def test_design_covers_what_the_code_relies_on():
    text = DESIGN.read_text()
    for section in ("Layout", "The model family", "The math", "The scales file", "Data", "Run directories"):
        assert f"\n## {section}\n" in text, section


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_contents_list_every_section_and_each_link_lands():
    text = (REPO / "README.md").read_text()
    sections = [_anchor(h) for h in re.findall(r"^## (.+)$", text, re.MULTILINE)]
    contents = text.split("**Contents**", 1)[1].split("\n\n", 2)[1]
    links = re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)$", contents, re.MULTILINE)
    assert links == sections  # every section, in order, and no link to a heading that is not there


def test_the_docs_name_no_path_of_one_machine():
    """Data and files are named relative to the repository (``../shared/data/...``), never as this machine's paths."""
    absolute = re.compile(r"(?<![\w.])/(?:work|root|home|Users)/[\w.-]+")
    found = {
        str(p.relative_to(REPO)): absolute.findall(p.read_text())
        for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
        if absolute.search(p.read_text())
    }
    assert not found
