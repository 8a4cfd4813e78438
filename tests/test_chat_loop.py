"""sample, score, iterate and train speak chat alike: conversational prompts (a system message
included) and TRL's prompt-only `{"prompt": ...}` go through sample -> score -> train -> sample
again, end to end through the CLI, with a ChatML tokenizer built locally; the prompt sampling feeds
the model is the prompt training packs, token for token."""

import json
import warnings

import pytest

from rrhf_fast.cli import main
from rrhf_fast.data.packing import tokenize_prompt
from rrhf_fast.models.loading import quiet_progress_bars
from rrhf_fast.models.tiny import build_bpe_tokenizer, build_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)

SYSTEM = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "sort 31:"}]
PROMPTS = [
    {"query": SYSTEM},  # a conversation with a system message
    {"prompt": [{"role": "user", "content": "sort 21:"}]},  # TRL's conversational prompt-only
    {"prompt": "sort 12:"},  # TRL's standard prompt-only
]


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml") / "model"
    tok = build_bpe_tokenizer(chatml=True)
    model = build_tiny_model("llama", seed=0, vocab_size=len(tok), hidden_size=32, num_layers=1)
    with quiet_progress_bars():
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sample(model, prompts, out):
    return main(["sample", "--model", str(model), "--prompts", str(prompts), "-k", "2", "--strategy",
                 "sample", "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"])  # fmt: skip


def test_sample_score_train_sample_again_with_conversations(chatml_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    (tmp_path / "length.py").write_text("def length(query, response):\n    return float(len(response))\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _sample(chatml_model, prompts, tmp_path / "sampled.jsonl") == 0
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # transformers' FutureWarning
    sampled = [json.loads(line) for line in (tmp_path / "sampled.jsonl").read_text().splitlines()]
    assert [r["query"] for r in sampled] == [SYSTEM, PROMPTS[1]["prompt"], "sort 12:"]
    assert all(len(r["responses"]) == 2 and all(isinstance(x, str) for x in r["responses"]) for r in sampled)

    scorer = f"python:{tmp_path / 'length.py'}:length"
    assert main(["score", "--in", str(tmp_path / "sampled.jsonl"), "--scorer", scorer,
                 "--out", str(tmp_path / "scored.jsonl")]) == 0  # fmt: skip

    # The prompt sampling fed the model (tokenize_prompt) is the one training packs.
    capsys.readouterr()
    assert main(["inspect", "--model", str(chatml_model), "--data", str(tmp_path / "scored.jsonl"),
                 "--format", "json", "--limit", "3"]) == 0  # fmt: skip
    packed = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:3]]
    tok = build_bpe_tokenizer(chatml=True)
    assert [p["prompt_ids"] for p in packed] == [tokenize_prompt(r["query"], tok) for r in sampled]
    assert tok.decode(packed[0]["prompt_ids"]) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nsort 31:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    run = tmp_path / "run"
    assert main(["train", "--model", str(chatml_model), "--data", str(tmp_path / "scored.jsonl"),
                 "--output-dir", str(run), "--max-steps", "1", "--device", "cpu", "--optim", "adamw",
                 "--log-every", "0", "--no-plot"]) == 0  # fmt: skip
    assert _sample(run / "checkpoint-1", prompts, tmp_path / "again.jsonl") == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["query"] for r in again] == [r["query"] for r in sampled]


def test_iterate_takes_conversational_and_prompt_only_prompts(chatml_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    (tmp_path / "length.py").write_text("def length(query, response):\n    return float(len(response))\n")
    out = tmp_path / "loop"
    scorer = f"python:{tmp_path / 'length.py'}:length"
    argv = ["iterate", "--output-dir", str(out), "--prompts", str(prompts), "--eval-prompts", str(prompts)]
    argv += ["--scorer", scorer, "--model", str(chatml_model), "--rounds", "1", "--num-candidates", "2"]
    argv += ["--sample-strategy", "sample", "--sample-max-new-tokens", "4", "--max-steps", "1"]
    argv += ["--device", "cpu", "--optim", "adamw", "--log-every", "0", "--no-plot"]
    assert main(argv) == 0
    scored = [json.loads(line) for line in (out / "round-001" / "scored.jsonl").read_text().splitlines()]
    assert [r["query"] for r in scored] == [SYSTEM, PROMPTS[1]["prompt"], "sort 12:"]
    evaluated = [json.loads(line) for line in (out / "round-001" / "eval.jsonl").read_text().splitlines()]
    assert evaluated[0]["query"] == SYSTEM
