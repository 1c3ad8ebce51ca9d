"""Links that cannot rot: every relative link and anchor in README.md and docs/*.md resolves to a
file of the repository and, where it names one, to a heading of that file."""

import re
from pathlib import Path

import pytest

from lab import make_notebooks

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6} (.*)", line)
        if heading and not in_code:
            text = re.sub(r"`|\*|\[|\]\([^)]*\)", "", heading[1]).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            found.add(slug)
    return found


def links(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [next(filter(None, m.groups())) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not this test's
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: {broken}"


def test_the_readmes_colab_badges_open_the_repository_the_notebooks_clone():
    badges = re.findall(r"colab\.research\.google\.com/github/([^)]+)/blob/main/(S8_\w+\.ipynb)",
                        (ROOT / "README.md").read_text())
    assert sorted(nb for _, nb in badges) == sorted(make_notebooks.all_notebooks())
    assert {repo for repo, _ in badges} == {make_notebooks.REPO}
