"""generation.sample and generation.beam_search: prompts, candidates, diverse beam search, files."""

import importlib.machinery
import json
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from rrhf_fast import cli
from rrhf_fast.data.packing import tokenize_prompt
from rrhf_fast.data.records import Example, load_examples
from rrhf_fast.errors import DataError, UserError
from rrhf_fast.generation.beam_search import diverse_beam_search, positions
from rrhf_fast.generation.sample import (
    SampleConfig,
    candidates_to_examples,
    cut_at_stop,
    generate_candidates,
    merge_responses,
    read_prompts,
    sample_file,
    vllm_available,
)
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer
from rrhf_fast.models.tokenizer import decode, left_pad

EOS, PAD = 257, 258
QUERIES = ["Hello there", "Hi", "A much longer prompt than the others, to pad the rest", "Q"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def eos_model():
    """A tiny model whose EOS logit tracks a popular token's, so beams finish at varied lengths."""
    m = build_tiny_model("llama", seed=3)
    with torch.no_grad():
        w = m.lm_head.weight
        w[EOS] = 2.0 * w[100] + 0.5 * w[:256].std(0)
    return m


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Prompts files


@pytest.mark.parametrize(
    "name, text",
    [
        pytest.param("p.txt", "Hello there\n\n  indented  \r\nlast", id="text"),
        pytest.param(
            "p.jsonl",
            '{"query": "Hello there"}\n\n{"query": "  indented  ", "id": 3}\n{"query": "last"}\n',
            id="jsonl",
        ),
        pytest.param(
            "prompts",
            '\n{"query": "Hello there"}\n{"query": "  indented  "}\n{"query": "last"}',
            id="sniffed",
        ),
    ],
)
def test_prompts_file_formats(tmp_path, name, text):
    assert read_prompts(write(tmp_path / name, text)) == ["Hello there", "  indented  ", "last"]


def test_txt_prompts_starting_with_a_brace_stay_text(tmp_path):
    assert read_prompts(write(tmp_path / "p.txt", '{"query": "x"}\n')) == ['{"query": "x"}']


@pytest.mark.parametrize(
    "name, content, where, words",
    [
        pytest.param(
            "p.jsonl", '{"query": "a"}\n{"query": \n', "p.jsonl:2", "invalid JSON", id="invalid-json"
        ),
        pytest.param(
            "p.jsonl",
            '{"query": "a"}\n\n{"text": "b"}\n',  # {"prompt": ...} is TRL's prompt-only shape: read
            "p.jsonl:3: field 'query'",
            "missing",
            id="missing-query",
        ),
        pytest.param("p.jsonl", '["a"]\n', "p.jsonl:1", "expected a JSON object", id="non-object"),
        pytest.param(
            "p.jsonl", '{"query": 3}\n', "p.jsonl:1: field 'query'", "a string or a list", id="non-string"
        ),
        pytest.param("p.txt", b"ok\n\xe9t\xe9\n", "p.txt:2", "invalid UTF-8", id="invalid-utf8"),
        pytest.param("p.txt", "\n  \n", "p.txt", "holds no prompts", id="empty"),
    ],
)
def test_bad_prompts_files_name_file_and_line(tmp_path, name, content, where, words):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as info:
        read_prompts(path)
    assert f"{where}" in str(info.value) and words in str(info.value)


# ----------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("strategy, k", [("beam", 4), ("sample", 3), ("mixed", 5)])
def test_k_candidates_per_prompt(model, tok, strategy, k):
    config = SampleConfig(strategy=strategy, max_new_tokens=6, batch_size=3)
    out = generate_candidates(model, tok, QUERIES, k, config)
    assert [len(c) for c in out] == [k] * len(QUERIES)
    assert (
        config.sources(k)
        == {"beam": ["beam"] * 4, "sample": ["sample"] * 3, "mixed": ["beam"] * 2 + ["sample"] * 3}[strategy]
    )


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_batched_left_padded_generation_equals_each_prompt_alone(model, tok, strategy):
    config = SampleConfig(
        strategy=strategy, max_new_tokens=8, batch_size=4, top_k=1
    )  # top_k=1: greedy samples
    batched = generate_candidates(model, tok, QUERIES, 2, config)
    alone = [generate_candidates(model, tok, [q], 2, config)[0] for q in QUERIES]
    assert batched == alone


def test_greedy_is_the_argmax_continuation_of_each_prompt(eos_model, tok):
    config = SampleConfig(strategy="greedy", max_new_tokens=10, batch_size=3)
    got = generate_candidates(eos_model, tok, QUERIES, 1, config)
    for query, (text,) in zip(QUERIES, got, strict=True):
        ids = tokenize_prompt(query, tok)
        new = []
        with torch.no_grad():
            for _ in range(10):  # the plain forward, no cache, no padding
                token = int(eos_model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == EOS:
                    break
                new.append(token)
        assert text == decode(tok, new, {EOS})


def test_greedy_takes_one_candidate_and_names_its_source():
    assert SampleConfig(strategy="greedy").sources(1) == ["greedy"]
    with pytest.raises(UserError, match="one response per prompt"):
        SampleConfig(strategy="greedy").validate(3)


def test_prefixed_flags_skip_fields_and_fill_them_back():
    import argparse

    from rrhf_fast.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, SampleConfig, prefix="sample_", skip=("seed", "chat_template"))
    args = parser.parse_args(["--sample-temperature", "0.5", "--sample-stop", "a", "--sample-stop", "b"])
    assert not hasattr(args, "sample_seed") and not hasattr(args, "temperature")
    with pytest.raises(SystemExit):
        parser.parse_args(["--sample-seed", "1"])
    config = config_from_args(args, SampleConfig, prefix="sample_", seed=7, chat_template=True)
    assert (config.temperature, config.stop, config.seed, config.chat_template) == (0.5, ("a", "b"), 7, True)
    assert config.top_p == SampleConfig().top_p


def test_same_seed_same_samples_other_seed_other_samples(model, tok):
    def run(seed):
        return generate_candidates(
            model, tok, QUERIES, 3, SampleConfig(strategy="sample", seed=seed, max_new_tokens=8)
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_chat_template_prompts_are_the_training_prompts(model, tok):
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.seen = model, []
            self.config, self.generation_config = model.config, model.generation_config

        def forward(self, input_ids, attention_mask, **kw):
            self.seen.append(input_ids[attention_mask.bool()].tolist())
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

    rec = Recorder()
    generate_candidates(rec, tok, ["Hi"], 1, SampleConfig(chat_template=True, max_new_tokens=1))
    assert rec.seen[0] == tokenize_prompt("Hi", tok, chat_template=True)
    assert tok.decode(rec.seen[0]).endswith("<|assistant|>")


# ----------------------------------------------------------------------------------------------
# Diverse beam search


@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_one_group_is_hf_beam_search(eos_model, tok, num_beams):
    prompts = [tok(q)["input_ids"] for q in QUERIES]
    ids, mask = left_pad(prompts, PAD)
    ours = diverse_beam_search(
        eos_model,
        ids,
        mask,
        num_beams=num_beams,
        num_beam_groups=1,
        diversity_penalty=0.0,
        max_new_tokens=10,
        eos_token_ids={EOS},
    )
    lengths = set()
    for p, got in zip(prompts, ours, strict=True):
        single = torch.tensor([p])
        out = eos_model.generate(
            single,
            attention_mask=torch.ones_like(single),
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=PAD,
        )
        want = [r[: r.index(EOS)] if EOS in r else r for r in out[:, len(p) :].tolist()]
        want = [[t for t in r if t != PAD] for r in want]
        assert got == want
        lengths.update(len(r) for r in got)
    assert len(lengths) > 2  # finished hypotheses of several lengths were exercised


class Bigram(torch.nn.Module):
    """Next-token probabilities that depend on the last token only; tokens a=0 b=1 c=2 EOS=3 d=4."""

    TABLE = {0: [0.1, 0.5, 0.3, 0.1], 1: [0.2, 0.1, 0.1, 0.6], 2: [0.4, 0.2, 0.1, 0.3]}

    def __init__(self, table=None):
        super().__init__()
        self.table = table or self.TABLE
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = None  # an empty cache: nothing to store

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None
    ):
        rows = [torch.tensor(self.table[t]).log() for t in input_ids[:, -1].tolist()]
        return SimpleNamespace(logits=torch.stack(rows)[:, None, :])


@pytest.mark.parametrize(
    "groups, penalty, want",
    [
        # Group 0 is greedy: a -> b (0.5), then EOS (0.6) ends "b" with score (ln .5 + ln .6) / 2.
        # Group 1 pays 1.0 for repeating "b": ln .5 - 1 < ln .3, so it takes "c", then EOS -> "c".
        pytest.param(2, 1.0, [[1], [2]], id="two-groups-diverse"),
        pytest.param(2, 0.0, [[1], [1]], id="no-penalty-no-diversity"),
        pytest.param(2, 0.2, [[1], [1]], id="penalty-too-small"),
        # Group 2 pays 1.0 for "b" and for "c" (one earlier group each): b again; the pooled
        # ranking puts its "b" (score (ln .5 - 1 + ln .6) / 2) before group 1's "c" ((ln .3 + ln .3) / 2).
        pytest.param(3, 1.0, [[1], [1], [2]], id="three-groups-pooled-ranking"),
    ],
)
def test_diverse_beam_search_by_hand(groups, penalty, want):
    got = diverse_beam_search(
        Bigram(),
        torch.tensor([[0]]),
        torch.ones(1, 1, dtype=torch.long),
        num_beams=groups,
        num_beam_groups=groups,
        diversity_penalty=penalty,
        max_new_tokens=5,
        eos_token_ids={3},
    )
    assert got == [want]
    assert (math.log(0.5) - 1 + math.log(0.6)) / 2 > (math.log(0.3) + math.log(0.3)) / 2


def test_an_eos_ranked_below_the_top_beams_finishes_nothing():
    # Two beams from d: b (.5), c (.4). Step 2 ranks b-EOS, b-a, c-EOS, c-a: b-EOS (rank 0) finishes
    # "b"; c-EOS (rank 2, below the top 2) must not finish "c", although "c" (score ln .4 + ln .5,
    # / 2 = -0.80) would outrank the "b a a" (-0.90) that wins the second place at the length limit.
    table = {4: [0.05, 0.5, 0.4, 0.05, 0], 0: [0.3, 0.28, 0.22, 0.2, 0], 1: [0.45, 0.03, 0.02, 0.5, 0],
             2: [0.3, 0.1, 0.1, 0.5, 0]}  # fmt: skip
    prompt, mask = torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.long)
    got = diverse_beam_search(Bigram(table), prompt, mask, num_beams=2, num_beam_groups=1,
                              diversity_penalty=0.0, max_new_tokens=3, eos_token_ids={3})  # fmt: skip
    assert got == [[[1], [1, 0, 0]]]


