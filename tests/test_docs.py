"""The documentation builds, and its links lead somewhere.

`mkdocs build --strict` checks the pages in docs/ (nav, links between pages, anchors); the pages
outside docs/ that mkdocs does not build (README.md, ARCHITECTURE.md, bench/README.md) are
checked here: every relative link must name a file or folder of the repository, and an anchor
must name a heading of the target, as GitHub renders it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINKED_PAGES = ["README.md", "ARCHITECTURE.md", "bench/README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text with code blocks and code spans removed: links inside code are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    prose = _prose(text)
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:, …


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered -1, -2, …"""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.relative_to(ROOT)}: {target}: no such file")
        elif not dest.is_relative_to(ROOT):
            problems.append(f"{page.relative_to(ROOT)}: {target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.relative_to(ROOT)}: {target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("name", LINKED_PAGES)
def test_relative_links_resolve(name):
    page = ROOT / name
    assert page.is_file(), f"{name} is missing"
    assert broken_links(page) == []


def test_link_checker_finds_broken_links(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](#here) [web](https://example.org/x.md)\n"
        "`[code](nowhere.md)`\n```\n[block](nowhere.md)\n```\n# Here\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three-words)\n[ref]: missing/file.md\n"
    )
    assert broken_links(page) == [
        "README.md: docs/b.md: no such file",
        "README.md: docs/a.md#three-words: no heading with anchor #three-words in docs/a.md",
        "README.md: missing/file.md: no such file",
    ]


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move reference material into docs/"


def test_every_builtin_method_has_a_section():
    from modelalloy.methods import BUILTIN_METHODS

    anchors = github_anchors((ROOT / "docs" / "methods.md").read_text(encoding="utf-8"))
    missing = [m.name for m in BUILTIN_METHODS if m.name not in anchors]
    assert missing == [], f"docs/methods.md has no '### `NAME`' section for {', '.join(missing)}"


def test_mkdocs_builds_strict(tmp_path):
    """mkdocs.yml sets strict and link validation: a broken link, a missing anchor or a page
    left out of the nav fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
