"""No run that trains nothing, divergence that names the right checkpoint, and messages that say what
is wrong: each test fails on the code before these rules (see the fault table in
test_command_faults.py for the one-sentence rule itself)."""

import json

import pytest
from training_runs import write_data

from rrhf_fast.checkpointing.checkpoint import complete_checkpoints
from rrhf_fast.checkpointing.resume import choose_schedule
from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import load_examples, load_examples_with_stats
from rrhf_fast.errors import DataError
from rrhf_fast.models.tiny import save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _train(model, data, out, *more):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--device", "cpu",
            "--optim", "adamw", "--log-every", "0", "--no-plot", "--warmup-steps", "0", *more]  # fmt: skip


def _one_sentence(capsys, code, command="train"):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"rrhf-fast {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# -------------------------------------------------------------------------------------------------
# runs that would train nothing


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([{"query": f"q{i}", "responses": ["a"], "scores": [1.0]} for i in range(3)], id="k1"),
        pytest.param([{"query": f"q{i}", "responses": ["a", "b"], "scores": [0.5, 0.5]} for i in range(3)],
                     id="all-tied"),
    ],
)  # fmt: skip
def test_dpo_on_data_without_a_pair_is_refused_before_the_model_loads(
    tmp_path, model_dir, capsys, monkeypatch, records
):
    import rrhf_fast.objectives.base as base

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(base, "load_model", no_load)
    rows = [{**r, "ref_logps": [-1.0] * len(r["responses"])} for r in records]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    err = _one_sentence(capsys, main(_train(model_dir, data, tmp_path / "out", "--loss", "dpo")))
    assert "no query has two responses with different scores, so --loss dpo has no pair" in err
    assert not (tmp_path / "out").exists()


def test_rrhf_without_a_pair_says_once_that_it_trains_sft_only(tmp_path, model_dir, capsys, caplog):
    data = _jsonl(
        tmp_path / "d.jsonl", [{"query": f"q{i}", "responses": ["a"], "scores": [1.0]} for i in range(3)]
    )
    assert main(_train(model_dir, data, tmp_path / "out", "--max-steps", "1")) == 0
    notes = [r.getMessage() for r in caplog.records if "trains the SFT term only" in r.getMessage()]
    assert len(notes) == 1 and str(data) in notes[0]
    capsys.readouterr()
    code = main(_train(model_dir, data, tmp_path / "out2", "--max-steps", "1", "--sft-weight", "0"))
    assert "with --sft-weight 0 the run would train nothing" in _one_sentence(capsys, code)


# -------------------------------------------------------------------------------------------------
# divergence


def test_divergence_names_the_checkpoint_before_it_and_that_one_resumes(tmp_path, model_dir, capsys):
    """Steps 1-2 train; --lr 1e30 makes step 3 finite but overflowing, steps 4-5 non-finite: no
    checkpoint is written during them, checkpoint-3 (holding the broken weights) is set aside, and
    the message names step 4 and checkpoint-2, from which a sane --lr finishes the run."""
    data, out = write_data(tmp_path / "d.jsonl", 8), tmp_path / "out"
    steps = ["--queries-per-step", "1", "--save-every", "1"]
    assert main(_train(model_dir, data, out, *steps, "--max-steps", "2")) == 0
    capsys.readouterr()
    code = main(_train(model_dir, data, out, *steps, "--max-steps", "6", "--resume", "--lr", "1e30",
                       "--max-grad-norm", "0", "--max-bad-steps", "2"))  # fmt: skip
    err = _one_sentence(capsys, code)
    assert "stopped being finite at step 4 (steps 4-5 skipped, 2 in a row)" in err
    assert f"--resume from {out / 'checkpoint-2'}, saved before it" in err
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]  # -1 rotated (--keep-checkpoints)
    assert (out / "checkpoint-3.diverged").is_dir() and not (out / "checkpoint-4").exists()
    assert main(_train(model_dir, data, out, *steps, "--max-steps", "6", "--resume", "--lr", "1e-4")) == 0
    assert f"resumed from {out / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and not any(r["skipped"] for r in rows)


def test_the_resume_note_names_only_what_changed():
    old = dict(lr=1e-3, total_steps=6, warmup_steps=1, min_lr=0.0)
    new = {**old, "warmup_steps": 0}
    saved = TrainConfig(model="m", data="d", output_dir="o", max_steps=6, warmup_steps=1)
    config = TrainConfig(model="m", data="d", output_dir="o", max_steps=6, warmup_steps=0)
    _, note = choose_schedule(new, {"schedule": old, "step": 2}, saved, config)
    assert "changes: warmup steps 0 instead of 1;" in note and "6 instead of 6" not in note


# -------------------------------------------------------------------------------------------------
# messages


def test_a_csv_row_missing_rejected_names_rejected(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq,a,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.csv:row 2: field 'rejected': missing"):
        load_examples(path)


def test_reading_columnar_data_draws_no_progress_bars(tmp_path, capfd):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\n", encoding="utf-8")
    assert len(load_examples(path)) == 1
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.err + captured.out


def test_a_shard_folder_skips_notes_and_refuses_a_second_format(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    _jsonl(folder / "train-0.jsonl", [{"query": "q", "responses": ["a"], "scores": [1]}])
    (folder / "README.md").write_text("# about\n")  # datasets' metadata name: skipped silently
    (folder / "notes.txt").write_text("hello\n")  # not a data suffix: skipped, and said
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_text("not json\n")  # hidden: skipped
    with caplog.at_level("INFO", logger="rrhf_fast.data.formats"):
        assert len(load_examples_with_stats(folder).examples) == 1
    assert "skipped 1 other file(s): notes.txt" in caplog.text
    (folder / "meta.json").write_text('{"note": 1}\n')
    with pytest.raises(
        DataError, match=r"meta.json: is a .json file among .jsonl shards \(e.g. train-0.jsonl\)"
    ):
        load_examples(folder)


# -------------------------------------------------------------------------------------------------
# positions: what train refuses, ref-logps and inspect refuse


@pytest.mark.parametrize("command", ["ref-logps", "inspect"])
def test_ref_logps_and_inspect_refuse_a_record_beyond_max_position_embeddings(tmp_path, model_dir, capsys,
                                                                               command):  # fmt: skip
    import shutil

    model = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    data = _jsonl(tmp_path / "d.jsonl", [{"query": "q", "responses": ["a"], "scores": [1]},
                                         {"query": "x" * 20, "responses": ["a"], "scores": [1]}])  # fmt: skip
    m, out = str(model), str(tmp_path / "r.jsonl")
    argv = {"ref-logps": ["ref-logps", "--model", m, "--in", str(data), "--out", out, "--device", "cpu"],
            "inspect": ["inspect", "--model", str(model), "--data", str(data)]}[command]  # fmt: skip
    err = _one_sentence(capsys, main(argv), command)
    assert f"{data}:2: the prompt and its longest response take" in err
    assert "max_position_embeddings of 16" in err and not (tmp_path / "r.jsonl").exists()
