"""The benchmark's naive official-style step computes RRHF exactly (benchmarks/reference_step.py).

Its per-response scores, loss and gradients equal rrhf_loss_torch fed with log-probs from running
each prompt + response alone through the model: so the padding, the shift and the loss definitions
of the reference are right, and bench_step.py compares rrhf-fast against a correct baseline.
"""

import sys
from pathlib import Path

import pytest
import torch

from rrhf_fast.data.packing import tokenize_example
from rrhf_fast.data.records import Example
from rrhf_fast.kernels import rrhf_loss_torch
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_step import reference_backward, reference_step  # noqa: E402

EXAMPLES = [
    # ragged lengths (so padding and the official length differ from the paper's) and a score tie
    Example("What is 2+2?", ["4", "four, I think", "5 of course not"], [1.0, 0.5, -2.0]),
    Example("Name a colour", ["red", "a fine blue sky", "green"], [0.3, 0.3, 0.9]),
    Example("Hi", ["hello there friend"], [0.0]),
]


def alone_logprobs(model, queries):
    """Each prompt + response run by itself, no padding: the log-probs of the response tokens."""
    logp, token_response, response_query, scores, prompt_len = [], [], [], [], []
    for g, q in enumerate(queries):
        prompt_len.append(len(q.prompt_ids))
        for resp, score in zip(q.response_ids, q.scores, strict=True):
            ids = torch.tensor(q.prompt_ids + resp)[None]
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            lp = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[-len(resp) :]
            logp.append(lp)
            token_response += [len(scores)] * len(resp)
            response_query.append(g)
            scores.append(score)
    return (
        torch.cat(logp),
        torch.tensor(token_response),
        torch.tensor(response_query),
        torch.tensor(scores),
        torch.tensor(prompt_len),
    )


def tokenize(examples, tokenizer):
    return [tokenize_example(ex, tokenizer) for ex in examples]


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.7], ids=["lp1", "lp0.7"])
def test_reference_equals_each_response_alone(mode, length_penalty):
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama")
    queries = tokenize(EXAMPLES, tokenizer)
    kwargs = dict(mode=mode, length_penalty=length_penalty, rank_weight=1.3, sft_weight=0.6)

    ref = reference_backward(model, queries, pad_id=tokenizer.pad_token_id, **kwargs)
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)

    logp, token_response, response_query, scores, prompt_len = alone_logprobs(model, queries)
    want = rrhf_loss_torch(logp, token_response, response_query, scores, prompt_len=prompt_len, **kwargs)
    want.loss.backward()

    torch.testing.assert_close(ref.response_scores, want.response_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.loss, want.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.rank_loss, want.rank_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.sft_loss, want.sft_loss, atol=1e-5, rtol=0)
    assert float(want.rank_loss.detach()) > 0  # the hinge is active: the rank term is really compared
    for got, exp in zip(ref_grads, grads(model), strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)


def test_reference_step_updates_the_model_once():
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = reference_step(model, optimizer, tokenize(EXAMPLES, tokenizer), pad_id=tokenizer.pad_token_id)
    assert torch.isfinite(out.loss)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_reference_rejects_unknown_mode():
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="mode"):
        reference_backward(model, tokenize(EXAMPLES[:1], tokenizer), pad_id=0, mode="nope")
