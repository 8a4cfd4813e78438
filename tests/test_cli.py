"""The `rrhf-fast train` / `plot` command lines: bad input gets one sentence and a non-zero exit."""

import json

import pytest

from rrhf_fast.cli import main
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    write_examples(
        path, [Example(query=f"q{i}", responses=["good", "bad"], scores=[1.0, 0.0]) for i in range(4)]
    )
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_sentence(err):
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("rrhf-fast train: error: "), err
    return err


def test_train_runs_and_plot_redraws(tmp_path, model_dir, data, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--model", str(model_dir), "--data", str(data), "--output-dir",
                          str(out), "--max-steps", "2", "--optim", "adamw", "--log-every", "1")  # fmt: skip
    assert code == 0
    assert "done: step 2" in stdout
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    (out / "curves.png").unlink()
    code, stdout, _ = run(capsys, "plot", str(out))
    assert code == 0 and (out / "curves.png").exists()


# {m}, {d} and {t}: the model directory, the data file and tmp_path of each test.
BAD = [
    pytest.param("--model {t}/nope --data {d}", "no such directory", id="missing-model"),
    pytest.param("--model {m} --data {t}/absent.jsonl", "absent.jsonl: no such file", id="missing-data"),
    pytest.param("--model {m} --data {t}/broken.jsonl", "broken.jsonl:2: field 'scores'", id="data-error"),
    pytest.param("--model {m} --data {d} --queries-per-step 4 --grad-accum 2", "give one of them",
                 id="qps-with-grad-accum"),
    pytest.param("--model {m} --data {d} --eval-every 3", "needs --eval-data", id="eval-every-no-data"),
    pytest.param("--model {m} --data {d} --lora-r 8 --lora-target-modules lm_head", "would miss its adapter",
                 id="lora-on-lm-head"),
    pytest.param("--model {m} --data {d} --micro-batch-tokens 5", "over the micro-batch budget",
                 id="query-over-budget"),
    pytest.param("--model {m} --data {d} --device cuda:7", "--device", id="no-such-device"),
    pytest.param("--model {m} --data {d} --attn flex", "--attn flex needs a CUDA GPU", id="flex-on-cpu"),
]  # fmt: skip


def _broken(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"query": "q", "responses": ["a"], "scores": [1]}\n{"query": "q", "responses": ["a"]}\n')
    return path


@pytest.mark.parametrize("flags, words", BAD)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, model_dir, data, capsys, flags, words):
    _broken(tmp_path)
    flags = flags.format(m=model_dir, d=data, t=tmp_path).split()
    argv = ["train", *flags, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert words in one_sentence(err)


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "m", "--data", "d", "--output-dir", "o", "--optim", "sgd"])
    assert info.value.code == 2
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_plot_of_a_missing_run_is_one_sentence(tmp_path, capsys):
    code, _, err = run(capsys, "plot", str(tmp_path / "nope"))
    assert code == 2 and "metrics.jsonl: no such file" in err and "Traceback" not in err


def test_train_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--micro-batch-tokens", "--queries-per-step", "--optim", "--resume", "--max-bad-steps"):
        assert flag in text
