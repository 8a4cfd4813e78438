"""rrhf_fast.objectives: --loss picks one objective; its metrics add up over micro-batches and ranks."""

import pytest
import torch

from rrhf_fast.config import LOSSES, TrainConfig
from rrhf_fast.data.packing import TokenizedExample, pack_tokenized
from rrhf_fast.errors import UserError
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.models.tiny import build_tiny_model
from rrhf_fast.objectives import OBJECTIVES, Metrics, build_objective
from rrhf_fast.objectives.dpo import DPO
from rrhf_fast.objectives.rrhf import RRHF

TORCH_THREADS = 1


def test_every_loss_flag_has_an_objective():
    assert tuple(OBJECTIVES) == LOSSES
    cfg = TrainConfig(model="m", data="d", output_dir="o")
    assert isinstance(build_objective(cfg), RRHF)
    assert isinstance(build_objective(TrainConfig(**{**cfg.to_dict(), "loss": "dpo"})), DPO)


def test_an_unknown_loss_is_refused_in_one_sentence():
    cfg = TrainConfig(model="m", data="d", output_dir="o", loss="ppo")  # not validated: built in code
    with pytest.raises(UserError) as err:
        build_objective(cfg)
    assert str(err.value) == (
        "--loss ppo is not an objective; choose one of rrhf, dpo, dpo-pl, lipo, pro, simpo, orpo, rm"
    )


def _batch():
    items = [
        TokenizedExample(prompt_ids=[1, 2, 3], response_ids=[[4, 5], [6, 7, 8]], scores=[1.0, 0.0]),
        TokenizedExample(prompt_ids=[9, 2], response_ids=[[5], [7, 4], [3, 3, 3]], scores=[0.0, 2.0, 1.0]),
    ]
    return pack_tokenized(items)


def test_rrhf_objective_is_the_kernel_loss_with_the_run_flags():
    model = build_tiny_model("llama", seed=0)
    flags = dict(length_penalty=0.5, rank_weight=2.0, sft_weight=0.3, sft_reduction="sum")
    cfg = TrainConfig(model="m", data="d", output_dir="o", kernels="torch", **flags)
    batch = _batch()
    out = build_objective(cfg)(model, batch, normalizer=4.0)
    logp = packed_logprobs(model, batch, impl="torch")
    want = rrhf_loss(logp, batch.token_response, batch.response_query, batch.scores,
                     prompt_len=batch.prompt_len, normalizer=4.0, impl="torch", **flags)  # fmt: skip
    torch.testing.assert_close(out.loss, want.loss)
    assert out.loss.requires_grad
    assert out.metrics.names == ("loss", "rank_loss", "sft_loss")
    assert out.metrics.terms.tolist() == pytest.approx(
        [want.loss.item(), want.rank_loss.item(), want.sft_loss.item()]
    )
    assert out.metrics.counts.queries == 2 and out.metrics.counts.pairs == 1 + 3


def test_metrics_add_up_and_survive_the_flat_list_of_an_all_reduce():
    names = ("loss", "rank_loss", "sft_loss")
    a = Metrics(names, torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    a.counts.correct_pairs, a.counts.pairs, a.counts.top1, a.counts.best_reward, a.counts.queries = (
        3,
        4,
        1,
        2.5,
        2,
    )
    a.counts.tied = 1
    b = Metrics.from_list(names, a.to_list())
    assert b.to_list() == a.to_list() == [1.0, 0.5, 0.5, 3, 4, 1, 2.5, 2, 1]
    b += a
    assert b.summary("eval_") == {"eval_loss": 2.0, "eval_rank_loss": 1.0, "eval_sft_loss": 1.0,
                                  "eval_accuracy": 0.75, "eval_top1": 0.5,
                                  "eval_best_reward": 1.25, "eval_tied_queries": 2}  # fmt: skip
    assert Metrics.zeros(names).summary()["accuracy"] is None  # no pair: no accuracy, not 0
