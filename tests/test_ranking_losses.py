"""The ranking losses (objectives/ranking.py, listwise.py, pairwise.py, dpo.py's loss types) against naive
fp64 loops written here from each paper's equation, on random queries of 1 to 8 responses with tied
scores: value and gradient. Then the reductions the papers state (k = 2, one response, all tied)."""

import math
import random

import pytest
import torch

from rrhf_fast.data.packing import score_ranks
from rrhf_fast.objectives.dpo import dpo_loss
from rrhf_fast.objectives.listwise import dpo_pl_loss, lipo_loss, pro_loss
from rrhf_fast.objectives.pairwise import orpo_loss, simpo_loss
from rrhf_fast.objectives.ranking import list_inputs, lists_of

TORCH_THREADS = 1


class Case:
    """Random queries: k in 1..8, scores from a few levels (ties), per response S, n, S_ref."""

    def __init__(self, seed: int, queries: int = 12, levels: int = 3, k: tuple[int, int] = (1, 8)):
        rng = random.Random(seed)
        self.scores = [
            [float(rng.randint(0, levels)) * 0.5 for _ in range(rng.randint(*k))] for _ in range(queries)
        ]
        flat = [s for row in self.scores for s in row]
        self.lengths = [rng.randint(1, 12) for _ in flat]
        self.sums = [-rng.uniform(0.05, 2.5) * n for n in self.lengths]
        self.ref = [s + rng.gauss(0, 1.5) for s in self.sums]
        self.query = [q for q, row in enumerate(self.scores) for _ in row]

    def inputs(self, with_ref: bool = True):
        """(ListInputs, the leaf tensor S [R] fp64)."""
        sums = torch.tensor(self.sums, dtype=torch.float64, requires_grad=True)
        ranks = torch.tensor([r for row in self.scores for r in score_ranks(row)])
        lists = lists_of(torch.tensor(self.query), len(self.scores))
        x = list_inputs(sums, torch.tensor(self.lengths), ranks, torch.tensor(self._flat()), lists,
                        torch.tensor(self.ref, dtype=torch.float64) if with_ref else None)  # fmt: skip
        return x, sums

    def _flat(self):
        return [s for row in self.scores for s in row]

    def rows(self):
        """Per query: (scores, S, n, S_ref) lists."""
        start = 0
        for row in self.scores:
            sl = slice(start, start + len(row))
            start += len(row)
            yield row, self.sums[sl], self.lengths[sl], self.ref[sl]


def _logsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def _grad_fd(naive, case, eps=1e-6):
    """Central differences of the naive loss in S (fp64 floats)."""
    out = []
    for i in range(len(case.sums)):
        keep = case.sums[i]
        case.sums[i] = keep + eps
        up = naive(case)
        case.sums[i] = keep - eps
        down = naive(case)
        case.sums[i] = keep
        out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def _mean_over(per_query, counts):
    """Sum of the per-query losses / the queries that count (at least 1)."""
    return sum(per_query) / max(sum(counts), 1)


def _placing_groups(row):
    """Plackett-Luce with grouped ties: for each i beating another, the indices j with score_j <= score_i."""
    beats = [i for i in range(len(row)) if any(s < row[i] for s in row)]
    return [(i, [j for j in range(len(row)) if row[j] <= row[i]]) for i in beats]


def _best(row):
    return row.index(max(row))


# -------------------------------------------------------------------------------------------------
# naive implementations, one per paper equation


def naive_dpo_pl(case, beta=0.1):
    """DPO paper (arXiv 2305.18290) Appendix A.3, the Plackett-Luce objective: -sum over positions of
    log(exp(u_placed) / sum_{not yet placed} exp(u)), u = beta log(pi / pi_ref); ties grouped."""
    losses, counts = [], []
    for row, s, _, ref in case.rows():
        u = [beta * (a - b) for a, b in zip(s, ref, strict=True)]
        terms = [math.log(sum(math.exp(u[j]) for j in pool)) - u[i] for i, pool in _placing_groups(row)]
        losses.append(sum(terms))
        counts.append(bool(terms))
    return _mean_over(losses, counts)


