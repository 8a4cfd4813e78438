"""rrhf_fast.objectives.dpo: the DPO loss on a packed batch, its gradient, the stored reference log-probs,
a DPO training run through train.py, and the errors for data without reference log-probs."""

import json
import math
import random

import pytest
import torch

from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import pack, tokenize_example
from rrhf_fast.data.records import Example, load_examples, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.models.tiny import build_tokenizer, save_tiny_model
from rrhf_fast.objectives.dpo import add_reference_logps, dpo_loss
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# -------------------------------------------------------------------------------------------------
# the loss


def _batch(seed=0, dtype=torch.float64):
    """5 queries: graded, a tie for best and for worst, all tied (no pair), k = 1 (no pair), k = 2."""
    scores = [[0.2, 0.9, 0.5], [1.0, 1.0, 0.0, 0.0], [0.3, 0.3], [0.7], [0.0, 1.0]]
    gen = torch.Generator().manual_seed(seed)
    response_query, lengths = [], []
    for q, row in enumerate(scores):
        for _ in row:
            response_query.append(q)
            lengths.append(int(torch.randint(1, 6, (1,), generator=gen)))
    token_response = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    logp = -torch.rand(len(token_response), generator=gen, dtype=dtype) * 3
    ref = -torch.rand(len(lengths), generator=gen, dtype=dtype) * 3 * torch.tensor(lengths)
    flat = torch.tensor([s for row in scores for s in row], dtype=dtype)
    return logp, token_response, torch.tensor(response_query), flat, ref, scores


def _by_hand(logp, token_response, ref, scores, beta):
    """A loop over queries in plain Python floats."""
    sums = [0.0] * len(ref)
    for value, r in zip(logp.tolist(), token_response.tolist(), strict=True):
        sums[r] += value
    total, start = 0.0, 0
    for row in scores:
        idx = list(range(start, start + len(row)))
        start += len(row)
        if max(row) == min(row):
            continue
        w = idx[row.index(max(row))]
        lose = idx[row.index(min(row))]
        z = beta * ((sums[w] - ref[w].item()) - (sums[lose] - ref[lose].item()))
        total += -math.log(1 / (1 + math.exp(-z)))
    return total


@pytest.mark.parametrize("beta", [pytest.param(0.1, id="beta-0.1"), pytest.param(2.0, id="beta-2")])
@pytest.mark.parametrize("normalizer", [pytest.param(None, id="mean"), pytest.param(11.0, id="global-11")])
def test_dpo_loss_equals_a_hand_computation(beta, normalizer):
    logp, token_response, response_query, flat, ref, scores = _batch()
    out = dpo_loss(logp, token_response, response_query, flat, ref, num_queries=5, beta=beta,
                   normalizer=normalizer)  # fmt: skip
    # Without a normalizer: the mean over the 3 queries that form a pair (ties and k = 1 left out).
    expected = _by_hand(logp, token_response, ref, scores, beta) / (normalizer or 3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.rank_loss.item() == out.loss.item() and out.sft_loss.item() == 0.0
    sums = torch.zeros(len(ref), dtype=logp.dtype).index_add(0, token_response, logp)
    torch.testing.assert_close(out.response_scores, beta * (sums - ref))


def test_policy_equal_to_reference_gives_log_2_per_pair():
    logp, token_response, response_query, flat, _, _ = _batch(seed=1)
    ref = torch.zeros(len(flat), dtype=logp.dtype).index_add(0, token_response, logp)
    out = dpo_loss(logp, token_response, response_query, flat, ref, num_queries=5, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2))  # the mean over the 3 queries with a pair


def test_dpo_loss_gradient_passes_gradcheck():
    logp, token_response, response_query, flat, ref, _ = _batch(seed=2)
    logp.requires_grad_(True)

    def f(x):
        return dpo_loss(x, token_response, response_query, flat, ref, num_queries=5, beta=0.7,
                        normalizer=7.0).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, (logp,))
    f(logp).backward()
    tied = token_response >= 7  # queries 2 and 3 (responses 7, 8, 9) have no pair: no gradient
    tied &= token_response <= 9
    assert logp.grad[tied].abs().max() == 0 and logp.grad[~tied].abs().max() > 0