def test_beam_groups_without_penalty_are_all_greedy(model, tok):
    ids, mask = left_pad([tok(q)["input_ids"] for q in QUERIES], PAD)
    beams = diverse_beam_search(
        model,
        ids,
        mask,
        num_beams=3,
        num_beam_groups=3,
        diversity_penalty=0.0,
        max_new_tokens=6,
        eos_token_ids={EOS},
    )
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=PAD)
    for row, g in zip(beams, greedy[:, ids.shape[1] :].tolist(), strict=True):
        assert row == [g] * 3


def test_large_diversity_penalty_gives_distinct_first_tokens(model, tok):
    ids, mask = left_pad([tok(q)["input_ids"] for q in QUERIES], PAD)
    # No EOS id: an EOS is never penalised (only continuing tokens count, as in HF), so a group could
    # end at once with an empty hypothesis and hide the first-token rule tested here.
    beams = diverse_beam_search(
        model,
        ids,
        mask,
        num_beams=4,
        num_beam_groups=4,
        diversity_penalty=1e4,
        max_new_tokens=3,
        eos_token_ids=set(),
    )
    for row in beams:
        assert len({seq[0] for seq in row}) == 4


# ----------------------------------------------------------------------------------------------
# Stop strings, empty candidates


def test_cut_at_stop():
    assert cut_at_stop("Sure, here.\n\nHuman: next", ["Human:"]) == "Sure, here."
    assert cut_at_stop("a STOP b END c", ["END", "STOP"]) == "a"
    assert cut_at_stop("no stop here", ["Human:"]) == "no stop here"
    assert cut_at_stop("Human: x", ["Human:"]) == ""


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_stop_strings_cut_generated_text(model, tok, strategy):
    config = SampleConfig(strategy=strategy, max_new_tokens=12, seed=0)
    plain = generate_candidates(model, tok, QUERIES[:2], 2, config)
    # A printable ASCII character from the middle of some candidate.
    stop = next(
        ch for text in sum(plain, []) for ch in text[1:] if ch.isascii() and ch.isprintable() and ch != " "
    )
    cut = generate_candidates(
        model, tok, QUERIES[:2], 2, SampleConfig(strategy=strategy, max_new_tokens=12, stop=(stop,))
    )
    for before, after in zip(sum(plain, []), sum(cut, []), strict=True):
        assert stop not in after
        assert after == cut_at_stop(before, [stop])


