"""Issue 13's hardening: bad weights as --model, a python scorer of the wrong signature, flags that
train nothing, a run whose weights overflow: each one sentence with exit code 2 (through the CLI),
never a traceback, and never "done" on weights that hold NaN or inf."""

import os
import shutil

import pytest
import torch
from training_runs import write_data

from rrhf_fast.checkpointing.checkpoint import complete_checkpoints
from rrhf_fast.cli import main
from rrhf_fast.pipelines.demo import save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "score")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_sentence(code, err, command="train"):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"rrhf-fast {command}: error: ")
    return err


def train_argv(model, data, out, *more):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--device", "cpu",
            "--optim", "adamw", "--max-steps", "2", "--log-every", "0", "--no-plot", *more]  # fmt: skip


class _Payload:
    def __reduce__(self):
        return (open, (os.environ["RRHF_FAST_TEST_MARKER"], "w"))


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _header_cut(path):
    path.write_bytes(path.read_bytes()[:100])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32
    path.write_bytes(bytes(data))


def _pickle_bin(path):
    path.unlink()
    torch.save({"model.embed_tokens.weight": _Payload()}, path.with_name("pytorch_model.bin"))


@pytest.mark.parametrize(
    "damage, words",
    [(_empty, "corrupt, truncated or empty"), (_truncated, "corrupt, truncated or empty"),
     (_header_cut, "corrupt, truncated or empty"), (_garbage_header, "corrupt, truncated or empty"),
     (_pickle_bin, "refused without running it")],
    ids=["empty", "truncated", "header-cut", "garbage-header", "malicious-bin"],
)  # fmt: skip
def test_unreadable_model_weights_are_one_sentence(tmp_path, model_dir, capsys, monkeypatch, damage, words):
    monkeypatch.setenv("RRHF_FAST_TEST_MARKER", str(tmp_path / "pwned"))
    model = shutil.copytree(model_dir, tmp_path / "model")
    damage(model / "model.safetensors")
    data = write_data(tmp_path / "d.jsonl", 4)
    code, err = run(capsys, *train_argv(model, data, tmp_path / "out"))
    assert words in one_sentence(code, err) and f"--model {model}" in err
    assert not (tmp_path / "pwned").exists()


def test_a_python_scorer_of_the_wrong_signature_is_one_sentence(tmp_path, capsys):
    module = tmp_path / "bad_scorer.py"
    module.write_text("def score(response):\n    return 1.0\n")
    argv = ["score", "--in", os.path.join(FIXTURES, "unscored.jsonl"), "--out", str(tmp_path / "o.jsonl"),
            "--scorer", f"python:{module}:score"]  # fmt: skip
    code, err = run(capsys, *argv)
    assert "score(response) cannot be called as score(query, response)" in one_sentence(code, err, "score")


@pytest.mark.parametrize(
    "flags, words",
    [(["--lr", "0"], "--lr 0 leaves the weights as they are"),
     (["--length-penalty", "-1"], "--length-penalty must be 0 or more")],
    ids=["lr-0", "negative-length-penalty"],
)  # fmt: skip
def test_flags_that_train_nothing_are_refused(tmp_path, model_dir, capsys, flags, words):
    data = write_data(tmp_path / "d.jsonl", 4)
    code, err = run(capsys, *train_argv(model_dir, data, tmp_path / "out", *flags))
    assert words in one_sentence(code, err)
    assert not (tmp_path / "out").exists()


def test_warmup_beyond_the_run_is_a_note(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 4)
    assert main(train_argv(model_dir, data, tmp_path / "out", "--warmup-steps", "10")) == 0
    assert "--warmup-steps 10 is beyond the run's 2 steps" in capsys.readouterr().out


def test_a_run_whose_weights_overflow_fails_and_saves_nothing_complete(tmp_path, model_dir, capsys):
    """--lr 1e30: the first steps are finite and blow the weights up; the next ones are skipped
    (non-finite loss), fewer than --max-bad-steps, so the loop reaches its last step."""
    data = write_data(tmp_path / "d.jsonl", 8)
    out = tmp_path / "out"
    code, err = run(capsys, *train_argv(model_dir, data, out, "--lr", "1e30", "--max-steps", "4",
                                        "--warmup-steps", "0", "--max-grad-norm", "0"))  # fmt: skip
    err = one_sentence(code, err)
    assert "stopped being finite at step 2 (steps 2-4 skipped, 3 in a row)" in err
    assert "no checkpoint was saved before it" in err
    assert complete_checkpoints(out) == []
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())