def naive_lipo(case, beta=0.05):
    """LiPO (arXiv 2402.01878) §4, the LiPO-lambda loss: -sum_{psi_i > psi_j} Delta_ij log sigmoid(s_i - s_j),
    Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1, D(tau) = log2(1 + tau), tau the
    position by s (descending, ties: earlier first)."""
    losses, counts = [], []
    for row, s, _, ref in case.rows():
        u = [beta * (a - b) for a, b in zip(s, ref, strict=True)]
        order = sorted(range(len(u)), key=lambda i: (-u[i], i))
        tau = {i: p + 1 for p, i in enumerate(order)}
        total, any_pair = 0.0, False
        for i in range(len(row)):
            for j in range(len(row)):
                if row[i] > row[j]:
                    gain = abs((2 ** row[i] - 1) - (2 ** row[j] - 1))
                    disc = abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                    total += -gain * disc * _logsig(u[i] - u[j])
                    any_pair = True
        losses.append(total)
        counts.append(any_pair)
    return _mean_over(losses, counts)


def naive_pro(case, sft_weight=0.05, temperature=False):
    """PRO (arXiv 2306.17492) §3: -sum_k log(exp(r_k / T_kk) / sum_{i >= k} exp(r_i / T_ki)) + beta L_SFT,
    r = S / n, T_ki = 1 / (psi_k - psi_i), T_kk = min_i T_ki (ties take T_kk; no temperature: T = 1),
    beta = sft_weight (l - 1)^2, L_SFT the best response's NLL (its log-prob sum, as the authors' code).
    Every query counts."""
    losses = []
    for row, s, n, _ in case.rows():
        r = [a / b for a, b in zip(s, n, strict=True)]
        total = 0.0
        for k, pool in _placing_groups(row):
            gaps = {i: row[k] - row[i] for i in pool if row[i] < row[k]}
            own = max(gaps.values()) if temperature else 1.0
            scale = {i: (gaps[i] if temperature else 1.0) if i in gaps else own for i in pool}
            total += math.log(sum(math.exp(r[i] * scale[i]) for i in pool)) - r[k] * own
        b = _best(row)
        total += sft_weight * (len(row) - 1) ** 2 * -s[b]
        losses.append(total)
    return sum(losses) / len(losses)


def _pairs(row, mode):
    b = _best(row)
    return [
        (i, j)
        for i in range(len(row))
        for j in range(len(row))
        if row[i] > row[j] and (mode == "all" or i == b)
    ]


def naive_simpo(case, beta=2.0, gamma=0.5, pairs="all"):
    """SimPO (arXiv 2405.14734) Eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    averaged over a query's pairs; the queries with a pair count."""
    losses, counts = [], []
    for row, s, n, _ in case.rows():
        p = _pairs(row, pairs)
        u = [beta * a / b for a, b in zip(s, n, strict=True)]
        losses.append(sum(-_logsig(u[i] - u[j] - gamma) for i, j in p) / max(len(p), 1))
        counts.append(bool(p))
    return _mean_over(losses, counts)


def naive_orpo(case, lam=0.1, pairs="all"):
    """ORPO (arXiv 2403.07691) Eq. 6-7: L_SFT + lambda * -log sigmoid(log(odds(y_w) / odds(y_l))),
    odds = P / (1 - P), P = exp(mean token log-prob) (Eq. 4); the OR term averaged over a query's pairs."""
    losses = []
    for row, s, n, _ in case.rows():
        p = [math.exp(a / b) for a, b in zip(s, n, strict=True)]
        odds = [math.log(q / (1 - q)) for q in p]
        pr = _pairs(row, pairs)
        ratio = sum(-_logsig(odds[i] - odds[j]) for i, j in pr) / max(len(pr), 1)
        b = _best(row)
        losses.append(-s[b] / n[b] + lam * ratio)
    return sum(losses) / len(losses)


