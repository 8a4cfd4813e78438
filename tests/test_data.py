"""rrhf_fast.data.records: the JSONL and dataset readers, their error messages, the writer."""

import json
import logging
from pathlib import Path

import pytest

from rrhf_fast.data.records import Example, load_examples, load_examples_with_stats, write_examples
from rrhf_fast.errors import DataError, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_valid_file_loads_with_meta():
    examples = load_examples(FIXTURES / "valid.jsonl")
    assert [e.query for e in examples] == ["What is 2+2?", "Say hi in French ✓", "One response only"]
    assert examples[0].responses == ["4", "Four.", "5"]
    assert examples[0].scores == [1.0, 0.9, -1.0]
    assert examples[1].scores == [0.5, 2.0] and all(isinstance(s, float) for s in examples[1].scores)
    assert examples[1].meta == {"sources": ["human", "model"]}
    assert examples[0].meta == {}


# One fixture per error class: (file, line, field or None, words the message must carry).
ERRORS = [
    pytest.param("invalid_json.jsonl", 3, None, "invalid JSON", id="invalid-json"),
    pytest.param("non_object.jsonl", 2, None, "expected a JSON object", id="non-object"),
    pytest.param("missing_field.jsonl", 2, "responses", "missing", id="missing-field"),
    pytest.param("wrong_type.jsonl", 4, "query", "must be a string", id="wrong-type-query"),
    pytest.param("responses_not_list.jsonl", 1, "responses", "must be a list", id="wrong-type-responses"),
    pytest.param("length_mismatch.jsonl", 2, "scores", "2 scores for 3 responses", id="length-mismatch"),
    pytest.param("zero_responses.jsonl", 2, "responses", "at least one response", id="zero-responses"),
    pytest.param("empty_response.jsonl", 2, "responses", "item 1 is an empty string", id="empty-response"),
    pytest.param("nan_score.jsonl", 2, "scores", "item 1 is nan", id="nan-score"),
    pytest.param("infinite_score.jsonl", 3, "scores", "item 0 is out of the float", id="infinite-score"),
    pytest.param("string_score.jsonl", 1, "scores", "must be a number", id="string-score"),
    pytest.param("bool_score.jsonl", 2, "scores", "must be a number, got a boolean", id="bool-score"),
    pytest.param("invalid_utf8.jsonl", 2, "responses", "invalid UTF-8 (byte 0xe9", id="invalid-utf8"),
    pytest.param("missing_scores.jsonl", 2, "scores", "rrhf-fast score", id="missing-scores"),
]


@pytest.mark.parametrize("name, line, field, words", ERRORS)
def test_malformed_input_names_file_line_and_field(name, line, field, words):
    with pytest.raises(DataError) as info:
        load_examples(FIXTURES / name)
    err, message = info.value, str(info.value)
    assert isinstance(err, UserError)
    assert f"{name}:{line}:" in message
    assert (err.line, err.field) == (line, field)
    if field is not None:
        assert f"field {field!r}" in message
    assert words in message


def test_blank_lines_are_skipped_counted_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="rrhf_fast.data.records"):
        stats = load_examples_with_stats(FIXTURES / "blank_lines.jsonl")
    assert len(stats.examples) == 3
    assert stats.blank_lines == [2, 4, 5, 7] and stats.num_blank == 4
    assert "skipped 4 blank line(s): 2, 4, 5, 7" in caplog.text
    assert load_examples(FIXTURES / "blank_lines.jsonl") == stats.examples


def test_unscored_examples_load_only_when_allowed():
    with pytest.raises(DataError, match=r"unscored.jsonl:1: field 'scores': empty; score"):
        load_examples(FIXTURES / "unscored.jsonl")
    examples = load_examples(FIXTURES / "unscored.jsonl", require_scores=False)
    assert [e.scores for e in examples] == [[], []]
    # Scores that are present are still validated.
    with pytest.raises(DataError, match="2 scores for 3 responses"):
        load_examples(FIXTURES / "length_mismatch.jsonl", require_scores=False)


def test_other_column_names(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"prompt": "q", "candidates": ["a", "b"], "reward": [1, 2], "id": 7}) + "\n")
    (ex,) = load_examples(path, query_field="prompt", responses_field="candidates", scores_field="reward")
    assert ex == Example("q", ["a", "b"], [1.0, 2.0], {"id": 7})
    with pytest.raises(DataError, match=r"renamed.jsonl:1: field 'query': missing"):
        load_examples(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    line = json.dumps({"query": "q", "responses": ["a"], "scores": [1.0]})
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n" + line.encode() + b"\r\n")
    assert len(load_examples(path)) == 2


def test_write_then_load_round_trips(tmp_path):
    examples = load_examples(FIXTURES / "valid.jsonl") + [Example("unscored ✓", ["r"], [])]
    out = tmp_path / "sub" / "out.jsonl"
    write_examples(out, examples)
    assert load_examples(out, require_scores=False) == examples
    assert out.read_text(encoding="utf-8").count("\n") == len(examples)
    assert "✓" in out.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_write_is_atomic_on_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    write_examples(out, [Example("q", ["a"], [1.0])])
    with pytest.raises(ValueError):
        write_examples(out, [Example("q", ["a"], [1.0]), Example("q", ["a"], [float("nan")])])
    assert load_examples(out) == [Example("q", ["a"], [1.0])]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_hf_dataset_object_and_saved_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    expected = load_examples(FIXTURES / "valid.jsonl")
    rows = [{"query": e.query, "responses": e.responses, "scores": e.scores} for e in expected]
    ds = datasets.Dataset.from_list(rows)
    assert load_examples(ds) == [Example(e.query, e.responses, e.scores) for e in expected]
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_examples(tmp_path / "ds") == load_examples(ds)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == load_examples(ds)


def test_hf_dataset_errors_name_the_row_and_field():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [
            {"query": "q", "responses": ["a", "b"], "scores": [1.0, 2.0]},
            {"query": "q", "responses": ["a", "b"], "scores": [1.0]},
        ]
    )
    with pytest.raises(DataError, match=r"<datasets.Dataset>:row 2: field 'scores': has 1 scores for 2"):
        load_examples(ds)
