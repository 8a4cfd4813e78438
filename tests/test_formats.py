"""rrhf_fast.data.formats and schemas: every file format and record shape, and the
FILE:LINE / FILE:row N of their errors."""

import json
import shutil

import pytest

from rrhf_fast.data.records import Example, load_examples, load_examples_with_stats
from rrhf_fast.errors import DataError

datasets = pytest.importorskip("datasets")

ROWS = [
    {"query": "What is 2+2?", "responses": ["4", "5"], "scores": [1.0, 0.0], "id": 1},
    {"query": "Say hi ✓", "responses": ["hi", "bye", "yo"], "scores": [0.5, -1.0, 2.0], "id": 2},
    {"query": "One", "responses": ["only"], "scores": [3.0], "id": 3},
]
EXPECTED = [Example(r["query"], r["responses"], r["scores"], {"id": r["id"]}) for r in ROWS]


def write(tmp_path, kind):
    """ROWS written as `kind`; the path to load."""
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        (path := tmp_path / "d.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"
        )
    elif kind == "json":
        (path := tmp_path / "d.json").write_text(
            json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8"
        )
    elif kind == "parquet":
        ds.to_parquet(path := tmp_path / "d.parquet")
    elif kind == "csv":  # lists as JSON text in their cells, as pandas / spreadsheets write them
        flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in ROWS]
        datasets.Dataset.from_list(flat).to_csv(path := tmp_path / "d.csv", index=False)
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        (arrow,) = (tmp_path / "saved").glob("*.arrow")
        shutil.copy(arrow, path := tmp_path / "d.arrow")
    elif kind == "shards":
        (path := tmp_path / "shards").mkdir()
        datasets.Dataset.from_list(ROWS[:2]).to_parquet(path / "part-0.parquet")
        datasets.Dataset.from_list(ROWS[2:]).to_parquet(path / "part-1.parquet")
    elif kind == "saved":
        ds.save_to_disk(str(path := tmp_path / "saved"))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow", "shards", "saved"])
def test_every_file_format_gives_the_same_examples(tmp_path, kind):
    stats = load_examples_with_stats(write(tmp_path, kind))
    assert stats.examples == EXPECTED
    assert all(isinstance(s, float) for ex in stats.examples for s in ex.scores)
    where = stats.locations()
    if kind in ("jsonl", "json"):
        assert where[0].endswith(f"d.{kind}:" + ("1" if kind == "jsonl" else "2"))
    elif kind == "shards":
        assert where == [f"{tmp_path}/shards/part-0.parquet:row {i}" for i in (1, 2)] + [
            f"{tmp_path}/shards/part-1.parquet:row 1"
        ]
    else:
        assert where[2].endswith(":row 3")


def test_dataset_dict_folder_and_named_shards_take_the_split(tmp_path):
    train = datasets.Dataset.from_list(ROWS[:2])
    test = datasets.Dataset.from_list(ROWS[2:])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == EXPECTED[:2]
    assert load_examples(tmp_path / "dd", split="test") == EXPECTED[2:]
    with pytest.raises(
        DataError, match=r"holds splits \['test', 'train'\], not 'dev'; choose one with --data-split"
    ):
        load_examples(tmp_path / "dd", split="dev")
    (hub := tmp_path / "hub" / "data").mkdir(parents=True)  # the Hub's layout
    train.to_parquet(hub / "train-00000-of-00001.parquet")
    test.to_parquet(hub / "test-00000-of-00001.parquet")
    assert load_examples(tmp_path / "hub") == EXPECTED[:2]
    assert load_examples(tmp_path / "hub", split="test") == EXPECTED[2:]


# ----------------------------------------------------------------------------------------------
# record shapes

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}]
BLUE, GREEN = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Green."}
HH = "\n\nHuman: hi\n\nAssistant:"