def test_empty_candidates_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        examples = candidates_to_examples(["q"], [["a", "", "b"]], ["beam", "beam", "sample"])
    assert examples[0].responses == ["a", "b"] and examples[0].meta["sources"] == ["beam", "sample"]
    assert "dropped 1 empty candidate" in caplog.text


# ----------------------------------------------------------------------------------------------
# Merging other sources


def test_merge_adds_responses_and_sources(tmp_path):
    examples = [
        Example("q1", ["x"], [], {"sources": ["beam"]}),
        Example("q2", ["y"], [], {"sources": ["beam"]}),
    ]
    gold = write(tmp_path / "gold.jsonl", '{"query": "q2", "responses": ["gold answer"]}\n')
    other = write(
        tmp_path / "other.jsonl",
        '{"query": "q1", "responses": ["o1", "o2"], "scores": [1, 2], "sources": ["gpt", "human"]}\n',
    )
    assert merge_responses(examples, gold) == 1
    assert merge_responses(examples, other) == 2
    assert examples[0].responses == ["x", "o1", "o2"] and examples[0].meta["sources"] == [
        "beam",
        "gpt",
        "human",
    ]
    assert examples[1].responses == ["y", "gold answer"] and examples[1].meta["sources"] == ["beam", "gold"]
    assert all(ex.scores == [] for ex in examples)


