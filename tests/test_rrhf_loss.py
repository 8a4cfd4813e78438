"""rrhf_loss: Triton kernel vs fp64 reference, and the properties of the RRHF loss itself."""

import importlib
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_probes import ScalarReads

from rrhf_fast.kernels import rrhf_loss, rrhf_loss_torch

rl = importlib.import_module("rrhf_fast.kernels.rrhf_loss")


def make_batch(ks, *, max_len=9, seed=0, score_levels=3):
    """A packed layout: queries with k_g responses each, ragged lengths, integer-valued scores (ties)."""
    g = torch.Generator().manual_seed(seed)
    G = len(ks)
    response_query = torch.repeat_interleave(torch.arange(G), torch.tensor(ks))
    R = response_query.numel()
    lengths = torch.randint(1, max_len + 1, (R,), generator=g)
    token_response = torch.repeat_interleave(torch.arange(R), lengths)
    scores = torch.randint(0, score_levels, (R,), generator=g).float()
    prompt_len = torch.randint(2, 30, (G,), generator=g)
    logp = -torch.rand(token_response.numel(), generator=g, dtype=torch.float64) * 4
    return logp, token_response, response_query, scores, prompt_len


def brute_force(logp, token_response, response_query, scores, prompt_len, lp, wr, ws, mode, red, norm):
    """The definitions of docs/DESIGN.md §4, one query and one pair at a time."""
    total_rank = total_sft = 0.0
    for q in sorted(set(response_query.tolist())):
        resp = [i for i in range(len(scores)) if response_query[i] == q]
        S = {i: float(logp[token_response == i].sum()) for i in resp}
        n = {i: int((token_response == i).sum()) for i in resp}
        L = {i: (int(prompt_len[q]) + max(n.values())) if mode == "official" else n[i] for i in resp}
        p = {i: S[i] / L[i] ** lp for i in resp}
        for i, j in itertools.product(resp, resp):
            if scores[i] < scores[j]:
                total_rank += max(0.0, p[i] - p[j])
        best = max(resp, key=lambda i: (float(scores[i]), -i))
        total_sft += -S[best] if red == "sum" else -S[best] / L[best]
    return total_rank / norm, total_sft / norm


LAYOUTS = [
    pytest.param([1, 3, 5, 2, 4], id="ragged-k"),
    pytest.param([1], id="single-response"),
    pytest.param([6], id="one-query"),
    pytest.param([17, 2], id="k17-needs-block32"),
]
OPTIONS = [
    pytest.param("paper", 1.0, "mean", 1.0, 1.0, None, id="paper-defaults"),
    pytest.param("paper", 0.7, "sum", 1.3, 0.6, 7.0, id="paper-lp0.7-sum-normalizer"),
    pytest.param("official", 1.0, "mean", 1.0, 1.0, None, id="official"),
    pytest.param("official", 2.0, "sum", 0.5, 0.0, 3.0, id="official-lp2-nosft"),
]


@pytest.mark.parametrize("ks", LAYOUTS)
@pytest.mark.parametrize("mode,lp,red,wr,ws,norm", OPTIONS)
def test_triton_matches_fp64_reference(ks, mode, lp, red, wr, ws, norm):
    logp, tr, rq, scores, pl = make_batch(ks, seed=len(ks))
    kw = dict(prompt_len=pl, length_penalty=lp, rank_weight=wr, sft_weight=ws, mode=mode, sft_reduction=red)
    kw["normalizer"] = norm
    ref_logp = logp.clone().requires_grad_()
    ref = rrhf_loss_torch(ref_logp, tr, rq, scores, pl, lp, wr, ws, mode, red, norm)
    ours_logp = logp.float().requires_grad_()
    ours = rrhf_loss(ours_logp, tr, rq, scores, impl="triton", **kw)
    for name, a, b in zip(ours._fields, ours, ref, strict=True):
        assert a.dtype == torch.float32, name
        assert (a.double() - b).abs().max() < 1e-5, name
    # Non-uniform upstream gradients on every differentiable output.
    (ref.loss * 0.7 + ref.rank_loss * 1.9 - ref.sft_loss * 0.4).backward()
    (ours.loss * 0.7 + ours.rank_loss * 1.9 - ours.sft_loss * 0.4).backward()
    assert (ours_logp.grad.double() - ref_logp.grad).abs().max() < 1e-6
    assert ours.response_scores.requires_grad is False


