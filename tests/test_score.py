"""generation.score and generation.labelers: reward model, Python function, RLAIF judge and d-RLAIF
direct scorers; scoring files."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rrhf_fast import cli
from rrhf_fast.data.packing import tokenize_example
from rrhf_fast.data.records import Example, load_examples
from rrhf_fast.errors import UserError
from rrhf_fast.generation.labelers import (
    DirectScorer,
    JudgeScorer,
    fill_template,
    load_template,
    parse_options,
)
from rrhf_fast.generation.score import (
    FunctionScorer,
    RewardModelScorer,
    ScoreConfig,
    build_scorer,
    load_function,
    score_examples,
    score_file,
)
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer, tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "score"
QUERIES = ["What is 2+2?", "Say hi in French"]
RESPONSES = [["4", "Four, of course.", "It is 5"], ["Salut !", "bonjour"]]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def reward_model(tok):
    torch.manual_seed(0)
    config = tiny_config("llama", num_labels=1)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, reward_model, tok):
    path = tmp_path_factory.mktemp("rm")
    reward_model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("lm")
    build_tiny_model("llama", seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Reward model


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_reward_model_equals_a_manual_forward_of_each_pair(reward_model, tok, padding_side, batch_size):
    tok.padding_side = padding_side  # the scorer pads by itself; the tokenizer's setting must not matter
    got = RewardModelScorer(reward_model, tok, batch_size=batch_size, packed=False).score(QUERIES, RESPONSES)
    tok.padding_side = "right"
    with torch.no_grad():
        want = [
            [reward_model(**tok(q + r, return_tensors="pt")).logits[0, 0].item() for r in rs]
            for q, rs in zip(QUERIES, RESPONSES, strict=True)
        ]
    assert [len(r) for r in got] == [3, 2]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)
    assert len({round(s, 6) for row in got for s in row}) == 5  # not a constant


def test_reward_model_from_spec_and_max_length(rm_dir, reward_model, tok):
    scorer = build_scorer(f"reward-model:{rm_dir}", ScoreConfig(device="cpu", max_length=4, packed=False))
    got = scorer.score(QUERIES, RESPONSES)
    with torch.no_grad():
        ids = tok(QUERIES[0] + RESPONSES[0][1])["input_ids"][-4:]
        want = reward_model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert got[0][1] == pytest.approx(want, abs=1e-5)


def test_a_causal_lm_is_not_taken_for_a_reward_model(lm_dir):
    with pytest.raises(UserError, match=r"lacks weights .*score.weight"):
        build_scorer(f"reward-model:{lm_dir}", ScoreConfig(device="cpu"))


def test_reward_model_chat_template_wraps_both_turns(reward_model, tok):
    got = RewardModelScorer(reward_model, tok, chat_template=True, packed=False).score(["Hi"], [["Hello"]])
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(turns, tokenize=False)
    assert text == "<s><|user|>Hi\n<|assistant|>Hello\n"
    with torch.no_grad():
        want = reward_model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert got == [[pytest.approx(want, abs=1e-5)]]
    with pytest.raises(UserError, match="has no chat template"):
        RewardModelScorer(reward_model, build_tokenizer(chat_template=False), chat_template=True)


@pytest.mark.parametrize("budget", [4096, 70], ids=["one-forward", "a-forward-per-query"])
@pytest.mark.parametrize("chat_template", [False, True], ids=["plain", "chat"])
def test_packed_reward_model_equals_each_response_alone(reward_model, tok, budget, chat_template):
    # One packed forward per micro-batch (the prompt once) == the model on each prompt + response
    # alone, tokenised as train-rm tokenises (prompt, response + EOS).
    scorer = RewardModelScorer(reward_model, tok, micro_batch_tokens=budget, chat_template=chat_template)
    got = scorer.score(QUERIES, RESPONSES)
    want = []
    with torch.no_grad():
        for q, rs in zip(QUERIES, RESPONSES, strict=True):
            item = tokenize_example(Example(q, rs, []), tok, chat_template=chat_template)
            # plain text ends in EOS; a chat response ends with what the template writes after a turn
            assert chat_template or item.response_ids[0][-1] == tok.eos_token_id
            want.append([reward_model(input_ids=torch.tensor([item.prompt_ids + r])).logits[0, 0].item()
                         for r in item.response_ids])  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)
    assert len({round(s, 6) for row in got for s in row}) == 5


def test_packed_scoring_refuses_max_length(reward_model, tok):
    with pytest.raises(UserError, match="--no-packed"):
        RewardModelScorer(reward_model, tok, max_length=8)


def test_reward_model_with_two_labels_is_refused(tok):
    model = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=2))
    with pytest.raises(UserError, match="2 labels"):
        RewardModelScorer(model, tok)


# ----------------------------------------------------------------------------------------------
# Python function


@pytest.mark.parametrize(
    "target", ["rewards:length", str(FIXTURES / "rewards.py") + ":length"], ids=["module", "file"]
)
def test_python_scorer_from_module_and_from_file(target, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    scorer = build_scorer(f"python:{target}")
    assert scorer.score(QUERIES, RESPONSES) == [[1.0, 16.0, 7.0], [7.0, 7.0]]


@pytest.mark.parametrize(
    "func, words",
    [
        pytest.param("not_a_number", "returned str 'high'; it must return a number", id="string"),
        pytest.param("nan_for_second", "returned nan; scores must be finite", id="nan"),
        pytest.param("boolean", "returned bool True", id="bool"),
    ],
)
def test_python_scorer_bad_return_names_the_line(func, words):
    scorer = FunctionScorer(load_function(f"{FIXTURES / 'rewards.py'}:{func}"), name=func)
    with pytest.raises(UserError) as info:
        score_file(FIXTURES / "unscored.jsonl", "unused.jsonl", scorer)
    message = str(info.value)
    assert words in message
    assert "unscored.jsonl:1: response" in message  # query 0 is line 1


@pytest.mark.parametrize(
    "spec, words",
    [
        pytest.param("python:rewards", "give MODULE:FUNCTION", id="no-function"),
        pytest.param("python:no_such_module_xyz:f", "cannot import 'no_such_module_xyz'", id="no-module"),
        pytest.param("python:/no/such/file.py:f", "no such file", id="no-file"),
        pytest.param(f"python:{FIXTURES / 'rewards.py'}:missing", "has no function 'missing'", id="no-attr"),
        pytest.param("reward:x", "give one of reward-model:PATH", id="bad-kind"),
        pytest.param("judge:", "give one of", id="no-path"),
    ],
)
def test_bad_scorer_specs(spec, words):
    with pytest.raises(UserError, match=words):
        build_scorer(spec)


# ----------------------------------------------------------------------------------------------
# LLM labelers with a stub model whose next-token probabilities the test controls


class StubLM(torch.nn.Module):
    """Decodes each (left-padded) row and returns the log-probabilities `next_token(text)`."""

    def __init__(self, tok, next_token):
        super().__init__()
        self.tok, self.next_token = tok, next_token
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            text = self.tok.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
            self.calls.append(text)
            rows.append(self.next_token(text))
        return SimpleNamespace(logits=torch.stack(rows)[:, None, :])


def distribution(tok, probs: dict[str, float], rest: float) -> torch.Tensor:
    """Log-probabilities with `probs` on single-character tokens and `rest` spread over the others."""
    p = torch.full((len(tok),), rest / (len(tok) - len(probs)), dtype=torch.float64)
    for text, value in probs.items():
        (token,) = tok(text, add_special_tokens=False)["input_ids"]
        p[token] = value
    return p.log().float()


QUALITY = {"good": 2.0, "okay": 0.5, "bad": -1.0}
BIAS = 1.0  # the stub labeler's preference for whatever it reads first


def judge_stub(tok):
    def next_token(text):
        first, second = (line.split(": ", 1)[1] for line in text.splitlines()[1:3])
        p_first = 1 / (1 + math.exp(-(QUALITY[first] - QUALITY[second] + BIAS)))
        # 40% of the mass elsewhere: only the ratio of "A" to "B" may count.
        return distribution(tok, {"A": 0.6 * p_first, "B": 0.6 * (1 - p_first)}, rest=0.4)

    return StubLM(tok, next_token)


def judge(tok, **kw):
    template = load_template(FIXTURES / "judge_ab.txt", "judge")
    return JudgeScorer(judge_stub(tok), tok, template, ["A", "B"], **kw)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_judge_win_rates_match_a_hand_computation(tok):
    responses = ["good", "okay", "bad"]
    got = judge(tok, batch_size=4).score(["q"], [responses])[0]

    def beats(a, b):  # both orders averaged: the bias cancels
        d = QUALITY[a] - QUALITY[b]
        return (sigmoid(d + BIAS) + (1 - sigmoid(-d + BIAS))) / 2

    want = [sum(beats(a, b) for b in responses if b != a) / 2 for a in responses]
    assert got == pytest.approx(want, abs=1e-6)
    assert got[0] > got[1] > got[2]
    assert sum(got) == pytest.approx(1.5)  # each of the 3 pairs hands out one win in total


def test_judge_asks_every_pair_in_both_orders(tok):
    scorer = judge(tok)
    scorer.score(["q"], [["good", "okay", "bad"]])
    shown = sorted(tuple(line.split(": ", 1)[1] for line in c.splitlines()[1:3]) for c in scorer.model.calls)
    assert shown == sorted((a, b) for a in QUALITY for b in QUALITY if a != b)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]], ids=["as-is", "reversed", "rotated"])
def test_judge_is_position_debiased(tok, order):
    responses = ["good", "okay", "bad"]
    base = judge(tok).score(["q"], [responses])[0]
    permuted = judge(tok).score(["q"], [[responses[i] for i in order]])[0]
    assert permuted == pytest.approx([base[i] for i in order], abs=1e-9)


def test_judge_single_response_gets_one_half(tok):
    scorer = judge(tok)
    assert scorer.score(["q", "r"], [["good"], ["bad", "good"]])[0] == [0.5]
    assert scorer.model.calls and all("bad" in c for c in scorer.model.calls)  # only the pair was asked


def test_judge_on_a_real_tiny_model_is_order_invariant(lm_dir):
    scorer = build_scorer(f"judge:{lm_dir}", ScoreConfig(device="cpu", batch_size=3))
    a = scorer.score(QUERIES, RESPONSES)
    b = scorer.score(QUERIES, [rs[::-1] for rs in RESPONSES])
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a == pytest.approx(row_b[::-1], abs=1e-5)
        assert sum(row_a) == pytest.approx(len(row_a) / 2, abs=1e-9)


RATING_PROBS = {
    "okay": {"1": 0.1, "2": 0.2, "3": 0.4, "4": 0.1, "5": 0.0},
    "good": {"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.25, "5": 0.5},
}


def direct_stub(tok):
    def next_token(text):
        response = text.splitlines()[1].split(": ", 1)[1]
        probs = {k: max(v, 1e-12) for k, v in RATING_PROBS[response].items()}
        return distribution(tok, probs, rest=1 - sum(probs.values()))

    return StubLM(tok, next_token)


def test_direct_score_is_the_probability_weighted_mean_rating(tok):
    template = load_template(FIXTURES / "direct_short.txt", "direct")
    scorer = DirectScorer(direct_stub(tok), tok, template, parse_options("1-5"), batch_size=2)
    got = scorer.score(["q", "r"], [["okay", "good"], ["good"]])
    okay = (1 * 0.1 + 2 * 0.2 + 3 * 0.4 + 4 * 0.1) / 0.8  # renormalised over the rating tokens
    good = (5 * 0.5 + 4 * 0.25) / 0.75
    assert got == [pytest.approx([okay, good], abs=1e-5), pytest.approx([good], abs=1e-5)]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_direct_on_a_real_tiny_model_equals_a_manual_forward(lm_dir, tok, chat):
    config = ScoreConfig(device="cpu", ratings="1-9", batch_size=2, chat_template=chat)
    got = build_scorer(f"direct:{lm_dir}", config).score(QUERIES, RESPONSES)
    template = load_template(None, "direct")
    model = build_tiny_model("llama", seed=1)
    rating_ids = [tok(str(r), add_special_tokens=False)["input_ids"][0] for r in range(1, 10)]
    with torch.no_grad():
        for q, rs, row in zip(QUERIES, RESPONSES, got, strict=True):
            for r, value in zip(rs, row, strict=True):
                text = fill_template(template, {"query": q, "response": r})
                if chat:  # the filled template is the user turn; the rating follows "<|assistant|>"
                    turn = [{"role": "user", "content": text}]
                    text = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)[
                        len("<s>") :
                    ]
                ids = torch.tensor([tok(text)["input_ids"]])
                p = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)[rating_ids].softmax(-1)
                assert value == pytest.approx((p * torch.arange(1, 10)).sum().item(), abs=1e-5)


@pytest.mark.parametrize(
    "make, words",
    [
        pytest.param(lambda t, m: DirectScorer(m, t, "{query}{response}=", parse_options("1-10")),
                     "do not start with distinct tokens", id="ratings-1-10-on-digit-tokens"),
        pytest.param(lambda t, m: JudgeScorer(m, t, "{query}{response_1}{response_2}", ["1"]),
                     "needs two strings", id="one-answer"),
        pytest.param(lambda t, m: JudgeScorer(m, t, load_template(FIXTURES / "no_placeholder.txt", "judge")),
                     "lacks {response_2}", id="missing-placeholder"),
    ],
)  # fmt: skip
def test_labeler_errors(tok, make, words):
    with pytest.raises(UserError, match=words):
        make(tok, build_tiny_model("llama")).score(["q"], [["a", "b"]])


def test_fill_template_substitutes_once():
    text = fill_template("{query}|{response}", {"query": "{response}", "response": "R"})
    assert text == "{response}|R"


def test_parse_options():
    assert parse_options("1-3") == ["1", "2", "3"]
    assert parse_options("A,B") == ["A", "B"]
    assert parse_options("0, 2-3") == ["0", "2", "3"]


def test_shipped_templates_have_their_placeholders():
    assert "{response_2}" in load_template(None, "judge")
    assert load_template(None, "direct").endswith("Rating=")  # the final newline is not part of the prompt


# ----------------------------------------------------------------------------------------------
# Files and the command line


def test_score_file_writes_scores(tmp_path):
    out = tmp_path / "scored.jsonl"
    scorer = build_scorer(f"python:{FIXTURES / 'rewards.py'}:length")
    score_file(FIXTURES / "unscored.jsonl", out, scorer)
    examples = load_examples(out)
    assert [e.scores for e in examples] == [[1.0, 5.0, 7.0], [2.0]]
    assert examples[1].meta == {"sources": ["gold"]}


def test_existing_scores_are_not_overwritten_silently(tmp_path):
    scorer = build_scorer(f"python:{FIXTURES / 'rewards.py'}:length")
    with pytest.raises(UserError, match=r"scored.jsonl:2: already has scores.*--overwrite"):
        score_file(FIXTURES / "scored.jsonl", tmp_path / "out.jsonl", scorer)
    assert not (tmp_path / "out.jsonl").exists()
    score_file(FIXTURES / "scored.jsonl", tmp_path / "out.jsonl", scorer, overwrite=True)
    assert [e.scores for e in load_examples(tmp_path / "out.jsonl")] == [[1.0, 5.0], [2.0, 5.0]]


def test_score_examples_checks_the_scorer_output():
    class Short:
        def score(self, queries, responses):
            return [[1.0] for _ in queries]

    examples = load_examples(FIXTURES / "unscored.jsonl", require_scores=False)
    with pytest.raises(UserError, match=r"example 0: the scorer gave \[1.0\] for 3 responses"):
        score_examples(examples, Short())


def test_cli_score_with_a_reward_model(tmp_path, rm_dir):
    out = tmp_path / "out.jsonl"
    argv = ["score", "--in", str(FIXTURES / "unscored.jsonl"), "--scorer", f"reward-model:{rm_dir}"]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu", "--batch-size", "2"]) == 0
    examples = load_examples(out)
    assert [len(e.scores) for e in examples] == [3, 1]
    saved = json.loads((tmp_path / "out.score.json").read_text())
    assert saved["settings"]["scorer"] == f"reward-model:{rm_dir}" and saved["settings"]["batch_size"] == 2


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    argv = ["score", "--in", str(FIXTURES / "scored.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--scorer", f"python:{FIXTURES / 'rewards.py'}:length"]) == 2
    assert "already has scores" in capsys.readouterr().err