def test_merge_with_an_unknown_query_names_file_and_line(tmp_path):
    path = write(
        tmp_path / "m.jsonl", '{"query": "q1", "responses": ["a"]}\n\n{"query": "nope", "responses": ["b"]}\n'
    )
    with pytest.raises(UserError, match=r"m.jsonl:3: query 'nope' is not among the prompts"):
        merge_responses([Example("q1", ["x"], [])], path)


# ----------------------------------------------------------------------------------------------
# Files and the command line


def test_cli_sample_writes_training_format(tmp_path, model_dir):
    prompts = write(tmp_path / "prompts.txt", "Hello there\nHi\n")
    gold = write(tmp_path / "gold.jsonl", '{"query": "Hi", "responses": ["Hello!"]}\n')
    out = tmp_path / "cands.jsonl"
    argv = ["sample", "--model", str(model_dir), "--prompts", str(prompts), "-k", "3", "--out", str(out)]
    argv += [
        "--strategy",
        "mixed",
        "--max-new-tokens",
        "5",
        "--merge",
        str(gold),
        "--device",
        "cpu",
        "--stop",
        "\n",
    ]
    assert cli.main(argv) == 0
    examples = load_examples(out, require_scores=False)
    assert [e.query for e in examples] == ["Hello there", "Hi"]
    assert all(e.scores == [] for e in examples)
    assert examples[1].responses[-1] == "Hello!" and examples[1].meta["sources"][-1] == "gold"
    assert all(len(e.responses) == len(e.meta["sources"]) for e in examples)
    assert all("\n" not in r for e in examples for r in e.responses)
    saved = json.loads((tmp_path / "cands.sample.json").read_text())
    assert saved["settings"]["strategy"] == "mixed" and saved["settings"]["stop"] == ["\n"]


def test_dedup(tmp_path, model_dir):
    prompts = write(tmp_path / "p.txt", "Hi\n")
    gold = write(tmp_path / "gold.jsonl", '{"query": "Hi", "responses": ["same", "same"]}\n')
    examples = sample_file(
        model_dir,
        prompts,
        tmp_path / "o.jsonl",
        1,
        SampleConfig(max_new_tokens=2),
        merge=[gold],
        device="cpu",
        dedup=True,
    )
    assert examples[0].responses.count("same") == 1


