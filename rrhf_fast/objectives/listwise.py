"""The listwise losses: `--loss dpo-pl` and `--loss lipo` (with a reference model), `--loss pro` (without).

Per query, responses y_1..y_k with scores psi_i, S_i the policy's log-prob sum, n_i its tokens,
S_ref_i the reference's (objectives/ranking.py has the shared layout and the equal-score rule):

- dpo-pl, listwise DPO (Rafailov et al. 2023, arXiv 2305.18290, Appendix A.3, the Plackett-Luce
  objective): u_i = beta (S_i - S_ref_i); loss = sum over the positions of the ranking of
  -log(exp(u_placed) / sum over the responses not yet placed exp(u_j)); ties grouped. For k = 2 this
  is DPO's -log sigmoid(u_w - u_l) (Eq. 7). --dpo-beta.
- lipo, LiPO-lambda (Liu et al. 2024, arXiv 2402.01878, §4, the Lambda loss): u_i as dpo-pl with
  --lipo-beta; loss = sum over pairs psi_i > psi_j of Delta_ij * -log sigmoid(u_i - u_j) with the
  Lambda weight Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, gain G_i = 2^psi_i - 1 from the
  labels (the scores as given), discount D(tau) = log2(1 + tau), tau_i the position of response i
  when the query's responses are sorted by the model's u, descending (LambdaLoss; ties in u: the
  earlier response first). The weights carry no gradient.
- pro, Preference Ranking Optimisation (Song et al. 2023, arXiv 2306.17492, §3): r_i = S_i / n_i;
  loss = sum over positions k < n of -log(exp(r_k) / sum_{i >= k} exp(r_i)) + beta * L_SFT, as the
  authors' code computes it (AlibabaResearch/DAMO-ConvAI PRO/train/utils/process_manager.py,
  `compute_loss`): L_SFT = -S_1, the best response's log-prob SUM, and beta = --pro-sft-weight
  (their 0.05) * (k - 1)^2. --pro-temperature: the paper's dynamic temperature (the authors' code
  always applies it), r_i / T_ki in place of r_i with T_ki = 1 / (psi_k - psi_i) for lower-scored i
  and T_kk = min over those (= 1 / the largest gap); a response tied with y_k takes T_kk (their
  code assumes no ties).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rrhf_fast.objectives.ranking import (
    ListInputs,
    RankingObjective,
    RankingOutput,
    finish,
    plackett_luce,
)


def implicit_rewards(x: ListInputs, beta: float) -> torch.Tensor:
    """u = beta (S - S_ref), [G, K]."""
    if x.ref is None:
        raise ValueError("this loss needs reference log-probs (ListInputs.ref)")
    return beta * (x.sums - x.ref)


def dpo_pl_loss(x: ListInputs, *, beta: float = 0.1, normalizer: float | None = None) -> RankingOutput:
    u = implicit_rewards(x, beta)
    return finish(x, plackett_luce(u, x), None, u, normalizer)


def lambda_weights(u: torch.Tensor, x: ListInputs) -> torch.Tensor:
    """[G, K, K] LiPO-lambda's Delta_ij (module docstring), no gradient."""
    with torch.no_grad():
        k = u.shape[1]
        v = u.masked_fill(~x.mask, -torch.inf)
        slot = torch.arange(k, device=u.device)
        ahead = (v[:, None, :] > v[:, :, None]) | (
            (v[:, None, :] == v[:, :, None]) & (slot[None, :] < slot[:, None])
        )
        tau = 1 + (ahead & x.mask[:, None, :]).sum(-1).to(torch.float64)  # [G, i]: 1-based position
        inv_d = 1 / torch.log2(1 + tau)
        gain = torch.exp2(x.scores) - 1
        delta = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        return delta.to(u.dtype)


def lipo_loss(x: ListInputs, *, beta: float = 0.05, normalizer: float | None = None) -> RankingOutput:
    u = implicit_rewards(x, beta)
    pair = -F.logsigmoid(u[:, :, None] - u[:, None, :]) * lambda_weights(u, x)
    rank_q = pair.masked_fill(~x.better, 0.0).flatten(1).sum(1)
    return finish(x, rank_q, None, u, normalizer)


def pro_loss(
    x: ListInputs,
    *,
    sft_weight: float = 0.05,
    temperature: bool = False,
    normalizer: float | None = None,
) -> RankingOutput:
    r = x.sums / x.lengths
    if temperature:
        ranks, s = x.ranks, x.scores
        lower = x.mask[:, None, :] & (ranks[:, None, :] < ranks[:, :, None])  # [G, k, i]
        gap = (s[:, :, None] - s[:, None, :]).masked_fill(~lower, 0.0)  # 1 / T_ki
        own = gap.amax(-1)  # 1 / T_kk
        tied = ranks[:, None, :] == ranks[:, :, None]
        inv_t = torch.where(tied, own[:, :, None], gap).to(r.dtype)
        rank_q = plackett_luce(r[:, None, :] * inv_t, x, numerator=r * own.to(r.dtype))
    else:
        rank_q = plackett_luce(r, x)
    k = x.mask.sum(1).to(r.dtype)
    best = x.sums.gather(1, x.best[:, None]).squeeze(1)
    sft_q = sft_weight * (k - 1) ** 2 * -best  # the SUM of log-probs, as the authors' code
    return finish(x, rank_q, sft_q, r, normalizer)


class DPOPL(RankingObjective):
    """`--loss dpo-pl`: listwise DPO, the Plackett-Luce model over each query's ranking."""

    name = "dpo-pl"
    needs_reference = True

    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        return dpo_pl_loss(x, beta=self.config.dpo_beta, normalizer=normalizer)


class LiPO(RankingObjective):
    """`--loss lipo`: LiPO-lambda, the Lambda-weighted pairwise logistic loss on DPO's rewards."""

    name = "lipo"
    needs_reference = True

    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        return lipo_loss(x, beta=self.config.lipo_beta, normalizer=normalizer)


class PRO(RankingObjective):
    """`--loss pro`: Preference Ranking Optimisation, no reference model."""

    name = "pro"
    has_sft = True

    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        c = self.config
        return pro_loss(x, sft_weight=c.pro_sft_weight, temperature=c.pro_temperature, normalizer=normalizer)

    def sft_weight(self) -> float:
        return self.config.pro_sft_weight