@pytest.mark.parametrize("mode,lp,red,wr,ws,norm", OPTIONS)
def test_reference_equals_brute_force_double_loop(mode, lp, red, wr, ws, norm):
    logp, tr, rq, scores, pl = make_batch([1, 3, 5, 2, 4], seed=5)
    out = rrhf_loss_torch(logp, tr, rq, scores, pl, lp, wr, ws, mode, red, norm)
    rank, sft = brute_force(logp, tr, rq, scores, pl, lp, wr, ws, mode, red, norm or len(pl))
    assert out.rank_loss.item() == pytest.approx(rank, abs=1e-12)
    assert out.sft_loss.item() == pytest.approx(sft, abs=1e-12)
    assert out.loss.item() == pytest.approx(wr * rank + ws * sft, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    ks=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
    levels=st.integers(1, 4),
    official=st.booleans(),
)
def test_triton_matches_reference_on_random_layouts(ks, seed, levels, official):
    logp, tr, rq, scores, pl = make_batch(ks, seed=seed, score_levels=levels)
    mode = "official" if official else "paper"
    a = logp.float().requires_grad_()
    b = logp.clone().requires_grad_()
    ours = rrhf_loss(a, tr, rq, scores, prompt_len=pl, mode=mode, impl="triton")
    ref = rrhf_loss_torch(b, tr, rq, scores, pl, mode=mode)
    ours.loss.backward()
    ref.loss.backward()
    assert abs(ours.loss.item() - ref.loss.item()) < 1e-5
    assert (a.grad.double() - b.grad).abs().max() < 1e-6