@pytest.mark.parametrize(
    "config, k, words",
    [
        pytest.param(SampleConfig(num_beam_groups=3), 4, "must divide", id="groups"),
        pytest.param(SampleConfig(strategy="mixed", beam_candidates=5), 4, "between 0 and", id="mixed"),
        pytest.param(SampleConfig(strategy="nucleus"), 4, "--strategy must be one of", id="strategy"),
        pytest.param(SampleConfig(top_p=0.0), 2, "--top-p", id="top-p"),
        pytest.param(SampleConfig(), 0, "at least 1", id="k"),
    ],
)
def test_bad_sample_configs(config, k, words):
    with pytest.raises(UserError, match=words):
        config.validate(k)


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed")
def test_vllm_backend_missing_is_a_clear_error(tmp_path):
    prompts = write(tmp_path / "p.txt", "Hi\n")
    with pytest.raises(UserError, match="pip install vllm"):
        sample_file(
            "unused", prompts, tmp_path / "o.jsonl", 2, SampleConfig(strategy="sample"), backend="vllm"
        )


class FakeVLLM:
    """The slice of vLLM's interface the backend uses (vllm/entrypoints/llm.py, sampling_params.py,
    outputs.py): `LLM(model=, dtype=, seed=)`, `SamplingParams(n=, temperature=, top_p=, top_k=,
    max_tokens=, stop=, seed=)` (top_k -1: no limit), `LLM.generate(prompts, params)` taking
    TokensPrompt dicts `{"prompt_token_ids": [...]}` and returning one RequestOutput per prompt, in
    order, whose `.outputs` are `n` CompletionOutputs with `.text`. Each completion's text names its
    prompt's token count and its index, then a stop string and more text."""

    def __init__(self):
        self.module = type(sys)("vllm")
        self.module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.module.LLM, self.module.SamplingParams = self._llm(), SimpleNamespace
        self.engines, self.calls = [], []

    def _llm(self):
        fake = self

        class LLM:
            def __init__(self, *, model, dtype="auto", seed=0):
                fake.engines.append(dict(model=model, dtype=dtype, seed=seed))

            def generate(self, prompts, sampling_params):
                fake.calls.append((prompts, sampling_params))
                assert all(set(p) == {"prompt_token_ids"} for p in prompts)
                n = sampling_params.n
                texts = [[f" {len(p['prompt_token_ids'])} tokens, #{j}\nHuman: more" for j in range(n)]
                         for p in prompts]  # fmt: skip
                return [SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in ts]) for ts in texts]

        return LLM


def test_vllm_backend_against_a_fake_engine(monkeypatch, tmp_path, model_dir, tok):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    assert vllm_available()
    queries = ["Sort 3 1 2:", "Hello there, how are"]
    prompts = write(tmp_path / "p.txt", "\n".join(queries) + "\n")
    config = SampleConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=5, stop=("\nHuman:",),
                          seed=3, max_prompt_len=4)  # fmt: skip
    examples = sample_file(str(model_dir), prompts, tmp_path / "o.jsonl", 3, config, backend="vllm",
                           dtype="float32")  # fmt: skip
    assert fake.engines == [dict(model=str(model_dir), dtype="float32", seed=3)]
    (sent, params), = fake.calls  # fmt: skip
    ids = [tokenize_prompt(q, tok, False)[-4:] for q in queries]  # what the HF backend feeds
    assert [p["prompt_token_ids"] for p in sent] == ids
    expected = dict(n=3, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=5, stop=["\nHuman:"], seed=3)
    assert vars(params) == expected
    assert [ex.responses for ex in examples] == [[f" {len(i)} tokens, #{j}" for j in range(3)] for i in ids]
    assert examples[0].meta["sources"] == ["sample"] * 3
    written = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [row["responses"] for row in written] == [ex.responses for ex in examples]
    with pytest.raises(UserError, match="--strategy sample only"):
        sample_file(str(model_dir), prompts, tmp_path / "b", 2, SampleConfig(strategy="beam"), backend="vllm")