def test_weights_holding_nan_are_never_saved():
    from rrhf_fast.checkpointing.checkpoint import NonFiniteWeights, check_finite_weights
    from rrhf_fast.models.tiny import build_tiny_model

    model = build_tiny_model("llama", seed=0)
    check_finite_weights(model, 3, torch.device("cpu"), None)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeights, match=r"NaN or inf after step 3 \(1 tensor\(s\), e.g. lm_head"):
        check_finite_weights(model, 3, torch.device("cpu"), None)


def test_the_final_line_reports_skipped_steps(tmp_path, model_dir, capsys, monkeypatch):
    import rrhf_fast.training.train as train_module

    real, calls = train_module.forward_backward, {"n": 0}

    def first_step_nan(*args, **kwargs):  # step 1's loss is not finite: skipped, weights kept
        calls["n"] += 1
        metrics = real(*args, **kwargs)
        if calls["n"] == 1:
            metrics.terms[0] = float("nan")  # the loss
        return metrics

    monkeypatch.setattr(train_module, "forward_backward", first_step_nan)
    data = write_data(tmp_path / "d.jsonl", 4)
    assert main(train_argv(model_dir, data, tmp_path / "out")) == 0
    assert "done: step 2, model in" in (out := capsys.readouterr().out)
    assert "1 of 2 steps skipped (non-finite loss or gradient norm)" in out


def test_a_run_that_diverges_right_after_its_resume_says_the_checkpoint_was_finite(
    tmp_path, model_dir, capsys
):
    """--lr 1e30: step 1 is finite and leaves weights near 1e30, saved (finite) as checkpoint-1; the
    resumed run's first loss is not finite. The checkpoint passed the load checks (finite weights
    and optimizer state), so the sentence says so: it is the run that diverged, not a damaged file
    (which would have been refused at load, never reported as "lower --lr")."""
    data = write_data(tmp_path / "d.jsonl", 8)
    out = tmp_path / "out"
    flags = ("--lr", "1e30", "--warmup-steps", "0", "--max-grad-norm", "0", "--max-bad-steps", "1")
    assert main(train_argv(model_dir, data, out, *flags, "--max-steps", "1")) == 0
    capsys.readouterr()
    code, err = run(capsys, *train_argv(model_dir, data, out, *flags, "--max-steps", "3", "--resume"))
    err = one_sentence(code, err)
    assert "stopped being finite at step 2" in err
    assert "checkpoint-1.diverged" not in err and "checkpoint-1 (saved after it) renamed *.diverged" in err
    assert (
        "the checkpoint this run resumed from: its weights and optimizer state were finite when loaded" in err
    )


@pytest.mark.parametrize(
    "flags, note",
    [(["--loss", "pro", "--dpo-beta", "0.2"],
      "note: --loss pro does not read --dpo-beta; they have no effect"),
     (["--simpo-beta", "3", "--pairs", "best", "--no-pro-temperature"],
      "note: --loss rrhf does not read --simpo-beta, --pairs; they have no effect")],
    ids=["pro-dpo-beta", "rrhf-simpo"],
)  # fmt: skip
def test_flags_of_another_loss_get_a_note(tmp_path, model_dir, capsys, flags, note):
    data = write_data(tmp_path / "d.jsonl", 4)
    assert main(train_argv(model_dir, data, tmp_path / "out", *flags)) == 0
    assert note in capsys.readouterr().out


def test_every_loss_flag_names_the_losses_that_read_it():
    """The flag -> loss mapping lives beside each flag (its field's `losses`): every flag whose help
    is for one loss ("--loss X: ...") carries it, and names the losses its help names."""
    import dataclasses

    from rrhf_fast.config import LOSSES, TrainConfig

    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        if help_text.startswith("--loss "):
            named = help_text.removeprefix("--loss ").split(":")[0].split(" with ")[0]
            assert set(f.metadata.get("losses", ())) == {n.strip() for n in named.split("/")}, f.name
        assert set(f.metadata.get("losses", ())) <= set(LOSSES), f.name
    config = TrainConfig(model="m", data="d", output_dir="o", loss="lipo", simpo_beta=3.0, lipo_beta=0.1)
    assert config.unread_loss_flags() == ["--simpo-beta"]
