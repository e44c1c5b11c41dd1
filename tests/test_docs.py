"""The README stays a front page and the docs/ pages stay linked: no broken relative link, a reading order that
names every root file, a root that holds only the reading path."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def pages():
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def relative_links(page):
    text = FENCE.sub("", page.read_text())  # a code block's brackets are code, not links
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor on the same page
        yield target


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move reference material into docs/"


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in relative_links(page):
            path = target.split("#", 1)[0]  # anchors are not checked
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_the_checker_sees_links():
    assert any(True for _ in relative_links(README))  # the pattern still matches this README's links


def test_reading_order_names_every_root_file():
    text = README.read_text()
    start = text.index("## Reading order")
    end = text.index("\n## ", start + 1)
    order = text[start:end]
    root_files = sorted(p.name for p in ROOT.glob("*.py"))
    missing = [name for name in root_files if f"`{name}`" not in order]
    assert not missing, f"root files missing from the README's reading order: {missing}"


def test_the_root_holds_only_the_reading_path():
    root_files = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_files) <= 14, f"{len(root_files)} .py files at the root ({root_files}): put support in a folder"


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, -1, -2 ... for
    repeats."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_anchor_names_a_heading():
    broken = []
    for page in pages():
        for target in relative_links(page):
            path, sep, anchor = target.partition("#")
            if sep and path.endswith(".md") and anchor not in heading_anchors(page.parent / path):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
