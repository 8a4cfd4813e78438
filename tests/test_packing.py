"""rrhf_fast.data.packing: tokenisation rules, the PackedBatch layout and the token-budget batcher."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rrhf_fast.data.packing import (
    PackedBatch,
    TokenizedExample,
    pack,
    pack_tokenized,
    plan_microbatches,
    tokenize_example,
)
from rrhf_fast.data.records import Example
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import build_tokenizer

TOK = build_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id

# Text that exercises multi-byte UTF-8 and literal special-token strings.
piece = st.sampled_from(list("ab xyz.\n") + ["é", "✓", "<s>", "</s>"])
text = st.lists(piece, max_size=8).map("".join)
nonempty = text.filter(bool)
example = st.builds(
    lambda q, rs, seed: Example(q, rs, [float((seed * (i + 7)) % 5) for i in range(len(rs))]),
    text,
    st.lists(nonempty, min_size=1, max_size=4),
    st.integers(0, 100),
)
limits = st.one_of(st.none(), st.integers(1, 8), st.integers(20, 40))


def response_positions(batch: PackedBatch) -> torch.Tensor:
    """Indices in T of the response tokens, in packed order (computed from seq_segment alone)."""
    return (batch.seq_segment > 0).nonzero().squeeze(-1)


@settings(max_examples=60, deadline=None)
@given(st.lists(example, min_size=1, max_size=4), limits, limits, st.booleans())
def test_packed_layout_properties(examples, max_prompt_len, max_response_len, chat):
    try:
        b = pack(
            examples,
            TOK,
            max_prompt_len=max_prompt_len,
            max_response_len=max_response_len,
            chat_template=chat,
        )
    except UserError as err:  # a limit below the special tokens that truncation keeps
        assert "leaves no room" in str(err)
        return
    G, R, T = len(examples), sum(len(e.responses) for e in examples), b.num_tokens
    assert (b.num_queries, b.num_responses) == (G, R)
    assert b.input_ids.shape == b.position_ids.shape == (1, T)
    assert b.seq_group.shape == b.seq_segment.shape == (T,)
    assert T == int(b.prompt_len.sum() + b.response_len.sum())

    # Every response token appears exactly once in targets, in packed order.
    where = response_positions(b)
    assert torch.equal(b.input_ids[0, where], b.targets)
    assert torch.equal(torch.bincount(b.token_response, minlength=R), b.response_len)
    assert torch.all(b.token_response.diff() >= 0) and torch.all(b.response_query.diff() >= 0)
    assert torch.equal(b.response_query, b.seq_group[where][b.response_len.cumsum(0) - 1])

    # rows: the previous token of the same response, or the last prompt row for a first token.
    first = torch.ones_like(b.rows, dtype=torch.bool)
    first[1:] = b.token_response[1:] != b.token_response[:-1]
    assert torch.equal(b.rows[~first], where[~first] - 1)
    g = b.response_query[b.token_response[first]]
    assert torch.all(b.seq_segment[b.rows[first]] == 0)
    assert torch.equal(b.seq_group[b.rows[first]], g)
    assert torch.equal(b.position_ids[0, b.rows[first]], b.prompt_len[g] - 1)

    # Position ids: 0..P-1 on the prompt, restarting at P for every response.
    starts = torch.cat([torch.zeros(1, dtype=torch.long), b.response_len.cumsum(0)[:-1]])
    offset = torch.arange(len(where)) - starts[b.token_response]
    assert torch.equal(b.position_ids[0, where], b.prompt_len[b.response_query[b.token_response]] + offset)
    prompt = b.seq_segment == 0
    assert torch.equal(b.position_ids[0, prompt], torch.cat([torch.arange(int(p)) for p in b.prompt_len]))

    # Tokenisation and truncation rules, query by query: untruncated, prompt + response is the joint
    # tokenisation of the whole text; truncated, BOS stays first and a plain response ends in EOS.
    responses = [r for e in examples for r in e.responses]
    for i, n in enumerate(b.response_len.tolist()):
        got = b.targets[b.token_response == i].tolist()
        assert max_response_len is None or n <= max_response_len
        assert chat or got[-1] == EOS
    k = 0
    for gi, e in enumerate(examples):
        ids = b.input_ids[0, prompt & (b.seq_group == gi)].tolist()
        assert max_prompt_len is None or len(ids) <= max_prompt_len
        # A chat template reads special-token strings in the query as markup, as generation will.
        assert chat or ids[0] == BOS and ids.count(BOS) == 1
        for resp in e.responses:
            if max_prompt_len is None and max_response_len is None:
                got = ids + b.targets[b.token_response == k].tolist()
                assert got == joint(e.query, resp, chat)
            k += 1
    assert k == len(responses)

    # varlen metadata: each segment's queries see the allowed keys, bottom-right aligned.
    assert torch.equal(varlen_mask(b), rule_mask(b))


def joint(query: str, response: str, chat: bool) -> list[int]:
    """The tokenizer's own tokens for the whole text (TRL's DPOTrainer tokenize_fn)."""
    if not chat:
        return TOK(query + response, split_special_tokens=True).input_ids + [EOS]
    turns = [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return TOK(TOK.apply_chat_template(turns, tokenize=False), add_special_tokens=False).input_ids


def rule_mask(b: PackedBatch) -> torch.Tensor:
    """The attention rule of docs/DESIGN.md §3, written out in full: [T, T], True where q may attend kv."""
    q, kv = torch.arange(b.num_tokens)[:, None], torch.arange(b.num_tokens)[None, :]
    same_group = b.seq_group[:, None] == b.seq_group[None, :]
    visible = (b.seq_segment[None, :] == 0) | (b.seq_segment[:, None] == b.seq_segment[None, :])
    return (kv <= q) & same_group & visible


def varlen_mask(b: PackedBatch) -> torch.Tensor:
    """The mask that the varlen metadata encodes (bottom-right causal on gathered keys)."""
    mask = torch.zeros(b.num_tokens, b.num_tokens, dtype=torch.bool)
    cq, ck = b.cu_seqlens_q.tolist(), b.cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q_len, k_len = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        keys = b.kv_index[ck[s] : ck[s + 1]]
        for i in range(q_len):
            mask[cq[s] + i, keys[: k_len - q_len + i + 1]] = True
    assert max(b.cu_seqlens_q.diff()) == b.max_seqlen_q and max(b.cu_seqlens_k.diff()) == b.max_seqlen_k
    return mask


def test_small_layout_by_hand():
    items = [
        TokenizedExample([5, 6, 7], [[1, 2], [3]], [0.5, 1.0]),
        TokenizedExample([8], [[4, 4, 4]], [2.0]),
    ]
    b = pack_tokenized(items)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 3, 8, 4, 4, 4]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3]]
    assert b.seq_group.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert b.seq_segment.tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 1, 1]
    assert b.rows.tolist() == [2, 3, 2, 6, 7, 8]
    assert b.targets.tolist() == [1, 2, 3, 4, 4, 4]
    assert b.token_response.tolist() == [0, 0, 1, 2, 2, 2]
    assert b.response_query.tolist() == [0, 0, 1]
    assert b.scores.dtype == torch.float64 and b.scores.tolist() == [0.5, 1.0, 2.0]
    assert b.ranks.dtype == torch.float32 and b.ranks.tolist() == [0.0, 1.0, 0.0]
    assert b.response_len.tolist() == [2, 1, 3] and b.prompt_len.tolist() == [3, 1]
    assert b.cu_seqlens_q.tolist() == [0, 3, 5, 6, 7, 10]
    assert b.cu_seqlens_k.tolist() == [0, 3, 8, 12, 13, 17]
    assert b.kv_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 6, 7, 8, 9]
    assert (b.max_seqlen_q, b.max_seqlen_k) == (3, 5)
    assert b.max_responses == 2
    moved = b.to("cpu")
    assert moved.max_seqlen_k == 5 and torch.equal(moved.kv_index, b.kv_index)


def test_truncation_by_hand():
    ex = Example("abcdef", ["xyz", "pq"], [1.0, 0.0])
    t = tokenize_example(ex, TOK, max_prompt_len=3, max_response_len=3)
    d, e, f, x, y, p, q = (TOK(c, add_special_tokens=False).input_ids[0] for c in "defxypq")
    assert t.prompt_ids == [BOS, e, f]  # BOS kept, the text cut from the left
    assert t.response_ids == [[x, y, EOS], [p, q, EOS]]  # cut before the EOS, which stays
    with pytest.raises(UserError, match="--max-prompt-len 1 leaves no room .* beside its 1 special"):
        tokenize_example(ex, TOK, max_prompt_len=1)


def test_chat_template_keeps_one_bos():
    t = tokenize_example(Example("hi", ["ok"], [1.0]), TOK, chat_template=True)
    rendered = TOK.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert t.prompt_ids == list(rendered["input_ids"]) and t.prompt_ids.count(BOS) == 1
    doubled = build_tokenizer()
    doubled.chat_template = "{{ bos_token }}" + doubled.chat_template  # writes BOS twice
    assert (
        tokenize_example(Example("hi", ["ok"], [1.0]), doubled, chat_template=True).prompt_ids == t.prompt_ids
    )


def test_unscored_examples_pack_with_nan_scores():
    b = pack([Example("q", ["a", "b"], [])], TOK)
    assert torch.isnan(b.scores).all() and b.num_responses == 2


class NoSpecialTokenizer:
    """A tokenizer with no BOS and configurable EOS: one id per character."""

    bos_token_id = None

    def __init__(self, eos):
        self.eos_token_id = eos

    def __call__(self, text, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def test_tokenizer_without_eos_is_an_error():
    with pytest.raises(UserError, match="no EOS token"):
        tokenize_example(Example("q", ["a"], [1.0]), NoSpecialTokenizer(eos=None))


def test_empty_prompt_is_an_error():
    assert tokenize_example(Example("q", ["a"], [1.0]), NoSpecialTokenizer(eos=0)).prompt_ids == [ord("q")]
    with pytest.raises(UserError, match="tokenises to no tokens"):
        tokenize_example(Example("", ["a"], [1.0]), NoSpecialTokenizer(eos=0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=30), st.integers(50, 120))
def test_plan_microbatches_is_greedy_and_complete(lengths, budget):
    plan = plan_microbatches(lengths, budget)
    assert [i for mb in plan for i in mb] == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in mb) for mb in plan]
    assert all(s <= budget for s in sums) and all(mb for mb in plan)
    for mb, nxt in zip(plan, plan[1:], strict=False):  # greedy: the next query would not have fitted
        assert sum(lengths[i] for i in mb) + lengths[nxt[0]] > budget


def test_plan_microbatches_rejects_a_query_over_budget():
    with pytest.raises(UserError, match="query 2 packs to 90 tokens .* budget of 64"):
        plan_microbatches([10, 20, 90], 64)
    assert plan_microbatches([], 64) == []
    assert plan_microbatches([30, 34, 1], 64) == [[0, 1], [2]]
