"""checkpointing.rundir: one run per output directory (an flock the OS drops when the holder dies), the
directory checked before the model loads, and nothing left behind by a run that failed at once."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from training_runs import config, metrics, on_two_gloo_ranks, write_data

import rrhf_fast.training.train as train_module
from rrhf_fast.checkpointing.checkpoint import complete_checkpoints, verify_checkpoint
from rrhf_fast.checkpointing.rundir import LOCK_FILE, claim_output_dir
from rrhf_fast.cli import main
from rrhf_fast.parallel.distributed import Dist
from rrhf_fast.pipelines.demo import save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


def train_argv(model_dir, data, out, *more):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--device", "cpu", "--optim", "adamw", "--max-steps", "2", "--log-every", "0", "--no-plot",
            *more]  # fmt: skip


def one_sentence(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("rrhf-fast train: error: "), err
    return err


def test_a_second_run_is_refused_naming_the_holder_and_deletes_nothing(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 4)
    out = tmp_path / "run"
    holder = claim_output_dir(out, resume=False, dist=Dist())  # another open file: flock refuses it too
    in_progress = out / ".tmp-checkpoint-3-abcd"  # the holder's save being written
    in_progress.mkdir()
    try:
        err = one_sentence(capsys, main(train_argv(model_dir, data, out)))
        assert f"in use by another rrhf-fast run (pid {os.getpid()})" in err
        assert in_progress.is_dir() and not (out / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert main(train_argv(model_dir, data, out)) == 0  # released: the next run takes it
    assert (out / LOCK_FILE).is_file() and [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]


HOLDER = textwrap.dedent("""
import pathlib, sys, time
import rrhf_fast.training.train as t
from rrhf_fast.cli import main
real, (ready, go) = t.save_checkpoint, map(pathlib.Path, sys.argv[1:3])

def save(*args, **kwargs):  # hold the directory at the first save until the test says go
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)

t.save_checkpoint = save
sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
def test_two_processes_on_one_output_dir(tmp_path, model_dir, capsys):
    """A real second process: refused while the first one saves; the first ends with complete
    checkpoints and its own metrics only."""
    data = write_data(tmp_path / "d.jsonl", 4)
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    argv = train_argv(model_dir, data, out, "--max-steps", "3", "--save-every", "1", "--keep-checkpoints=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(go), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        err = one_sentence(capsys, main(train_argv(model_dir, data, out)))
        assert f"(pid {first.pid})" in err
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    done = complete_checkpoints(out)
    assert [p.name for p in done] == ["checkpoint-2", "checkpoint-3"]
    for path in done:
        verify_checkpoint(path)
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]


def test_output_dir_problems_are_found_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", 4)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(train_module, "load_tokenizer", lambda *a: pytest.fail("loaded before the check"))
    cases = [(tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "is under"),
             ("/proc/rrhf-fast-test", "cannot create it")]  # fmt: skip
    if os.geteuid() != 0:  # root writes into a read-only directory
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append((tmp_path / "ro", "cannot write into it"))
    for out, words in cases:
        err = one_sentence(capsys, main(train_argv(model_dir, data, out)))
        assert f"--output-dir {out}" in err and words in err, err


def test_a_run_refused_by_a_data_check_leaves_no_directory(tmp_path, model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "responses": ["a", "b"]}\n')
    out = tmp_path / "new" / "run"
    one_sentence(capsys, main(train_argv(model_dir, data, out)))
    assert not (tmp_path / "new").exists()


def test_the_lock_is_released_when_train_returns(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    train_module.train(cfg)
    claim_output_dir(cfg.output_dir, resume=True, dist=Dist()).release()


def _claim_with_a_failing_rank0(rank: int, out: str) -> str:
    """One of two gloo ranks: rank 0's cleanup fails with an unexpected error (not a UserError)."""
    import rrhf_fast.checkpointing.rundir as rundir

    def broken(path):
        raise PermissionError(13, "Permission denied", str(path))

    rundir.remove_partial_saves = broken
    try:
        rundir.claim_output_dir(out, resume=False, dist=Dist(rank=rank, world=2))
        return "returned"
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def test_every_rank_exits_when_rank0_fails_unexpectedly_while_claiming(tmp_path):
    """An error other than a UserError on rank 0 still reaches the broadcast the other ranks wait at:
    rank 0 re-raises it, rank 1 exits with one sentence naming it, and neither hangs."""
    results = on_two_gloo_ranks(_claim_with_a_failing_rank0, tmp_path, str(tmp_path / "out"))
    assert results[0].startswith("PermissionError: [Errno 13] Permission denied"), results
    sentence = f"UserError: --output-dir {tmp_path / 'out'}: rank 0 failed while claiming it "
    assert results[1].startswith(sentence + "(PermissionError: "), results
    assert not (tmp_path / "out").exists()  # the directory rank 0 created is removed again
