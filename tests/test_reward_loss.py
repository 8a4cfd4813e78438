"""rrhf_fast.objectives.reward: BT and listwise losses == a naive fp64 loop over pairs / responses."""

import math

import pytest
import torch

from rrhf_fast.objectives.reward import reward_loss

# Three queries: k = 4 with a tie, k = 3 all different, k = 2 all tied (no pair).
SCORES = [[1.0, 3.0, 1.0, 0.5], [2.0, -1.0, 0.0], [4.0, 4.0]]


def batch(seed=0):
    torch.manual_seed(seed)
    rq = torch.tensor([g for g, row in enumerate(SCORES) for _ in row])
    s = torch.tensor([v for row in SCORES for v in row])
    r = torch.randn(rq.numel(), dtype=torch.float64) * 2
    return r, s, rq


def naive_bt(r, s, rq, margin=0.0, scale=False):
    total = 0.0
    for g in range(len(SCORES)):
        idx = [i for i in range(len(rq)) if rq[i] == g]
        terms = []
        for i in idx:
            for j in idx:
                if s[i] > s[j]:
                    m = margin * (s[i] - s[j]) if scale else margin
                    terms.append(-math.log(1 / (1 + math.exp(-(r[i] - r[j] - m)))))
        total += sum(terms) / len(terms) if terms else 0.0
    return total


def naive_listwise(r, s, rq):
    total = 0.0
    for g in range(len(SCORES)):
        idx = [i for i in range(len(rq)) if rq[i] == g]
        terms = []
        for i in idx:
            if any(s[j] < s[i] for j in idx):
                denominator = sum(math.exp(r[j]) for j in idx if s[j] <= s[i])
                terms.append(-(r[i] - math.log(denominator)))
        total += sum(terms) / len(terms) if terms else 0.0
    return total


def naive_center(r, rq):
    return sum((sum(r[i] for i in range(len(rq)) if rq[i] == g) / len(SCORES[g])) ** 2 for g in range(3))


@pytest.mark.parametrize(
    "margin,scale", [pytest.param(0.0, False, id="plain"), pytest.param(0.5, False, id="margin"),
                     pytest.param(0.5, True, id="scaled-margin")]
)  # fmt: skip
def test_bt_equals_naive_loop(margin, scale):
    r, s, rq = batch()
    r32 = r.float().requires_grad_()
    out = reward_loss(r32, s, rq, 3, kind="bt", margin=margin, margin_scale=scale, normalizer=5.0)
    expected = naive_bt(r.tolist(), s.tolist(), rq.tolist(), margin, scale) / 5.0
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    grad = torch.autograd.functional.jacobian(lambda x: _bt64(x, s, rq, margin, scale) / 5.0, r)
    torch.testing.assert_close(r32.grad.double(), grad, rtol=1e-5, atol=1e-6)


def _bt64(r, s, rq, margin, scale):
    """The naive loop again, in torch fp64 ops so that autograd gives its gradient."""
    total = r.new_zeros(())
    for g in range(len(SCORES)):
        idx = [i for i in range(len(rq)) if rq[i] == g]
        terms = [
            -torch.nn.functional.logsigmoid(r[i] - r[j] - (margin * (s[i] - s[j]) if scale else margin))
            for i in idx
            for j in idx
            if s[i] > s[j]
        ]
        total = total + (sum(terms) / len(terms) if terms else 0.0)
    return total


def test_listwise_equals_naive_loop_and_its_gradient():
    r, s, rq = batch(1)
    r32 = r.float().requires_grad_()
    out = reward_loss(r32, s, rq, 3, kind="listwise")
    expected = naive_listwise(r.tolist(), s.tolist(), rq.tolist()) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    eps, grad = 1e-6, []
    for i in range(r.numel()):  # central differences of the fp64 loop
        up, down = r.clone(), r.clone()
        up[i] += eps
        down[i] -= eps
        grad.append((naive_listwise(up.tolist(), s.tolist(), rq.tolist())
                     - naive_listwise(down.tolist(), s.tolist(), rq.tolist())) / (2 * eps * 3))  # fmt: skip
    torch.testing.assert_close(
        r32.grad.double(), torch.tensor(grad, dtype=torch.float64), rtol=1e-4, atol=1e-6
    )


def test_ties_contribute_nothing_to_bt():
    r, s, rq = batch(2)
    base = reward_loss(r, s, rq, 3, kind="bt").loss
    moved = r.clone()
    moved[7:9] += torch.tensor([5.0, -3.0])  # the all-tied query: its rewards do not matter
    assert reward_loss(moved, s, rq, 3, kind="bt").loss.item() == pytest.approx(base.item(), abs=0)
    tied = r.clone()
    tied[0], tied[2] = -4.0, 6.0  # responses 0 and 2 tie (score 1.0): only their pairs with others count
    only_ties = reward_loss(tied, s, rq, 3, kind="bt").loss.item()
    assert only_ties == pytest.approx(naive_bt(tied.tolist(), s.tolist(), rq.tolist()) / 3, rel=1e-6)


def test_listwise_of_two_is_bt():
    r = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)
    s, rq = torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.tensor([0, 0, 1, 1])
    bt = reward_loss(r, s, rq, 2, kind="bt").loss
    lw = reward_loss(r, s, rq, 2, kind="listwise").loss
    assert lw.item() == pytest.approx(bt.item(), rel=1e-12)


def test_center_penalty_and_margin():
    r, s, rq = batch(3)
    out = reward_loss(r, s, rq, 3, kind="bt", center=0.1, normalizer=4.0)
    assert out.center_loss.item() == pytest.approx(
        0.1 * naive_center(r.tolist(), rq.tolist()) / 4.0, rel=1e-6
    )
    assert out.loss.item() == pytest.approx(out.rm_loss.item() + out.center_loss.item(), rel=1e-6)
    rl, sl = r.tolist(), s.tolist()
    gaps = [[rl[i] - rl[j] for i in range(9) for j in range(9) if rq[i] == rq[j] == g and sl[i] > sl[j]]
            for g in range(3)]  # fmt: skip
    expected = sum(sum(g) / len(g) for g in gaps if g) / 4.0
    assert out.margin.item() == pytest.approx(expected, rel=1e-6)
