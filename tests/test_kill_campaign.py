"""kill -9 at chosen points of a save and of a rotation, then --resume: no orphaned directory is
left, and the final weights are bitwise those of the uninterrupted run.

Each case runs `rrhf-fast train` in a child process that SIGKILLs itself at the n-th call of one
function (before or after it runs); a real kill, so no `finally` or `except` of ours runs. The run
saves at steps 2, 4 and 6 and keeps one checkpoint, so the saves of steps 4 and 6 each rotate the
one before out. About 10 s per case on a 2-core CPU: marked slow.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file
from training_runs import write_data

from rrhf_fast.checkpointing.checkpoint import verify_checkpoint
from rrhf_fast.cli import main
from rrhf_fast.pipelines.demo import save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)

CHILD = textwrap.dedent("""
    import importlib, json, os, shutil, signal, sys
    from rrhf_fast.cli import main
    point = json.loads(os.environ["KILL_POINT"])
    owner = importlib.import_module(point["module"])
    real, calls = getattr(owner, point["attr"]), [0]

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        if point["match"] is None or any(point["match"] in str(a) for a in args):
            calls[0] += 1
            if point["when"] == "during" and os.path.isdir(args[0]):
                return rmtree_killed_at(args[0])
        if calls[0] == point["n"] and point["when"] == "before":
            kill()
        out = real(*args, **kwargs)
        if calls[0] == point["n"] and point["when"] == "after":
            kill()
        return out

    deleted = [0]

    def rmtree_killed_at(path):  # rmtree, one file at a time, killed before the n-th file
        for top, dirs, files in os.walk(path, topdown=False):
            for name in files:
                deleted[0] += 1
                if deleted[0] == point["n"]:
                    kill()
                os.unlink(os.path.join(top, name))
            for name in dirs:
                os.rmdir(os.path.join(top, name))
        os.rmdir(path)

    setattr(owner, point["attr"], wrapper)
    sys.exit(main(sys.argv[1:]))
""")

CKPT = "rrhf_fast.checkpointing.checkpoint"
POINTS = {  # name: (module, function, n-th call, before/after it, only calls with this in an argument)
    "save-tmp-dir-made": (CKPT, "_make_tmp_dir", 2, "after", None),
    "save-mid-optimizer": ("torch", "save", 3, "before", None),  # step 4's optimizer.pt
    "save-before-marker": (CKPT, "_write_marker", 2, "before", None),
    "save-mid-hashing": ("rrhf_fast.integrity", "file_digest", 16, "before", None),  # step 4's
    "save-marker-not-renamed": (CKPT, "_fsync_dirs", 2, "after", None),
    "save-renamed-not-rotated": (CKPT, "_replace_dir", 2, "after", None),
    "rotation-renamed-aside": ("shutil", "rmtree", 2, "before", ".deleting-"),  # 1st: the pre-clean
    # "during": the n-th file the rotations delete (one checkpoint: 11 files, COMPLETE.json among them)
    "rotation-first-file": ("shutil", "rmtree", 1, "during", ".deleting-"),
    "rotation-4th-file": ("shutil", "rmtree", 4, "during", ".deleting-"),
    "rotation-8th-file": ("shutil", "rmtree", 8, "during", ".deleting-"),
    "second-rotation-mid": ("shutil", "rmtree", 15, "during", ".deleting-"),  # step 6's, of step 4
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    model = save_tiny_model(root / "model", seed=0, hidden_size=32, layers=1)
    data = write_data(root / "d.jsonl", 8)

    def argv(out, *more):
        return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                "--device", "cpu", "--optim", "adamw", "--max-steps", "6", "--queries-per-step", "2",
                "--warmup-steps", "2", "--save-every", "2", "--keep-checkpoints", "1", "--log-every", "0",
                "--no-plot", *more]  # fmt: skip

    assert main(argv(root / "whole")) == 0
    return argv, load_file(root / "whole" / "checkpoint-6" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_then_resume_leaves_no_orphan_and_equal_weights(tmp_path, run, point):
    argv, expected = run
    module, attr, n, when, match = POINTS[point]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "KILL_POINT": json.dumps(dict(module=module, attr=attr, n=n, when=when, match=match))}  # fmt: skip
    child = subprocess.run([sys.executable, "-c", CHILD, *argv(out)], env=env, capture_output=True, text=True,
                           timeout=600, check=False)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    assert main(argv(out, "--resume")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".rrhf-fast.lock", "checkpoint-6", "config.json", "metrics.jsonl", "run.json"], names
    verify_checkpoint(out / "checkpoint-6")
    final = load_file(out / "checkpoint-6" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all((final[k] == expected[k]).all() for k in final)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