# -------------------------------------------------------------------------------------------------
# packing carries ref_logps; the stored values equal a direct computation


def test_packed_batch_carries_ref_logps_and_nan_when_absent():
    tok = build_tokenizer()
    with_ref = Example("q", ["a", "bc"], [1.0, 0.0], {"ref_logps": [-1.5, -2.5]})
    without = Example("r", ["d"], [0.5])
    batch = pack([with_ref, without], tok)
    assert batch.ref_logps.tolist()[:2] == [-1.5, -2.5] and math.isnan(batch.ref_logps[2])
    bad = Example("q", ["a", "bc"], [1.0, 0.0], {"ref_logps": [-1.5]})
    with pytest.raises(UserError, match="ref_logps.*one finite number per response"):
        tokenize_example(bad, tok)


def _data(n, seed=0):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        digits = "".join(rng.sample("0123456789", rng.randint(2, 5)))
        gold = "".join(sorted(digits))
        examples.append(Example(f"sort {digits}:", [gold, digits, gold[::-1] + "9"], [1.0, 0.4, 0.0]))
    return examples


def test_stored_ref_logps_equal_a_plain_forward(model_dir):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = _data(6)
    cfg = TrainConfig(model=str(model_dir), data="-", output_dir="-", micro_batch_tokens=80,
                      max_response_len=4)  # fmt: skip
    add_reference_logps(model, tok, examples, cfg)
    for ex in examples:
        prompt = tok(ex.query)["input_ids"]
        for response, stored in zip(ex.responses, ex.meta["ref_logps"], strict=True):
            ids = tok(ex.query + response)["input_ids"][len(prompt) :]  # joint tokens (no merges here)
            ids = ids[:3] + [tok.eos_token_id]  # --max-response-len 4 keeps the EOS
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0].double()
            logp = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(ids)[:, None])
            assert stored == pytest.approx(logp.sum().item(), abs=1e-4)


# -------------------------------------------------------------------------------------------------
# training with --loss dpo, from the command line


def test_ref_logps_command_then_dpo_training_lowers_the_loss(tmp_path, model_dir, capsys):
    write_examples(tmp_path / "d.jsonl", _data(12))
    code = main(["ref-logps", "--model", str(model_dir), "--in", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "ref.jsonl"), "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert all(len(ex.meta["ref_logps"]) == 3 for ex in load_examples(tmp_path / "ref.jsonl"))
    data, run = str(tmp_path / "ref.jsonl"), str(tmp_path / "run")
    cfg = TrainConfig(model=str(model_dir), data=data, output_dir=run, loss="dpo", dpo_beta=0.5,
                      optim="adamw", lr=3e-3, warmup_steps=0, max_steps=12, queries_per_step=12,
                      device="cpu", log_every=0, plot=False, save_every=0)  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert rows[-1]["loss"] < 0.5 * math.log(2)
    # The trained policy's implicit reward puts every query's best response above its worst.
    batch = pack(load_examples(cfg.data), build_tokenizer())
    with torch.no_grad():
        logp = packed_logprobs(result.model, batch)
    implicit = dpo_loss(logp, batch.token_response, batch.response_query, batch.scores, batch.ref_logps,
                        num_queries=12, beta=0.5).response_scores.view(12, 3)  # fmt: skip
    assert (implicit[:, 0] > implicit[:, 2]).all()


def test_dpo_without_ref_logps_is_one_error_naming_the_file(tmp_path, model_dir, capsys):
    write_examples(tmp_path / "plain.jsonl", _data(3))
    code = main(["train", "--model", str(model_dir), "--data", str(tmp_path / "plain.jsonl"),
                 "--output-dir", str(tmp_path / "run"), "--loss", "dpo", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'plain.jsonl'}: --loss dpo needs" in err and "3 of 3 have none" in err
    assert len(err.strip().splitlines()) == 1
