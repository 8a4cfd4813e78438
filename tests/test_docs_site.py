"""The documentation site (mkdocs.yml, docs/) builds with warnings as errors, so a broken link or
anchor, or a page left out of the nav, fails `make test`; the README, the front page, stays short,
links every page, and its relative links resolve (GitHub renders it; mkdocs never sees it)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's notice about its successor
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def nav_pages() -> list[str]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    return [page for item in nav for page in item.values()]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "memory" / "index.html").is_file()
    assert sorted(nav_pages()) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    # a fence whose info string the renderer rejects comes out as inline code spanning lines
    html = {p.parent.name: p.read_text(encoding="utf-8") for p in (tmp_path / "site").rglob("*.html")}
    assert [name for name, text in html.items() if re.search(r"<code>```|<code>python[^<\n]*\n", text)] == []


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    """The check above can fail: the same site with one bad link, then one bad anchor."""
    for bad in ("[gone](no-such-page.md)", "[gone](memory.md#no-such-heading)"):
        copy = tmp_path / f"copy-{len(bad)}"
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        page = copy / "docs" / "data.md"
        page.write_text(page.read_text(encoding="utf-8") + f"\nSee {bad}.\n", encoding="utf-8")
        done = build(copy, copy / "site")
        assert done.returncode != 0 and "no-such" in done.stderr, (bad, done.stderr[-2000:])


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slugify(h, "-") for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readmes_relative_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(readme):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.exists() or (anchor and file.is_file() and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    linked = set(LINK.findall(readme))
    assert [p for p in nav_pages() if p != "index.md" and f"docs/{p}" not in linked] == []
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("make ")]
    assert commands == ["make demo", "make test"]  # the two set-up commands, and no other


def test_every_figure_of_the_readmes_table_is_in_its_source():
    """The "What is measured" table quotes; it does not measure: each number of a row's figure is
    in a page or a stored file the row names."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## What is measured", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    missing = []
    for what, figure, where in rows[1:]:  # after the header
        sources = [*LINK.findall(where), *re.findall(r"`([\w/.-]+\.(?:md|py))`", where)]
        text = "".join((ROOT / s.partition("#")[0]).read_text(encoding="utf-8") for s in sources)
        missing += [(what, n) for n in re.findall(r"\d+(?:\.\d+)?", figure) if n not in text]
    assert len(rows) > 5 and missing == []
