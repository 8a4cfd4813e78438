"""The reference-free pairwise losses, generalised to k responses: `--loss simpo` and `--loss orpo`.

Both papers define a loss of one pair (chosen w, rejected l). For a query with k responses the pairs
are chosen by `--pairs`: `all` (default), every ordered pair of different scores; `best`, the best
response (first of the top-scored) against each lower-scored one. A query's pairwise term is the
MEAN over its pairs, so a query weighs the same whatever its k, and k = 2 gives the paper's loss
(and TRL's, which averages over pairs). Equal scores make no pair (objectives/ranking.py).
With r_i = S_i / n_i, the mean token log-prob:

- simpo (Meng et al. 2024, arXiv 2405.14734, Eq. 6): -log sigmoid(beta r_w - beta r_l - gamma);
  --simpo-beta 2.0, --simpo-gamma 0.5 (the authors' defaults: beta 2.0, gamma / beta 0.25; TRL's
  CPOTrainer loss_type="simpo" with cpo_alpha=0 is the same loss). No SFT term, so a query without
  a pair adds 0 and the mean runs over the queries with one.
- orpo (Hong et al. 2024, arXiv 2403.07691, Eq. 6-7): L_SFT + lambda * L_OR with
  L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)), P(y) = exp(r)
  (Eq. 4); L_SFT the token-mean NLL of the best response (the paper's L_SFT; TRL's ORPOTrainer also
  counts the prompt's tokens in it). --orpo-lambda 0.1. Every query trains its SFT term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rrhf_fast.objectives.ranking import (
    ListInputs,
    RankingObjective,
    RankingOutput,
    finish,
    pair_mask,
    pair_mean,
    sft_term,
)


def simpo_loss(
    x: ListInputs,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    pairs: str = "all",
    normalizer: float | None = None,
) -> RankingOutput:
    u = beta * x.sums / x.lengths
    pair = -F.logsigmoid(u[:, :, None] - u[:, None, :] - gamma)
    return finish(x, pair_mean(pair, pair_mask(x, pairs)), None, u, normalizer)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, branching at -ln 2 against cancellation (Maechler 2012; TRL's too)."""
    return torch.where(a < -0.6931471805599453, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def log_odds(x: ListInputs) -> torch.Tensor:
    """[G, K] log(P / (1 - P)) with log P the mean token log-prob; padding reads as P = 1/2."""
    a = (x.sums / x.lengths).masked_fill(~x.mask, -0.6931471805599453)
    return a - log1mexp(a)


def orpo_loss(
    x: ListInputs, *, lam: float = 0.1, pairs: str = "all", normalizer: float | None = None
) -> RankingOutput:
    o = log_odds(x)
    pair = -F.logsigmoid(o[:, :, None] - o[:, None, :])
    return finish(x, lam * pair_mean(pair, pair_mask(x, pairs)), sft_term(x), o, normalizer)


class SimPO(RankingObjective):
    """`--loss simpo`: SimPO over the pairs `--pairs` picks."""

    name = "simpo"

    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        c = self.config
        return simpo_loss(x, beta=c.simpo_beta, gamma=c.simpo_gamma, pairs=c.pairs, normalizer=normalizer)


class ORPO(RankingObjective):
    """`--loss orpo`: SFT on the best response plus the odds-ratio loss over the pairs `--pairs` picks."""

    name = "orpo"
    has_sft = True

    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        c = self.config
        return orpo_loss(x, lam=c.orpo_lambda, pairs=c.pairs, normalizer=normalizer)

    def sft_weight(self) -> float:
        return 1.0
