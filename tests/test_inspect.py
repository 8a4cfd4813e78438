"""`rrhf-fast inspect` (text and JSON), the packing summary that it, `train` and run.json give, and
the refusal of a record longer than the model's positions."""

import json

import pytest

from rrhf_fast.cli import main
from rrhf_fast.data.packing import packing_summary
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.data.tokenize import TokenizedExample, tokenize_example
from rrhf_fast.models.tiny import build_tokenizer, save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Hi\n", "chosen": "yes", "rejected": "no"},
        {"prompt": "Q", "chosen": "a", "rejected": "bc"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_packing_summary_by_hand():
    items = [
        TokenizedExample([1, 2, 3], [[4, 5], [6]], [1.0, 0.0]),
        TokenizedExample([7], [[8, 9, 10]], [1.0]),
    ]
    assert packing_summary(items) == {
        "queries": 2, "responses": 3, "tokens_packed": 10,
        "tokens_unshared": (3 + 2) + (3 + 1) + (1 + 3),  # each response with its own prompt: 13
        "tokens_padded": 2 * (3 + 2) + 1 * (1 + 3),  # k copies of prompt + the query's longest: 14
        "packed_over_unshared": round(10 / 13, 4), "packed_over_padded": round(10 / 14, 4),
    }  # fmt: skip


def test_inspect_json_gives_the_training_tokens(data, model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir), "--data", str(data), "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = build_tokenizer()
    for line, record, n in zip(lines, [("Hi\n", ["yes", "no"]), ("Q", ["a", "bc"])], (1, 2), strict=False):
        t = tokenize_example(Example(record[0], record[1], [1.0, 0.0]), tok)
        assert line == {"source": f"{data}:{n}", "prompt_ids": t.prompt_ids, "response_ids": t.response_ids,
                        "scores": [1.0, 0.0]}  # fmt: skip
    assert lines[-1]["packing"]["queries"] == 2 and lines[-1]["formats"] == {"pair": 2}


def test_inspect_text_marks_token_boundaries(data, model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir), "--data", str(data), "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{data}:1: 2 response(s)"
    assert out[1] == "  prompt (4 tokens): <s>|H|i|\\n"
    assert out[2] == "  response 0 (4 tokens, score 1): y|e|s|</s>"
    assert out[-2] == "records: 2 pair"
    assert out[-1].startswith("packing: 2 queries, 4 responses; 18 tokens packed, 24 if each response")


def test_train_prints_and_records_the_packing_summary(data, model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run),
                 "--device", "cpu", "--max-steps", "1", "--no-plot", "--optim", "adamw"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "run.json").read_text())["packing"]
    assert summary["tokens_packed"] == 18 and summary["tokens_unshared"] == 24
    assert "packing: 2 queries, 4 responses; 18 tokens packed" in capsys.readouterr().out


def test_a_record_beyond_the_models_positions_is_refused(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "short", seed=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    write_examples(
        tmp_path / "d.jsonl", [Example("short", ["ok"], [1.0]), Example("q" * 12, ["r" * 6], [1.0])]
    )
    code = main(["train", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--output-dir",
                 str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    where = tmp_path / "d.jsonl"
    assert (
        f"{where}:2: the prompt and its longest response take 20 positions, over the model's max_position"
        in err
    )
