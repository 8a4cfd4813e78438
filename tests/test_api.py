"""The public Python API: the names `rrhf_fast` exports and their signatures, against the committed
snapshot tests/api_snapshot.json, so that a change to one is deliberate; and the module paths of
the previous flat layout, which import as the modules that replaced them with a DeprecationWarning.

After a deliberate change: `RRHF_FAST_UPDATE_API_SNAPSHOT=1 pytest tests/test_api.py` rewrites the
snapshot (review its diff; keep an alias for a renamed name).
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import rrhf_fast

SNAPSHOT = Path(__file__).with_name("api_snapshot.json")
ROOT = Path(__file__).resolve().parents[1]


def public_api() -> dict:
    names = {}
    for name in rrhf_fast.__all__:
        obj = getattr(rrhf_fast, name)
        if name == "__version__":
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        try:
            signature = str(inspect.signature(obj))
        except ValueError:  # an exception class: its bases are its interface
            signature = "(" + ", ".join(base.__name__ for base in obj.__bases__) + ")"
        names[name] = {"kind": kind, "module": obj.__module__, "signature": signature}
    return {"names": names, "moved_modules": dict(rrhf_fast.MOVED_MODULES)}


def test_public_names_and_signatures_match_the_snapshot():
    now = public_api()
    if os.environ.get("RRHF_FAST_UPDATE_API_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    saved = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    gone = sorted(set(saved["names"]) - set(now["names"]))
    added = sorted(set(now["names"]) - set(saved["names"]))
    changed = sorted(
        n for n in set(saved["names"]) & set(now["names"]) if saved["names"][n] != now["names"][n]
    )
    assert (gone, added, changed) == ([], [], []), "the public API changed; see this file's docstring"
    assert saved["moved_modules"] == now["moved_modules"]


def check_old_paths(old_names: list[str]) -> None:
    """In a fresh process, so that no module is cached: `import rrhf_fast` imports no torch, triton
    or transformers and every export resolves; each old path warns once, at the importing line,
    naming the new path, and is the very module the new path names; `rrhf_fast.train` stays the
    function; rrhf_fast.data's old names warn too."""
    code = f"""
import importlib, json, sys, warnings
import rrhf_fast
found = {{"heavy": [m for m in ("torch", "triton", "transformers") if m in sys.modules]}}
found["exports"] = [n for n in rrhf_fast.__all__ if getattr(rrhf_fast, n, None) is None]
for old in {old_names!r}:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("import rrhf_fast." + old, "<user>", "exec"), {{}})  # a user's import line
    module = sys.modules["rrhf_fast." + old]
    warned = [(str(w.message), w.filename, w.lineno) for w in caught if w.category is DeprecationWarning]
    same = module is importlib.import_module(rrhf_fast.MOVED_MODULES[old])
    found[old] = [same, module.__spec__.name, warned]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from rrhf_fast.data import write_text_atomically
found["train is the function"] = type(rrhf_fast.train).__name__ == "function"
found["data"] = [str(w.message) for w in caught]
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert found["heavy"] == [] and found["exports"] == []
    for old in old_names:
        new = rrhf_fast.MOVED_MODULES[old]
        same, spec, warned = found[old]
        assert same and spec == new, old
        message = (
            f"rrhf_fast.{old} moved to {new}; import it from there (rrhf_fast.{old} goes in the next release)"
        )
        assert [w for w in warned if w[0].startswith(f"rrhf_fast.{old} moved")] == [[message, "<user>", 1]]
    assert found["train is the function"] is True
    moved = "rrhf_fast.data.write_text_atomically moved to rrhf_fast.data.records.write_text_atomically"
    assert found["data"] == [f"{moved}; import it from there (the old path goes in the next release)"]


def test_the_package_imports_cheaply_and_every_old_module_path_warns():
    """One fresh process for all 45 (its cost is importing torch and transformers once)."""
    flat = [old for old in rrhf_fast.MOVED_MODULES if "." not in old]
    assert len(flat) == 22  # every flat module of the old layout but cli, config, errors
    rooms = [old for old in rrhf_fast.MOVED_MODULES if old.startswith("training.")]
    assert len(rooms) == 23  # every module that left training/ for its room
    assert all(rrhf_fast.MOVED_MODULES[f"training.{old}"] == rrhf_fast.MOVED_MODULES[old] for old in flat
               if f"training.{old}" in rrhf_fast.MOVED_MODULES)  # fmt: skip
    check_old_paths(sorted(rrhf_fast.MOVED_MODULES))


def test_no_module_of_ours_imports_an_old_path():
    """The old paths are for users' code: ours imports the new ones, so no warning comes from it."""
    code = "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
    code += (
        "import rrhf_fast.cli, rrhf_fast.training.train, rrhf_fast.planning.plan, rrhf_fast.pipelines.iterate"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def test_from_training_import_a_moved_module_warns_and_gives_the_new_one():
    """`from rrhf_fast.training import plan` (a submodule by attribute), as users' code and other
    branches write it, reaches the moved module through the same finder."""
    code = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(compile("from rrhf_fast.training import plan, train", "<user>", "exec"), scope := {})
import rrhf_fast.planning.plan, rrhf_fast.training.train
same = [scope["plan"] is rrhf_fast.planning.plan, scope["train"] is rrhf_fast.training.train]
warned = [(str(w.message), w.filename) for w in caught if w.category is DeprecationWarning]
print(json.dumps([same, warned]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    same, warned = json.loads(out.stdout.splitlines()[-1])
    assert same == [True, True]
    assert [w for w in warned if "moved" in w[0]] == [
        ["rrhf_fast.training.plan moved to rrhf_fast.planning.plan; import it from there "
         "(rrhf_fast.training.plan goes in the next release)", "<user>"]
    ]  # fmt: skip
