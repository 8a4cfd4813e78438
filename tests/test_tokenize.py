"""rrhf_fast.data.tokenize: joint tokenisation (prompt + response = the tokenizer's tokens of the
whole text) on a byte-level BPE, a Metaspace (SentencePiece-style) and a ChatML tokenizer, for every
record shape; chat templates with multi-turn prompts and a system message; truncation that keeps
the special tokens; the boundary-merge count."""

import json
import logging

import pytest

from rrhf_fast.data.packing import pack
from rrhf_fast.data.records import Example, load_examples
from rrhf_fast.data.tokenize import tokenize_example, tokenize_examples, tokenize_prompt
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import build_bpe_tokenizer, build_metaspace_tokenizer, build_tokenizer

BPE, META, CHATML = build_bpe_tokenizer(), build_metaspace_tokenizer(), build_bpe_tokenizer(chatml=True)
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI = [SYSTEM, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Is the sky blue?"}]  # fmt: skip

RECORDS = [
    {"query": "Is it? ", "responses": ["yes", "no", "the yes"], "scores": [2, 1, 0]},
    {"prompt": "Tell me the", "chosen": " yes", "rejected": "re"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: the yes", "rejected": "\n\nHuman: hi\n\nAssistant: is it"},
    {"prompt": MULTI, "chosen": [{"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "assistant", "content": "No, the sky is green."}]},
    {"chosen": [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "user", "content": "Pick"}],
     "completions": ["the", {"role": "assistant", "content": "yes"}], "scores": [1, 0]},
]  # fmt: skip


def joint(tok, query, response):
    """What the tokenizer gives for the whole text: TRL's DPOTrainer `tokenize_fn`
    (trl/trainer/dpo_trainer.py): plain `tok(prompt + completion)` (+ EOS), conversational
    `apply_chat_template(prompt + completion)`."""
    if isinstance(query, str) and isinstance(response, str):
        return tok(query + response, split_special_tokens=True).input_ids + [tok.eos_token_id]
    q = [{"role": "user", "content": query}] if isinstance(query, str) else query
    r = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    return tok(tok.apply_chat_template(q + r, tokenize=False), add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return load_examples(path)


@pytest.mark.parametrize("tok", [pytest.param(BPE, id="byte-bpe"), pytest.param(META, id="metaspace"),
                                 pytest.param(CHATML, id="chatml")])  # fmt: skip
def test_prompt_plus_response_is_the_joint_tokenisation(tok, examples):
    for ex in examples:
        t = tokenize_example(ex, tok)
        for resp, ids in zip(ex.responses, t.response_ids, strict=True):
            assert t.prompt_ids + ids == joint(tok, ex.query, resp)
    # The same through pack(): the packed row holds exactly those tokens.
    batch = pack(examples, tok)
    expected = []
    for ex in examples:
        t = tokenize_example(ex, tok)
        expected += t.prompt_ids + [i for r in t.response_ids for i in r]
    assert batch.input_ids[0].tolist() == expected


def test_a_token_across_the_boundary_is_kept_and_counted(caplog):
    ex = Example("Is it? ", ["yes", "no"], [1.0, 0.0])
    t = tokenize_example(ex, BPE)
    # Alone, the prompt ends in "Ġ" and "yes" would be "y","es"; jointly it is "Ġy","es" (as TRL trains).
    assert BPE.convert_ids_to_tokens(t.response_ids[0]) == ["Ġy", "es", "</s>"]
    assert BPE.convert_ids_to_tokens(t.response_ids[1]) == ["Ġ", "n", "o", "</s>"]
    assert BPE.convert_ids_to_tokens(t.prompt_ids)[-1] == "?" and t.merged
    with caplog.at_level(logging.WARNING, logger="rrhf_fast.data.tokenize"):
        tokenize_examples([ex, Example("Q", ["a"], [1.0]), ex], BPE, locations=["f:1", "f:2", "f:3"])
    assert "2 of 3 records have a token spanning" in caplog.text and "the first: f:1" in caplog.text


def test_metaspace_responses_get_no_extra_space_token():
    t = tokenize_example(Example("Q:", ["yes"], [1.0]), META)
    alone = META("yes", add_special_tokens=False).input_ids  # what concatenation trained: "▁yes"
    assert META.convert_ids_to_tokens(alone) == ["▁yes"]
    assert META.convert_ids_to_tokens(t.response_ids[0]) == ["y", "es", "</s>"]  # as in "▁Q:yes"


def test_chat_multi_turn_with_system_message_trains_the_end_of_turn():
    ex = Example(MULTI, [[{"role": "assistant", "content": "Yes."}]], [1.0])
    t = tokenize_example(ex, CHATML)
    rendered = CHATML.apply_chat_template(MULTI, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert t.prompt_ids == CHATML(rendered, add_special_tokens=False).input_ids
    assert CHATML.decode(t.response_ids[0]) == "Yes.<|im_end|>\n"
    assert CHATML.eos_token_id in t.response_ids[0]  # <|im_end|> is a trained target
    assert t.prompt_ids == tokenize_prompt(MULTI, CHATML)  # what sampling feeds the model


def test_chat_template_flag_wraps_plain_strings():
    t = tokenize_example(Example("Hi?", ["Yes."], [1.0]), CHATML, chat_template=True)
    assert CHATML.decode(t.prompt_ids) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert CHATML.decode(t.response_ids[0]) == "Yes.<|im_end|>\n"


def test_truncation_keeps_the_template_header_and_the_end_of_turn():
    ex = Example(MULTI, [[{"role": "assistant", "content": "No, the sky is green today."}]], [1.0])
    full = tokenize_example(ex, CHATML)
    # 20 template tokens: "<|im_start|>system\n" (8) and "<|im_end|>\n<|im_start|>assistant\n" (12)
    t = tokenize_example(ex, CHATML, max_prompt_len=26, max_response_len=6)
    assert len(t.prompt_ids) == 26 and len(t.response_ids[0]) == 6
    head = CHATML("<|im_start|>system\n", add_special_tokens=False).input_ids
    tail = CHATML("?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert t.prompt_ids[: len(head)] == head and t.prompt_ids[-len(tail) :] == tail
    assert t.prompt_ids[len(head) :] == full.prompt_ids[-(26 - len(head)) :]  # the text cut from the left
    assert CHATML.decode(t.response_ids[0]) == "No, the<|im_end|>\n"  # N o , Ġthe + 2 end tokens
    plain = tokenize_example(Example("abcdef", ["xyz"], [1.0]), BPE, max_prompt_len=3, max_response_len=2)
    assert BPE.convert_ids_to_tokens(plain.prompt_ids) == ["<s>", "e", "f"]
    assert BPE.convert_ids_to_tokens(plain.response_ids[0]) == ["x", "</s>"]
    with pytest.raises(UserError, match=r"f:1: --max-response-len 2 leaves no room .* 2 end token"):
        tokenize_example(ex, CHATML, max_response_len=2, where="f:1")


def test_conversation_without_a_chat_template_is_one_sentence():
    tok = build_tokenizer(chat_template=False)
    with pytest.raises(UserError, match=r"^d.jsonl:4: the record is a conversation .* no chat template"):
        tokenize_example(Example(MULTI, ["x"], [1.0]), tok, where="d.jsonl:4")
