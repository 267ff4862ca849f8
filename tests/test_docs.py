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
