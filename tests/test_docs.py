"""The documentation's links: every relative link in README.md and docs/ (results pages included) names a file
that exists, and every #anchor a heading of the page it points to, spelled as GitHub spells heading ids. A page
reorganised (a heading renamed, a results folder moved) must not leave a reader on a dead link."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def heading_id(text: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens; markdown code marks and link targets are not part of it."""
    text = re.sub(r"\]\([^)]*\)", "]", text.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {heading_id(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def dead_links(pages: list[Path]) -> list[str]:
    found = []
    for page in pages:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not this test's to check
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                found.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
                found.append(f"{page.name}: {target} (no such heading)")
    return found


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "trials" not in p.parts)]
    assert len(pages) > 15
    assert sum("#" in t for p in pages for t in LINK.findall(p.read_text())) > 20  # anchors are checked too
    assert dead_links(pages) == []


def test_a_dead_file_and_a_dead_anchor_are_seen(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## What is left (issue 27)\n\n```\n## not a heading\n```\n")
    (tmp_path / "b.md").write_text("[ok](a.md#what-is-left-issue-27) [gone](c.md) [moved](a.md#not-a-heading) "
                                   "[self](#here) [web](https://example.org/x)\n\n### Here\n")
    assert dead_links([tmp_path / "b.md"]) == ["b.md: c.md (no such file)",
                                                "b.md: a.md#not-a-heading (no such heading)"]
