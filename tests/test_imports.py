"""The package's import structure, read from the source with `ast` (no module is imported).

Stages (rooms, one concern each; docs/DESIGN.md, layout), earliest first: data < models <
objectives < parallel < step < optimizers < reporting < checkpointing < planning < training <
generation < pipelines. The planner simulates the step the loop runs, so the step sits below both
and the loop (which asks the planner whether a run fits) above planning. A module imports only from
its own stage or earlier ones, and from the base modules (config, errors, cpu_pins, integrity,
kernels, and the package root with its __version__), which import no stage at all; cli.py, the
entry point, sits outside and loads the command
modules by name. Imports inside functions count too: a lazy import is still a dependency. No
module may reach itself through its imports (a cycle). The config is read by every command's
argument parser, so importing it must stay cheap: no torch-scale library.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "data",
    "models",
    "objectives",
    "parallel",
    "step",
    "optimizers",
    "reporting",
    "checkpointing",
    "planning",
    "training",
    "generation",
    "pipelines",
)
BASE = ("config", "errors", "kernels", "cpu_pins", "integrity")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for everything under rrhf_fast/."""
    files = {}
    for path in (ROOT / "rrhf_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (absolute or relative; a `from X import y` of a submodule
    y counts as X.y)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def stage_of(module: str) -> str:
    """'data', ..., 'pipelines', 'base' (config, errors, kernels, the package root) or 'top' (cli)."""
    part = module.split(".")[1] if "." in module else ""
    if part in STAGES:
        return part
    return "base" if part in BASE or module == "rrhf_fast" else "top"


def rank(stage: str) -> int:
    return {"base": -1, "top": len(STAGES), **{s: i for i, s in enumerate(STAGES)}}[stage]


def test_the_graph_sees_the_package():
    edges = graph()
    assert len(edges) > 40 and "rrhf_fast.kernels.rrhf_loss" in edges
    assert "rrhf_fast.data.packing" in edges["rrhf_fast.models.logprobs"]
    assert "rrhf_fast.kernels.constants" in edges["rrhf_fast.kernels.rrhf_loss"]  # relative import


def test_no_module_imports_a_later_stage():
    later = sorted(
        f"{a} ({stage_of(a)}) imports {b} ({stage_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if rank(stage_of(b)) > rank(stage_of(a)) or (stage_of(a) == "base" and stage_of(b) != "base")
    )
    assert later == []


def test_no_import_cycle():
    edges = graph()
    cycles, state = [], dict.fromkeys(edges, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if state[node] == 0:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("module", ["rrhf_fast.config", "rrhf_fast.kernels.constants", "rrhf_fast.errors"])
def test_the_config_imports_neither_triton_nor_transformers(module):
    """Measured in a fresh process: every command's --help builds its flags from the config."""
    heavy = "('torch', 'triton', 'transformers')"
    code = f"import sys, {module}; print(' '.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == []


def test_every_room_has_a_floor():
    """A new folder under rrhf_fast/ is a stage (or a base module) before anything may import it."""
    rooms = {p.name for p in (ROOT / "rrhf_fast").iterdir() if (p / "__init__.py").exists()}
    assert sorted(rooms - set(STAGES) - set(BASE)) == []
