"""The documents hold together: README.md links every file in docs/, and every
relative link in README.md and docs/*.md leads to a file that exists (and,
with a #fragment, to a heading of that file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_the_anchor_of_a_heading_is_githubs():
    assert anchor(" Collections: `python bench/search.py`") == "collections-python-benchsearchpy"
    assert anchor("Behind nginx (the deployment)") == "behind-nginx-the-deployment"


def test_readme_links_every_document_in_docs():
    linked = {(REPO / target.split("#")[0]).resolve() for target in links(REPO / "README.md")}
    missing = [path.name for path in DOCUMENTS[1:] if path.resolve() not in linked]
    assert not missing, f"README.md's list of documents lacks {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves(document):
    broken = []
    for target in links(document):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto: ...
        file_part, _, fragment = target.partition("#")
        destination = (document.parent / file_part).resolve() if file_part else document
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no such heading")
    assert not broken, broken