@pytest.mark.parametrize(
    "record, query, responses, scores",
    [
        pytest.param({"prompt": "Q: ", "chosen": "yes", "rejected": "no"}, "Q: ", ["yes", "no"], [1.0, 0.0],
                     id="standard"),
        pytest.param({"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8,
                      "score_rejected": 3.5}, "Q", ["a", "b"], [8.0, 3.5], id="standard-with-scores"),
        pytest.param({"chosen": HH + " I can.", "rejected": HH + " I cannot."},
                     HH, [" I can.", " I cannot."], [1.0, 0.0], id="implicit-hh"),
        pytest.param({"chosen": "The sky is blue", "rejected": "The sky is green"}, "The sky is",
                     [" blue", " green"], [1.0, 0.0], id="implicit-no-turns-trl-rule"),
        pytest.param({"prompt": MESSAGES, "chosen": [BLUE], "rejected": [GREEN]},
                     MESSAGES, [[BLUE], [GREEN]], [1.0, 0.0], id="conversational"),
        pytest.param({"chosen": [*MESSAGES, BLUE], "rejected": [*MESSAGES, GREEN]},
                     MESSAGES, [[BLUE], [GREEN]], [1.0, 0.0], id="conversational-implicit"),
        pytest.param({"prompt": MESSAGES, "completions": [BLUE, "Grey."], "scores": [2, 1]}, MESSAGES,
                     [[BLUE], "Grey."], [2.0, 1.0], id="ranked-messages"),
        pytest.param({"prompt": "Q", "completions": ["a", "b", "c"], "scores": [0, 2, 1]}, "Q",
                     ["a", "b", "c"], [0.0, 2.0, 1.0], id="ranked-strings"),
    ],
)  # fmt: skip
def test_record_shapes(tmp_path, record, query, responses, scores):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (ex,) = load_examples(path)
    assert (ex.query, ex.responses, ex.scores) == (query, responses, scores)


def test_standard_pairs_in_parquet_and_csv(tmp_path):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "R", "chosen": "c", "rejected": "d"}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "p.csv", index=False)
    for name in ("p.parquet", "p.csv"):
        assert [(e.query, e.responses, e.scores) for e in load_examples(tmp_path / name)] == [
            ("Q", ["a", "b"], [1.0, 0.0]),
            ("R", ["c", "d"], [1.0, 0.0]),
        ]


# ----------------------------------------------------------------------------------------------
# errors: one sentence, FILE:LINE (or FILE:row N) and the field


def test_columnar_errors_name_the_file_row_and_field(tmp_path):
    rows = [{"query": "q", "responses": ["a", "b"], "scores": [1.0, 2.0]},
            {"query": "q", "responses": ["a", "b"], "scores": [1.0]}]  # fmt: skip
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 2: field 'scores': has 1 scores for 2 responses"):
        load_examples(tmp_path / "bad.parquet")


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n  {"query": "q", "responses": ["a"], "scores": [1]},\n  {"query": 3, "responses": ["a"]}\n]'
    )
    with pytest.raises(DataError, match=r"bad.json:3: field 'query': must be a string"):
        load_examples(path)


def test_a_parquet_file_that_is_not_one_is_a_sentence(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x.parquet: cannot be read as parquet"):
        load_examples(tmp_path / "x.parquet")


def test_lone_surrogate_names_line_and_field(tmp_path):
    """Issue 13 item 4: JSON's "\\ud800" was a TypeError from tokenizers, with no FILE:LINE."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"query": "q", "responses": ["ok"], "scores": [1]}\n'
                    '{"query": "q", "responses": ["a", "b\\ud800c"], "scores": [1, 2]}\n')  # fmt: skip
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(
        f"{path}:2: field 'responses': item 1 holds a lone UTF-16 surrogate (\\ud800"
    )
    assert "\n" not in str(info.value)


def test_unknown_columns_and_bad_messages(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"instruction": "q", "outputs": ["a"]}) + "\n")
    with pytest.raises(
        DataError, match=r"u.jsonl:1: field 'query': missing; present fields are .*--query-field"
    ):
        load_examples(path)
    (ex,) = load_examples(path, query_field="instruction", responses_field="outputs", require_scores=False)
    assert (ex.query, ex.responses) == ("q", ["a"])
    path.write_text(json.dumps({"prompt": [{"role": "usr", "content": "q"}], "chosen": "a", "rejected": "b"}))
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'prompt': message 0 has role 'usr'"):
        load_examples(path)
    path.write_text(json.dumps({"chosen": "same", "rejected": "same"}))
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'chosen': has no prompt in common"):
        load_examples(path)
