"""token_logprobs: the fused Triton path against the fp64 torch reference (interpreter on CPU)."""

import importlib

import pytest
import torch
from op_probes import LargestAllocation

from rrhf_fast.kernels import token_logprobs, token_logprobs_torch

tlp_module = importlib.import_module("rrhf_fast.kernels.token_logprobs")

# Slack added to the same-dtype torch error (STYLE.md's tolerance rule), per dtype, relative to the
# largest reference value (fp32 rounding of values near 100 is ~1e-5 in absolute terms).
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(N, M, D, V, dtype, *, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device, dtype)
    weight = (torch.randn(V, D, generator=g) * scale / D**0.5).to(device, dtype)
    rows = torch.randint(0, N, (M,), generator=g).to(device)
    rows[: min(M, 3)] = 0  # a row shared by several targets, like the last prompt row
    targets = torch.randint(0, V, (M,), generator=g).to(device)
    upstream = torch.randn(M, generator=g).to(device)  # non-uniform per-token gradient
    return hidden, weight, rows, targets, upstream


def run(fn, hidden, weight, rows, targets, upstream, softcap, dtype=None, **kw):
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    out = fn(h, w, rows, targets, softcap=softcap, **kw)
    (out.to(upstream.dtype) * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def assert_tolerance_rule(hidden, weight, rows, targets, upstream, softcap):
    """|ours - ref64| <= |torch_same_dtype - ref64| + slack, for logp, dhidden and dweight."""
    dtype = hidden.dtype
    ref = run(token_logprobs_torch, hidden, weight, rows, targets, upstream.double(), softcap, torch.float64)
    same = run(token_logprobs_torch, hidden, weight, rows, targets, upstream, softcap)
    ours = run(token_logprobs, hidden, weight, rows, targets, upstream, softcap, impl="triton")
    assert ours[0].dtype == torch.float32 and ours[0].shape == targets.shape
    for name, o, s, r in zip(("logp", "dhidden", "dweight"), ours, same, ref, strict=True):
        assert o.dtype == s.dtype and o.shape == s.shape, name
        err = (o.double() - r).abs().max().item()
        bound = (s.double() - r).abs().max().item() + SLACK[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


CASES = [
    pytest.param(37, 53, 96, 1013, torch.float32, None, 1.0, id="ragged-fp32"),
    pytest.param(37, 53, 96, 1013, torch.float16, None, 1.0, id="ragged-fp16"),
    pytest.param(19, 29, 40, 515, torch.float32, 5.0, 60.0, id="softcap-fp32"),
    pytest.param(19, 29, 40, 515, torch.float16, 5.0, 60.0, id="softcap-fp16"),
    pytest.param(3, 1, 16, 17, torch.float32, None, 1.0, id="one-token"),
    pytest.param(5, 70, 24, 100, torch.float32, None, 30.0, id="peaked-softmax-fp32"),
]


@pytest.mark.parametrize("N,M,D,V,dtype,softcap,scale", CASES)
def test_matches_fp64_reference(N, M, D, V, dtype, softcap, scale):
    inputs = make_inputs(N, M, D, V, dtype, scale=scale)
    assert_tolerance_rule(*inputs, softcap)


def test_large_ragged_vocab_spans_several_backward_chunks():
    # V = 32000 + 13 > VOCAB_CHUNK: the backward walks four vocabulary chunks, the last one ragged.
    assert 32013 > 3 * tlp_module.VOCAB_CHUNK
    assert_tolerance_rule(*make_inputs(7, 11, 32, 32013, torch.float32), None)


@pytest.mark.parametrize("chunk", [pytest.param(64, id="chunk64"), pytest.param(320, id="chunk320")])
def test_vocab_chunk_boundaries(monkeypatch, chunk):
    monkeypatch.setattr(tlp_module, "VOCAB_CHUNK", chunk)
    assert_tolerance_rule(*make_inputs(13, 21, 48, 1013, torch.float32, seed=3), 7.0)


def test_tied_embeddings_gradients_add_up():
    """The weight both embeds the inputs and scores the targets: both gradient paths must add."""
    V, D, T = 301, 32, 23
    g = torch.Generator().manual_seed(1)
    emb0 = torch.randn(V, D, generator=g) / D**0.5
    mix = torch.randn(D, D, generator=g) / D**0.5
    ids = torch.randint(0, V, (T,), generator=g)
    rows = torch.arange(T - 1)
    targets = ids[1:]
    upstream = torch.randn(T - 1, generator=g)

    def grads(fn, dtype, **kw):
        emb = emb0.to(dtype).requires_grad_()
        hidden = torch.tanh(emb[ids] @ mix.to(dtype))
        (fn(hidden, emb, rows, targets, **kw).to(dtype) * upstream.to(dtype)).sum().backward()
        return emb.grad.double()

    ref = grads(token_logprobs_torch, torch.float64)
    ours = grads(token_logprobs, torch.float32, impl="triton")
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "frozen", [pytest.param("weight", id="frozen-weight"), pytest.param("hidden", id="frozen-hidden")]
)
def test_only_needed_gradients(frozen):
    hidden, weight, rows, targets, upstream = make_inputs(11, 17, 32, 200, torch.float32)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    (token_logprobs(h, w, rows, targets, impl="triton") * upstream).sum().backward()
    _, ref_dh, ref_dw = run(token_logprobs_torch, hidden, weight, rows, targets, upstream, None)
    if frozen == "weight":
        assert w.grad is None and (h.grad - ref_dh).abs().max() < 1e-5
    else:
        assert h.grad is None and (w.grad - ref_dw).abs().max() < 1e-5


def test_no_tokens():
    hidden, weight, _, _, _ = make_inputs(4, 1, 16, 50, torch.float32)
    h = hidden.requires_grad_()
    empty = torch.zeros(0, dtype=torch.long)
    out = token_logprobs(h, weight, empty, empty, impl="triton")
    out.sum().backward()
    assert out.shape == (0,) and h.grad.abs().sum() == 0


def test_int32_indices():
    hidden, weight, rows, targets, upstream = make_inputs(9, 14, 32, 77, torch.float32)
    a = token_logprobs(hidden, weight, rows.int(), targets.int(), impl="triton")
    b = token_logprobs_torch(hidden, weight, rows, targets)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize(
    "fn,expect_mv",
    [
        pytest.param(token_logprobs, False, id="triton-never-allocates-MxV"),
        pytest.param(token_logprobs_torch, True, id="reference-does"),
    ],
)
def test_forward_backward_never_allocates_logits(fn, expect_mv):
    M, D, V = 64, 16, 32013  # M > D: the weight [V, D] is smaller than [M, V]
    hidden, weight, rows, targets, upstream = make_inputs(40, M, D, V, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    kw = {"impl": "triton"} if fn is token_logprobs else {}
    with LargestAllocation() as probe:
        (fn(h, w, rows, targets, **kw) * upstream).sum().backward()
    assert (probe.largest >= M * V * 4) == expect_mv, probe.largest


def test_input_errors(monkeypatch):
    hidden, weight, rows, targets, _ = make_inputs(4, 3, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden[:, :8], weight, rows, targets, impl="triton")
    with pytest.raises(ValueError, match="int32 or int64"):
        token_logprobs(hidden, weight, rows.float(), targets, impl="triton")
    with pytest.raises(ValueError, match="bfloat16"):
        token_logprobs(hidden, weight.bfloat16(), rows, targets, impl="triton")
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(hidden, weight, rows, targets, softcap=0.0)
    masked, beyond = targets.clone(), targets.clone()
    masked[1], beyond[2] = -100, 20
    for impl in ("triton", "torch"):  # the same sentence from both paths, not torch's gather error
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 20\), but position 1 holds -100"):
            token_logprobs(hidden, weight, rows, masked, impl=impl)
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 20\), but position 2 holds 20"):
            token_logprobs(hidden, weight, rows, beyond, impl=impl)
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\)"):
            token_logprobs(hidden, weight, rows + 4, targets, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(hidden, weight, rows, targets, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        token_logprobs(hidden, weight, rows, targets, impl="triton")


def test_reference_gradcheck():
    hidden, weight, rows, targets, _ = make_inputs(5, 7, 6, 11, torch.float64)
    for softcap in (None, 3.0):
        assert torch.autograd.gradcheck(
            lambda h, w, s=softcap: token_logprobs_torch(h, w, rows, targets, softcap=s),
            (hidden.requires_grad_(), weight.requires_grad_()),
        )


# ---------------------------------------------------------------------------------------------
# GPU: bf16 (wrong under the interpreter) and real shapes.

GPU_CASES = [
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.bfloat16, 30.0, id="bf16-softcap"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.float32, None, id="fp32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,softcap", GPU_CASES)
def test_gpu_matches_fp64_reference(dtype, softcap):
    inputs = make_inputs(1200, 1031, 4096, 32013, dtype, scale=4.0, device="cuda")
    assert_tolerance_rule(*inputs, softcap)


@pytest.mark.gpu
def test_gpu_peak_memory_grows_with_md_plus_vd_only():
    """Measured on the first call, autotuning included: autotune_bench allocates no flush buffer and
    no output clones, so the first step's peak is the steady state's (checked on the second call)."""
    M, D, V = 8192, 2048, 128256
    N = M + 100
    hidden, weight, rows, targets, upstream = make_inputs(N, M, D, V, torch.bfloat16, device="cuda")
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    extras = []
    for _ in range(2):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (token_logprobs(h, w, rows, targets, impl="triton") * upstream).sum().backward()
        torch.cuda.synchronize()
        extras.append(torch.cuda.max_memory_allocated() - base)
    logits_bytes = M * V * 2
    ld = tlp_module.dz_row_stride(min(V, tlp_module.VOCAB_CHUNK))
    # dweight (V x D) + dhidden (N x D fp32, then its bf16 copy) + hidden[rows], g * hidden[rows]
    # (bf16) and the fp32 dhidden rows (M x D each) + the padded dlogits chunk (M x ld) + 64 MiB
    # for the small tensors and cuBLAS workspaces.
    budget = V * D * 2 + N * D * 6 + M * D * 8 + M * ld * 2 + (64 << 20)
    assert max(extras) < budget < logits_bytes, (extras, budget, logits_bytes)
    assert extras[0] <= extras[1] + (16 << 20), extras