def naive_dpo(case, kind="sigmoid", beta=0.1, eps=0.0):
    """DPO (Eq. 7) on the best vs the worst response; TRL's hinge, ipo (IPO Eq. 17, per token), robust."""
    losses, counts = [], []
    for row, s, n, ref in case.rows():
        if max(row) == min(row):
            losses.append(0.0)
            counts.append(False)
            continue
        w, lo = _best(row), row.index(min(row))
        d = (s[w] - ref[w]) - (s[lo] - ref[lo])
        if kind == "sigmoid":
            v = -_logsig(beta * d)
        elif kind == "hinge":
            v = max(0.0, 1 - beta * d)
        elif kind == "ipo":
            v = ((s[w] - ref[w]) / n[w] - (s[lo] - ref[lo]) / n[lo] - 1 / (2 * beta)) ** 2
        else:
            v = ((1 - eps) * -_logsig(beta * d) - eps * -_logsig(-beta * d)) / (1 - 2 * eps)
        losses.append(v)
        counts.append(True)
    return _mean_over(losses, counts)


# -------------------------------------------------------------------------------------------------
# ours == naive, value and gradient


def _ours(name, x, **kw):
    fns = {"dpo-pl": dpo_pl_loss, "lipo": lipo_loss, "pro": pro_loss, "simpo": simpo_loss, "orpo": orpo_loss}
    return fns[name](x, **kw).loss


CASES = [
    pytest.param("dpo-pl", {}, naive_dpo_pl, True, id="dpo-pl"),
    pytest.param("dpo-pl", {"beta": 0.7}, lambda c: naive_dpo_pl(c, beta=0.7), True, id="dpo-pl-beta0.7"),
    pytest.param("lipo", {}, naive_lipo, True, id="lipo"),
    pytest.param("lipo", {"beta": 0.5}, lambda c: naive_lipo(c, beta=0.5), True, id="lipo-beta0.5"),
    pytest.param("pro", {}, naive_pro, False, id="pro"),
    pytest.param("pro", {"temperature": True}, lambda c: naive_pro(c, temperature=True), False,
                 id="pro-temperature"),
    pytest.param("pro", {"sft_weight": 0.0}, lambda c: naive_pro(c, sft_weight=0.0), False, id="pro-no-sft"),
    pytest.param("simpo", {}, naive_simpo, False, id="simpo-all-pairs"),
    pytest.param("simpo", {"pairs": "best"}, lambda c: naive_simpo(c, pairs="best"), False,
                 id="simpo-best-vs-each"),
    pytest.param("orpo", {}, naive_orpo, False, id="orpo-all-pairs"),
    pytest.param("orpo", {"pairs": "best", "lam": 0.5}, lambda c: naive_orpo(c, 0.5, "best"), False,
                 id="orpo-best"),
]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "kw", "naive", "with_ref"), CASES)
def test_loss_equals_the_naive_paper_equation(name, kw, naive, with_ref, seed):
    case = Case(seed)
    x, sums = case.inputs(with_ref)
    loss = _ours(name, x, **kw)
    assert loss.item() == pytest.approx(naive(case), rel=1e-10, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, sums)
    torch.testing.assert_close(grad, _grad_fd(naive, case), rtol=1e-5, atol=1e-7)


def _dpo_case_tensors(case):
    sums = torch.tensor(case.sums, dtype=torch.float64, requires_grad=True)
    return sums, dict(
        token_response=torch.arange(len(case.sums)),
        response_query=torch.tensor(case.query),
        scores=torch.tensor([r for row in case.scores for r in score_ranks(row)], dtype=torch.float64),
        ref_logps=torch.tensor(case.ref, dtype=torch.float64),
        num_queries=len(case.scores),
        response_len=torch.tensor(case.lengths),
    )


