"""Every Python block of README.md and of the documentation pages (docs/*.md) runs: a page's blocks
run in order, as one script (they build on each other), in a directory of their own.

A block fenced ```python runs; one fenced ```python title="not run: WHY" is shown only (it needs a
download, say; the site shows the title above it); any other info string on a python fence fails
the test, so that a typo never skips a block silently.
"""

import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)
SHOWN = re.compile(r'python title="not run: [^"]+"')

TORCH_THREADS = 1


def blocks(page: Path = README) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


def test_the_python_blocks_are_marked():
    found = [block for page in PAGES for block in blocks(page)]
    assert [info for info, _ in found if info != "python" and not SHOWN.fullmatch(info)] == []
    api = blocks(ROOT / "docs" / "api.md")
    assert sum(info == "python" for info, _ in api) >= 4 and SHOWN.fullmatch(api[-1][0])
    assert sum(info == "python" for info, _ in blocks(README)) >= 1  # the quickstart


def run_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what the blocks write stays in tmp_path
    scope: dict = {"__name__": "__readme__"}
    name = page.relative_to(ROOT)
    for number, (info, code) in enumerate(blocks(page), 1):
        if info == "python":
            exec(compile(code, f"{name} python block {number}", "exec"), scope)
    return scope


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES if any(i == "python" for i, _ in blocks(p))],
)
def test_every_python_block_of_the_docs_runs(page, tmp_path, monkeypatch):
    scope = run_page(page, tmp_path, monkeypatch)
    if page.name in ("README.md", "api.md"):  # both end with a trained run (other pages: they run)
        assert scope["result"].step == 2 and (scope["result"].checkpoint / "README.md").is_file()
