"""DPO on real preference data: TRL parity on standard and conversational pairs, tied
queries left out of the mean, ref_logps provenance; and scores ranked exactly in float64."""

import json
import logging
import math

import pytest
import torch

from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import pack, pack_tokenized
from rrhf_fast.data.records import Example, load_examples, write_examples
from rrhf_fast.data.tokenize import tokenize_examples
from rrhf_fast.models.logprobs import prepare_model
from rrhf_fast.models.tiny import build_bpe_tokenizer, build_tiny_model, save_tiny_model
from rrhf_fast.objectives import build_objective
from rrhf_fast.objectives.dpo import reference_logps

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)
SYSTEM = {"role": "system", "content": "Be brief."}
STANDARD = [
    {"prompt": "Is it? ", "chosen": "yes", "rejected": "no"},  # "Ġy" "es": a token across the boundary
    {"prompt": "Tell me the", "chosen": " yes please", "rejected": "re is"},
    {"prompt": "Q: the sky?", "chosen": " is blue", "rejected": " is green, yes"},
]
CONVERSATIONAL = [
    {"prompt": [SYSTEM, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Is the sky blue?"}],
     "chosen": [{"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "assistant", "content": "No, the sky is green."}]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "the yes"}]},
]  # fmt: skip


def trl_dpo(rows, tok, beta, out):
    """TRL 1.16's own DPOTrainer on `rows`: the (prompt_ids, chosen_ids, rejected_ids) its
    `_prepare_dataset` builds (`extract_prompt`, EOS added to plain completions, `tokenize_fn`), and
    the sigmoid loss its `compute_loss` returns for one batch of all of them (its collator, its
    fused-lm-head log-probs, a reference model run beside the policy). The policy and the reference
    are the tiny Llamas of seeds 0 and 1, fresh copies: the trainer patches the models it gets."""
    trl = pytest.importorskip("trl", reason="TRL (the dev extra) is the reference of this parity test")
    import datasets

    def model(seed):
        return build_tiny_model("llama", seed=seed, vocab_size=len(tok))

    args = trl.DPOConfig(output_dir=str(out), beta=beta, loss_type=["sigmoid"], max_length=None, use_cpu=True,
                         bf16=False, per_device_train_batch_size=len(rows), report_to="none")  # fmt: skip
    data = datasets.Dataset.from_list(rows)
    trainer = trl.DPOTrainer(
        model=model(0), ref_model=model(1), args=args, train_dataset=data, processing_class=tok
    )
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(features))
    return [(f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]) for f in features], loss.item()


@pytest.mark.parametrize("rows", [pytest.param(STANDARD, id="standard"),
                                  pytest.param(CONVERSATIONAL, id="conversational")])  # fmt: skip
def test_dpo_loss_equals_trls_on_the_tokens_trl_builds(tmp_path, rows):
    tok = build_bpe_tokenizer(chatml=True)
    trl_tokens, trl_loss = trl_dpo(rows, tok, 0.5, tmp_path / "trl")
    policy = prepare_model(build_tiny_model("llama", seed=0, vocab_size=len(tok)))
    reference = prepare_model(build_tiny_model("llama", seed=1, vocab_size=len(tok)))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    items = tokenize_examples(load_examples(path), tok)
    assert [(it.prompt_ids, *it.response_ids) for it in items] == trl_tokens
    for item, ref in zip(items, reference_logps(reference, items, micro_batch_tokens=4096, attn="dense",
                                                impl="torch"), strict=True):  # fmt: skip
        item.ref_logps = ref
    config = TrainConfig(model="-", data="-", output_dir="-", loss="dpo", dpo_beta=0.5, attn="dense",
                         kernels="torch")  # fmt: skip
    batch = pack_tokenized(items)
    objective = build_objective(config)
    loss = objective(policy, batch, normalizer=objective.normalizer(items)).loss.item()
    assert loss == pytest.approx(trl_loss, abs=1e-5)


def test_tied_queries_leave_the_mean_and_are_counted(monkeypatch):
    """Issue 14: one tied query among six shrank the loss 1.5363 -> 1.2803 (it added 0 to the sum
    and 1 to the count); the mean is over the queries that form a pair."""
    tok = build_bpe_tokenizer()
    examples = [Example(f"q{i} ", ["yes", "no"], [1.0, 0.0], {"ref_logps": [-3.0, -1.0]}) for i in range(5)]
    examples.append(Example("tie ", ["a", "b"], [0.5, 0.5], {"ref_logps": [-1.0, -2.0]}))
    items = tokenize_examples(examples, tok)
    config = TrainConfig(model="-", data="-", output_dir="-", loss="dpo", dpo_beta=1.0, kernels="torch")
    batch = pack_tokenized(items)
    logp = torch.zeros(batch.targets.numel(), dtype=torch.float64)  # S = 0: each pair's margin is 3 - 1
    objective = build_objective(config)
    monkeypatch.setattr("rrhf_fast.objectives.dpo.token_logprobs", lambda *args: logp)
    out = objective(None, batch, normalizer=objective.normalizer(items))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)))  # the mean over the 5 pairs, not 6
    counts = out.metrics.counts
    assert counts.summary()["tied_queries"] == 1 and counts.queries == 6