@pytest.mark.parametrize(
    ("kind", "eps"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
)
def test_dpo_loss_types_equal_the_naive_equations(kind, eps):
    case = Case(3)
    sums, kw = _dpo_case_tensors(case)  # one token per response: logp are the sums
    loss = dpo_loss(sums, **kw, beta=0.3, loss_type=kind, label_smoothing=eps).loss
    want = naive_dpo(case, kind, 0.3, eps)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    (grad,) = torch.autograd.grad(loss, sums)
    torch.testing.assert_close(
        grad, _grad_fd(lambda c: naive_dpo(c, kind, 0.3, eps), case), rtol=1e-5, atol=1e-7
    )


# -------------------------------------------------------------------------------------------------
# reductions


def _two(scores=(1.0, 0.0), seed=0):
    case = Case(seed, queries=6, k=(2, 2))
    case.scores = [list(scores) for _ in case.scores]
    return case


def test_dpo_pl_at_k2_is_dpo():
    case = _two()
    x, _ = case.inputs()
    sums, kw = _dpo_case_tensors(case)
    assert dpo_pl_loss(x, beta=0.2).loss.item() == pytest.approx(
        dpo_loss(sums, **kw, beta=0.2).loss.item(), 1e-12
    )


def test_lipo_at_k2_is_its_pairwise_form():
    """k = 2: tau is (1, 2) in some order: Delta = |2^psi_w - 2^psi_l| (1 - 1 / log2 3) times DPO's pair."""
    case = _two((1.5, 0.5))
    x, _ = case.inputs()
    sums, kw = _dpo_case_tensors(case)
    delta = (2**1.5 - 2**0.5) * (1 - 1 / math.log2(3))
    want = delta * dpo_loss(sums, **kw, beta=0.05).loss.item()
    assert lipo_loss(x, beta=0.05).loss.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "shape", [{"k": (1, 1)}, {"levels": 0, "k": (2, 8)}], ids=["one-response", "all-tied"]
)
@pytest.mark.parametrize("name", ["dpo-pl", "lipo", "simpo", "pro", "orpo"])
def test_no_pair_gives_no_ranking_loss(name, shape):
    case = Case(4, queries=5, **shape)
    x, sums = case.inputs()
    out = {"dpo-pl": dpo_pl_loss, "lipo": lipo_loss, "simpo": simpo_loss, "pro": pro_loss, "orpo": orpo_loss}[
        name
    ](x)
    assert out.rank_loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.rank_loss, sums, allow_unused=True, materialize_grads=True)
    assert torch.count_nonzero(grad) == 0
    if name in ("dpo-pl", "lipo", "simpo"):  # no SFT term: nothing at all
        assert out.loss.item() == 0.0
    if name == "pro" and shape["k"] == (1, 1):  # the paper's SFT weight 0.05 (l - 1)^2: 0 for one response
        assert out.loss.item() == 0.0
    if name == "orpo":  # SFT on the first of the best responses, every query
        assert out.sft_loss.item() == pytest.approx(naive_orpo(case), rel=1e-12) and out.sft_loss.item() > 0


def test_equal_scores_form_no_pair_and_share_a_denominator():
    """dpo-pl on scores (1, 1, 0): two terms, each tied best over the whole list; none between the two."""
    case = Case(5, queries=1, k=(3, 3))
    case.scores = [[1.0, 1.0, 0.0]]
    x, _ = case.inputs()
    u = [0.1 * (a - b) for a, b in zip(case.sums, case.ref, strict=True)]
    lse = math.log(sum(math.exp(v) for v in u))
    assert dpo_pl_loss(x).loss.item() == pytest.approx((lse - u[0]) + (lse - u[1]), rel=1e-12)


def test_pairs_best_and_all_agree_at_k2():
    case = _two()
    x, _ = case.inputs(with_ref=False)
    for fn in (simpo_loss, orpo_loss):
        assert fn(x, pairs="all").loss.item() == pytest.approx(fn(x, pairs="best").loss.item(), rel=1e-12)


def test_lists_of_keeps_each_querys_order_in_any_layout():
    lists = lists_of(torch.tensor([1, 0, 1, 2, 0, 1]), 4)
    assert lists.index.tolist() == [[1, 4, 0], [0, 2, 5], [3, 0, 0], [0, 0, 0]]
    assert lists.mask.tolist() == [[True, True, False], [True, True, True], [True, False, False], [False] * 3]
