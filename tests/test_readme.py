"""Every Python block of README.md runs, in order, as one script (the blocks build on each other).

A block fenced ```python runs; one fenced ```python no-run is shown only (it needs a download, say);
any other info string on a python fence fails the test, so that a typo never skips a block silently.
"""

import re
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)

TORCH_THREADS = 1


def blocks() -> list[tuple[str, str]]:
    return FENCE.findall(README.read_text(encoding="utf-8"))


def test_the_python_blocks_are_marked():
    found = blocks()
    assert {info for info, _ in found} <= {"python", "python no-run"}
    assert sum(info == "python" for info, _ in found) >= 4 and ("python no-run", found[-1][1]) in found


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what the blocks write stays in tmp_path
    scope: dict = {"__name__": "__readme__"}
    for number, (info, code) in enumerate(blocks(), 1):
        if info == "python":
            exec(compile(code, f"README.md python block {number}", "exec"), scope)
    assert scope["result"].step == 2 and (scope["result"].checkpoint / "README.md").is_file()
