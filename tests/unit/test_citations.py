"""Every citation in the code resolves inside the repository: "spec §N" to a section of docs/attnrl-spec.md,
a named page (``architecture.md``, ``docs/scaling.md``) to a file, a README section to a README heading."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SOURCES = sorted(path for folder in ("attnrl", "infra", "tasks", "flows", "benchmarks", "scripts", "tests")
                 for path in (PROJECT_ROOT / folder).rglob("*.py") if path != Path(__file__))
OTHER = [PROJECT_ROOT / name for name in ("Makefile", "dvc.yaml", "prefect.yaml", "pyproject.toml")]
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)?)")
PAGE = re.compile(r"(?<![\w/.-])((?:docs/)?[a-z][a-z-]*\.md)\b")
README_SECTION = re.compile(r"README(?:\.md)?(?:'s)?,? [\"']([^\"']+)[\"']")


def _headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


def _spec_sections() -> set[str]:
    sections = set()
    for heading in _headings(PROJECT_ROOT / "docs" / "attnrl-spec.md"):
        if match := re.match(r"(\d+(?:\.\d+)?)\.? ", heading):
            sections.add(match.group(1))
    return sections


def _unresolved(text: str) -> list[str]:
    spec, readme = _spec_sections(), _headings(PROJECT_ROOT / "README.md")
    missing = [f"§{n}" for n in SECTION.findall(text) if n not in spec]
    missing += [page for page in PAGE.findall(text)
                if not (PROJECT_ROOT / page).is_file() and not (PROJECT_ROOT / "docs" / page).is_file()]
    missing += [f"README {name!r}" for name in README_SECTION.findall(text)
                if not any(heading.startswith(name) for heading in readme)]
    return missing


def test_the_checker_finds_what_does_not_resolve():
    assert _unresolved('spec §7.5 and §11; see architecture.md, docs/scaling.md, README "Two commands"') == []
    assert _unresolved('spec §7.9, §18; see gpu.md, docs/missing.md, README "GPU cluster setup"') == [
        "§7.9", "§18", "gpu.md", "docs/missing.md", "README 'GPU cluster setup'"]


def test_every_citation_in_the_code_resolves():
    assert len(SOURCES) > 200
    unresolved = {str(path.relative_to(PROJECT_ROOT)): missing for path in [*SOURCES, *OTHER]
                  if (missing := _unresolved(path.read_text()))}
    assert unresolved == {}


def test_every_link_between_the_pages_resolves():
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(PROJECT_ROOT)}: {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)", page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert broken == []
