"""What the documentation cites must be there: every commit hash in README.md, benchmarks/README.md,
the documentation pages (docs/*.md) and the stored results (benchmarks/results/*.md) is a commit of
this repository, and every results file README.md and the pages point to exists (so that every
figure still points at its stored result)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "benchmarks/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
# a short or full hash: 7 to 40 hex digits with at least one digit and one letter (not a word, a number)
HASH = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?:-dirty)?(?![\w/.])")
RESULTS = re.compile(r"benchmarks/results/[\w.-]+\.\w+")


def cited(pattern: re.Pattern, paths: list[Path]) -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}:{n}", m.group(0)) for p in paths
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            for m in pattern.finditer(line)]  # fmt: skip


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)


def test_the_hash_pattern():
    line = "rows at commit d67e210 and a564674-dirty; not 1234567, deadbee, abcdef12x, run/0a1b2c3d.txt"
    assert [m.group(0) for m in HASH.finditer(line)] == ["d67e210", "a564674-dirty"]


def test_every_cited_commit_is_in_the_repository():
    if shutil.which("git") is None or git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout: no history to look the commits up in")
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone: older commits are not here")
    paths = [ROOT / d for d in DOCS] + sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    missing = [(where, h) for where, h in cited(HASH, paths)
               if git("cat-file", "-e", h.removesuffix("-dirty") + "^{commit}").returncode != 0]  # fmt: skip
    assert not missing, f"commits cited but not in the repository: {missing}"


def test_every_results_file_the_docs_point_to_exists():
    # benchmarks/README.md also names the files a GPU run will write: not checked here
    refs = cited(RESULTS, [ROOT / d for d in DOCS if d != "benchmarks/README.md"])
    assert {where.split(":")[0] for where, _ in refs} >= {"README.md", "docs/memory.md", "docs/losses.md"}
    missing = [(where, ref) for where, ref in refs if not (ROOT / ref).is_file()]
    assert not missing, f"results files named in the docs but absent: {missing}"
