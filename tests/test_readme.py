"""README.md is the front door: short, the two commands, and every link it gives leads somewhere.

The details it links to live in docs/ and results/README.md; a link or an anchor that no longer
exists there fails here, so moving a section means moving its links too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The front door's length limit (the house issue: "at most about 200 lines").
MAX_README_LINES = 220
PAGES = ["README.md", "docs/guide.md", "docs/measurements.md", "results/README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def links(path: Path) -> list:
    """Relative links of a Markdown page as ``(target file, anchor or None)``."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        out.append(((path.parent / file).resolve() if file else path.resolve(), anchor or None))
    return out


def test_readme_is_short_and_gives_the_two_commands():
    text = (REPO / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/ (limit {MAX_README_LINES})"
    assert re.search(r"^make run\b", text, re.M) and re.search(r"^make test\b", text, re.M)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_leads_somewhere(page):
    bad = []
    for target, anchor in links(REPO / page):
        if not target.exists():
            bad.append(f"{page}: {target.relative_to(REPO)} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{page}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert not bad, "\n".join(bad)


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n[x](b.md) [y](#title-here) [z](#nowhere)\n")
    found = links(tmp_path / "a.md")
    assert [(t.name, a) for t, a in found] == [("b.md", None), ("a.md", "title-here"), ("a.md", "nowhere")]
    assert "nowhere" not in anchors(tmp_path / "a.md") and "title-here" in anchors(tmp_path / "a.md")