# -------------------------------------------------------------------------------------------------
# scores ranked in float64


def test_scores_that_tie_in_float32_keep_their_order(monkeypatch):
    tok = build_bpe_tokenizer()
    # Each query's first response is the better one in float64, equal to the second in float32.
    examples = [Example("a", ["x", "y"], [1.0 + 1e-12, 1.0]), Example("b", ["x", "y"], [1e308, 1e300])]
    batch = pack(examples, tok)
    assert batch.ranks.tolist() == [1.0, 0.0, 1.0, 0.0]
    # The model prefers each query's worse response: every pair is wrong, so the rank loss is > 0.
    logp = torch.where(batch.token_response % 2 == 0, torch.tensor(-5.0), torch.tensor(-1.0))
    config = TrainConfig(
        model="-", data="-", output_dir="-", rank_weight=1.0, sft_weight=0.0, kernels="torch"
    )
    monkeypatch.setattr("rrhf_fast.objectives.rrhf.token_logprobs", lambda *args: logp)
    out = build_objective(config)(None, batch, normalizer=2.0)
    assert out.metrics.summary()["rank_loss"] > 0
    counts = out.metrics.counts
    assert (counts.pairs, counts.correct_pairs, counts.tied) == (2, 0, 0)
    assert counts.best_reward == pytest.approx(1.0 + 1e300)  # the model's pick, in float64


# -------------------------------------------------------------------------------------------------
# ref_logps provenance


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_ref_logps_from_other_flags_are_refused(tmp_path, model_dir, capsys, caplog):
    write_examples(tmp_path / "d.jsonl", [Example(f"q{i}", ["aaaa", "bbbbbb"], [1.0, 0.0]) for i in range(3)])
    code = main(["ref-logps", "--model", str(model_dir), "--in", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "ref.jsonl"), "--device", "cpu",
                 "--max-response-len", "4"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    (first, *_) = load_examples(tmp_path / "ref.jsonl")
    assert first.meta["ref_logps_from"] == {"max_prompt_len": None, "max_response_len": 4,
                                            "chat_template": False, "prompt_tokens": 3,
                                            "response_tokens": [4, 4]}  # fmt: skip
    train = ["train", "--model", str(model_dir), "--data", str(tmp_path / "ref.jsonl"), "--loss", "dpo",
             "--device", "cpu", "--max-steps", "1", "--no-plot"]  # fmt: skip
    code = main([*train, "--output-dir", str(tmp_path / "run")])  # without --max-response-len 4
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (
        f"{tmp_path / 'ref.jsonl'}:1: its ref_logps were computed from other tokens (max_response_len 4"
        in err
    )
    # Records written before the provenance existed: used, with one warning.
    bare = load_examples(tmp_path / "ref.jsonl")
    for ex in bare:
        del ex.meta["ref_logps_from"]
    write_examples(tmp_path / "bare.jsonl", bare)
    with caplog.at_level(logging.WARNING, logger="rrhf_fast.objectives.dpo"):
        code = main([*train, "--data", str(tmp_path / "bare.jsonl"), "--output-dir", str(tmp_path / "run2")])
    assert code == 0, capsys.readouterr().err
    assert "3 of 3 records carry ref_logps without ref_logps_from" in caplog.text