def permute_query(logp, tr, rq, scores, perm):
    """Reorder the responses of a single-query batch, repacking tokens so the layout stays contiguous."""
    parts = [logp[tr == i] for i in perm]
    new_tr = torch.repeat_interleave(torch.arange(len(perm)), torch.tensor([len(p) for p in parts]))
    return torch.cat(parts), new_tr, rq, scores[list(perm)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_permutation_invariance_within_a_query(impl):
    logp, tr, rq, scores, pl = make_batch([5], seed=11)
    base = rrhf_loss(logp.float(), tr, rq, scores, prompt_len=pl, impl=impl)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        lp2, tr2, rq2, sc2 = permute_query(logp, tr, rq, scores, perm)
        out = rrhf_loss(lp2.float(), tr2, rq2, sc2, prompt_len=pl, impl=impl)
        assert out.rank_loss.item() == pytest.approx(base.rank_loss.item(), abs=1e-6)
        # The SFT term follows the best response wherever it moved (unique maximum here).
        if (scores == scores.max()).sum() == 1:
            assert out.sft_loss.item() == pytest.approx(base.sft_loss.item(), abs=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ties_and_single_responses_add_no_rank_loss(impl):
    logp, tr, rq, _, pl = make_batch([4, 1, 3], seed=2)
    equal = torch.full((rq.numel(),), 0.5)
    out = rrhf_loss(logp.float(), tr, rq, equal, prompt_len=pl, impl=impl)
    assert out.rank_loss.item() == 0.0
    # The first response of each query is "best" on a tie: sft is its token-mean NLL.
    firsts = [0, 4, 5]
    expect = sum(-logp[tr == i].mean().item() for i in firsts) / 3
    assert out.sft_loss.item() == pytest.approx(expect, abs=1e-6)
    single = rrhf_loss(logp[tr == 4].float(), torch.zeros(int((tr == 4).sum()), dtype=torch.long),
                       torch.zeros(1, dtype=torch.long), torch.tensor([3.0]), impl=impl)  # fmt: skip
    assert single.rank_loss.item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rank_loss_is_nonnegative_and_zero_when_order_agrees(impl):
    logp, tr, rq, scores, pl = make_batch([6, 3], seed=8, score_levels=100)
    out = rrhf_loss(logp.float(), tr, rq, scores, prompt_len=pl, impl=impl)
    assert out.rank_loss.item() >= 0.0
    # Give each response the log-prob its reward rank deserves: then p is ordered like r.
    order_logp = torch.empty_like(logp)
    for i in range(rq.numel()):
        order_logp[tr == i] = -10.0 + scores[i].item() / 100
    agreed = rrhf_loss(order_logp.float(), tr, rq, scores, prompt_len=pl, impl=impl)
    assert agreed.rank_loss.item() == 0.0


def test_official_mode_divides_by_padded_label_length():
    # One query, prompt of 5 tokens, responses of 2 and 4 tokens: L = 5 + 4 = 9 for both.
    logp = torch.tensor([-1.0, -1.0, -0.5, -0.5, -0.5, -0.5])
    tr = torch.tensor([0, 0, 1, 1, 1, 1])
    rq = torch.tensor([0, 0])
    scores = torch.tensor([1.0, 0.0])
    for impl in ("torch", "triton"):
        out = rrhf_loss(logp, tr, rq, scores, prompt_len=torch.tensor([5]), mode="official", impl=impl)
        assert out.response_scores.tolist() == pytest.approx([-2.0 / 9, -2.0 / 9])
        assert out.sft_loss.item() == pytest.approx(2.0 / 9)
        paper = rrhf_loss(logp, tr, rq, scores, impl=impl)
        assert paper.response_scores.tolist() == pytest.approx([-1.0, -0.5])
        assert paper.rank_loss.item() == pytest.approx(0.5)  # r_1 < r_0 but p_1 > p_0


def test_reference_gradcheck():
    logp, tr, rq, scores, pl = make_batch([3, 4], seed=4, score_levels=10)
    logp = logp.requires_grad_()
    for mode in ("paper", "official"):
        assert torch.autograd.gradcheck(
            lambda x, m=mode: rrhf_loss_torch(x, tr, rq, scores, pl, 0.8, 1.0, 0.5, m).loss, (logp,)
        )


def test_errors():
    logp, tr, rq, scores, pl = make_batch([2, 3])
    with pytest.raises(ValueError, match="prompt_len"):
        rrhf_loss(logp, tr, rq, scores, mode="official")
    with pytest.raises(ValueError, match="mode"):
        rrhf_loss(logp, tr, rq, scores, mode="best")
    with pytest.raises(ValueError, match="sft_reduction"):
        rrhf_loss(logp, tr, rq, scores, sft_reduction="max")
    with pytest.raises(ValueError, match="must match"):
        rrhf_loss(logp[:-1], tr, rq, scores)
    missing = tr.clone()
    missing[missing == 1] = 0  # response 1 has no tokens
    with pytest.raises(ValueError, match="at least one token"):
        rrhf_loss_torch(logp, missing, rq, scores)
    with pytest.raises(ValueError, match="response 1 has none"):
        rrhf_loss(logp.float(), missing, rq, scores, impl="triton")
    with pytest.raises(ValueError, match="non-decreasing"):
        rrhf_loss(logp.float(), tr.flip(0), rq, scores, impl="triton")
    with pytest.raises(ValueError, match="response_query must lie in"):
        rrhf_loss(logp.float(), tr, rq + 5, scores, prompt_len=pl, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_scores_are_refused(impl, bad):
    # Before: the triton path returned a finite loss, the torch path an IndexError (NaN) or a loss (inf).
    logp, tr, rq, scores, _ = make_batch([2, 3])
    scores[3] = bad
    with pytest.raises(ValueError, match=f"response 3 has score {bad}"):
        rrhf_loss(logp.float(), tr, rq, scores, impl=impl)


def device_layouts():
    """Layouts the fused kernel cannot take, built so that only the device-side checks see them."""
    logp, tr, rq, scores, pl = make_batch([2, 3, 1], seed=6)
    missing = tr.clone()
    missing[missing == 1] = 0
    swapped = tr.clone()
    swapped[[0, -1]] = swapped[[-1, 0]]  # a token of the last response at the front
    nan_score = scores.clone()
    nan_score[4] = float("nan")
    return {
        "tokens-out-of-order": (logp, swapped, rq, scores, pl, 3),
        "response-without-tokens": (logp, missing, rq, scores, pl, 3),
        "responses-out-of-order": (logp, tr, rq.flip(0), scores, pl, 3),
        "k-max-too-small": (logp, tr, rq, scores, pl, 1),
        "nan-score": (logp, tr, rq, nan_score, pl, 3),
        "query-id-too-large": (logp, tr, rq + 1, scores, pl, 3),
    }


@pytest.mark.parametrize("case", list(device_layouts()))
def test_device_checks_answer_nan_without_sync_or_assert(monkeypatch, case):
    """What CUDA tensors get (no host check there): the loss and the gradient are NaN, never an assert."""
    monkeypatch.setattr(rl, "on_host", lambda t: False)
    logp, tr, rq, scores, pl, k_max = device_layouts()[case]
    x = logp.float().requires_grad_()
    out = rrhf_loss(x, tr, rq, scores, prompt_len=pl, k_max=k_max, impl="triton")
    out.loss.backward()
    assert out.loss.isnan() and out.rank_loss.isnan() and out.sft_loss.isnan()
    good = rrhf_loss(logp.float(), *make_batch([2, 3, 1], seed=6)[1:4], prompt_len=pl, k_max=3, impl="triton")
    assert good.loss.isfinite()


@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_no_host_sync_with_k_max(monkeypatch, official):
    """The CUDA path (host checks off) reads no tensor value on the host when given k_max (the old
    one synced twice: bincount's output size and int(resp_counts.max()))."""
    monkeypatch.setattr(rl, "on_host", lambda t: False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() syncs"))
    logp, tr, rq, scores, pl = make_batch([2, 5, 1, 3], seed=3)
    x = logp.float().requires_grad_()
    mode = "official" if official else "paper"
    with ScalarReads() as reads:
        out = rrhf_loss(x, tr, rq, scores, prompt_len=pl, mode=mode, k_max=5, impl="triton")
        out.loss.backward()
    assert reads.count == 0
    ref = rrhf_loss_torch(logp, tr, rq, scores, pl, mode=mode)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    with ScalarReads() as reads:
        rrhf_loss(x, tr, rq, scores, prompt_len=pl, mode=mode, impl="triton")
    assert reads.count == 1  # without k_max: one read, documented


@pytest.mark.gpu
def test_gpu_matches_reference():
    logp, tr, rq, scores, pl = make_batch([8] * 64 + [1, 3, 30], seed=9)
    a = logp.float().cuda().requires_grad_()
    b = logp.clone().requires_grad_()
    ours = rrhf_loss(a, tr.cuda(), rq.cuda(), scores.cuda(), prompt_len=pl.cuda(), mode="official")
    ref = rrhf_loss_torch(b, tr, rq, scores, pl, mode="official")
    ours.loss.backward()
    ref.loss.backward()
    assert abs(ours.loss.item() - ref.loss.item()) < 1e-5
    assert (a.grad.cpu().double() - b.grad).abs().max() < 1e-6


@pytest.mark.gpu
def test_gpu_no_sync_with_k_max_and_nan_for_a_bad_layout():
    logp, tr, rq, scores, pl = make_batch([8] * 64 + [1, 3, 30], seed=9)
    a = logp.float().cuda().requires_grad_()
    tr, rq, scores, pl = tr.cuda(), rq.cuda(), scores.cuda(), pl.cuda()
    rrhf_loss(a, tr, rq, scores, prompt_len=pl, k_max=30).loss.backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rrhf_loss(a, tr, rq, scores, prompt_len=pl, mode="official", k_max=30)
        out.loss.backward()
        bad = rrhf_loss(a, tr.flip(0), rq, scores, prompt_len=pl, k_max=30)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.loss.isfinite() and bad.loss.isnan()  # no device assert: the context lives on
