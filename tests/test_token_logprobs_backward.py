"""token_logprobs backward: the dhidden GEMM paths, fp16 safety, padded dlogits rows, autocast."""

import importlib

import pytest
import torch
from op_probes import Allocations, ScalarReads
from test_token_logprobs import assert_tolerance_rule, make_inputs, run

from rrhf_fast.kernels import token_logprobs, token_logprobs_torch

tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")


def test_dh_addmm_path_equals_triton_fallback(monkeypatch):
    """fp32 dlogits take torch.addmm; the Triton split-K GEMM (the half-precision fallback) must
    give the same dhidden, bit for bit up to fp32 summation order."""
    inputs = make_inputs(13, 29, 40, 1013, torch.float32, seed=4)
    _, dh_addmm, dw_addmm = run(token_logprobs, *inputs, None, impl="triton")
    monkeypatch.setattr(tlp, "accumulate_dh", lambda c, a, b: tlp.mm_accumulate(c, a, b))
    _, dh_triton, dw_triton = run(token_logprobs, *inputs, None, impl="triton")
    assert (dh_addmm - dh_triton).abs().max() <= 1e-6 * dh_addmm.abs().max()
    assert torch.equal(dw_addmm, dw_triton)


def test_dh_out_dtype_call_is_valid_for_half_operands(monkeypatch):
    """The CUDA path, addmm(..., out_dtype=fp32, out=dh_rows), checked on the meta device (the CPU
    backend has no kernel for it): it accumulates into the fp32 buffer in place."""
    monkeypatch.setattr(tlp, "has_out_dtype_mm", lambda device: True)
    dh = torch.empty(64, 96, device="meta")
    dz = torch.empty(64, 320, dtype=torch.bfloat16, device="meta")
    w = torch.empty(320, 96, dtype=torch.bfloat16, device="meta")
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k) or real(*a, **k))
    tlp.accumulate_dh(dh, dz, w)
    assert calls == [dict(out_dtype=torch.float32, out=dh)]


def test_fp16_small_upstream_gradient_loses_only_output_rounding():
    """RRHF's per-token gradients are ~1/(tokens x queries): at 1e-6, g * p (p ~ 1e-3 here) is below
    fp16's smallest subnormal (6e-8) and g * 1 keeps 4 bits. With g folded in after the fp16
    buffer, dhidden and dweight are as close to fp64 as rounding the fp64 result to fp16 is
    (measured: 1.0x and 1.03x that error; the kernel that stored g * (onehot - p): 3.0x and 5.6x)."""
    hidden, weight, rows, targets, upstream = make_inputs(37, 53, 96, 1013, torch.float16, seed=7)
    upstream = upstream * 1e-6
    ref = run(token_logprobs_torch, hidden, weight, rows, targets, upstream.double(), None, torch.float64)
    ours = run(token_logprobs, hidden, weight, rows, targets, upstream, None, impl="triton")
    for name, o, r in (("dhidden", ours[1], ref[1]), ("dweight", ours[2], ref[2])):
        assert o.dtype == torch.float16
        rounding = (r.half().double() - r).abs().max()
        err = (o.double() - r).abs().max()
        assert err <= 1.5 * rounding, f"{name}: error {err:.3g} vs fp16 rounding {rounding:.3g}"


CHUNKINGS = [pytest.param(1013, 300, id="ragged-chunks"), pytest.param(515, 8192, id="one-chunk")]


@pytest.mark.parametrize("V,chunk", CHUNKINGS)
def test_dlogits_rows_are_padded_to_64_elements(monkeypatch, V, chunk):
    """Every chunk, the ragged last one included, hands the GEMMs dlogits rows 64-element aligned
    (the old buffer had the last chunk's odd width as its row stride), with the same results."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", chunk)
    strides, real = [], tlp.accumulate_dh

    def recording(c, a, b):
        strides.append((a.shape[1], a.stride(0)))
        real(c, a, b)

    monkeypatch.setattr(tlp, "accumulate_dh", recording)
    assert_tolerance_rule(*make_inputs(13, 21, 48, V, torch.float16, seed=5), None)
    widths = [min(chunk, V - v0) for v0 in range(0, V, chunk)]
    assert [w for w, _ in strides] == widths
    assert all(s % 64 == 0 and s >= w for w, s in strides), strides


def test_autocast_rounds_fp32_weight_per_tile_without_a_half_copy(monkeypatch):
    """Under autocast the fused path reads the fp32 lm_head and rounds each tile: no [V, D] half copy
    per call (the old weight.to(dtype) made one, held from forward to backward), the same values
    as the half-precision computation, and an fp32 weight gradient. CPU autocast fp16 stands in for
    CUDA bf16 (the interpreter's bf16 dot is wrong)."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", 256)  # the dhidden GEMM rounds [256, D] chunks
    hidden, weight, rows, targets, upstream = make_inputs(37, 53, 96, 1013, torch.float32, seed=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with Allocations() as probe:
        with torch.autocast("cpu", dtype=torch.float16):
            out = token_logprobs(h, w, rows, targets, impl="triton")
        (out * upstream).sum().backward()
    V, D = weight.shape
    assert not [s for s, dt in probe.seen if dt == torch.float16 and s[0] >= V and s[1:] == (D,)], probe.seen
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    half = run(token_logprobs, hidden.half(), weight.half(), rows, targets, upstream, None, impl="triton")
    assert torch.equal(out.detach(), half[0])
    assert (w.grad - half[2].float()).abs().max() <= 1e-3 * half[2].float().abs().max()
    assert (h.grad - half[1].float()).abs().max() <= 1e-3 * half[1].float().abs().max()


def test_cuda_path_reads_nothing_on_the_host_and_answers_nan_for_bad_indices(monkeypatch):
    """With the host checks off (as for CUDA tensors): no scalar read in forward + backward, and a
    target or row out of range (-100 masking) gives a NaN log-prob instead of a device assert."""
    monkeypatch.setattr(tlp, "on_host", lambda t: False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() syncs"))
    hidden, weight, rows, targets, upstream = make_inputs(11, 17, 32, 200, torch.float32)
    targets[3], rows[5] = -100, 11
    h = hidden.clone().requires_grad_()
    with ScalarReads() as reads:
        out = token_logprobs(h, weight, rows, targets, impl="triton")
        (out.nan_to_num() * upstream).sum().backward()
    assert reads.count == 0
    assert out[3].isnan() and out[5].isnan() and out.isnan().sum() == 2
    keep = torch.ones(17, dtype=torch.bool)
    keep[[3, 5]] = False
    ref = token_logprobs_torch(hidden, weight, rows[keep], targets[keep])
    assert (out[keep] - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU: the same properties where they matter (bf16 autocast, CUDA syncs, a live CUDA context).

GPU_SHAPE = (1200, 1031, 1024, 32013)  # N, M, D, V: ragged, four backward chunks


@pytest.mark.gpu
def test_gpu_autocast_bf16_reads_the_fp32_weight_without_a_copy():
    hidden, weight, rows, targets, upstream = make_inputs(
        1200, 1031, 1024, 32013, torch.float32, device="cuda"
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with Allocations() as probe:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = token_logprobs(h, w, rows, targets, impl="triton")
        (out * upstream).sum().backward()
    V, D = weight.shape
    assert not [s for s, dt in probe.seen if dt == torch.bfloat16 and s[0] >= V and s[1:] == (D,)]
    assert w.grad.dtype == torch.float32
    half = run(
        token_logprobs, hidden.bfloat16(), weight.bfloat16(), rows, targets, upstream, None, impl="triton"
    )
    assert (out.detach() - half[0]).abs().max() < 1e-3
    assert (w.grad - half[2].float()).abs().max() <= 1e-2 * half[2].float().abs().max()
    assert (h.grad - half[1].float()).abs().max() <= 1e-2 * half[1].float().abs().max()


@pytest.mark.gpu
def test_gpu_fp16_small_upstream_gradient():
    hidden, weight, rows, targets, upstream = make_inputs(
        1200, 1031, 1024, 32013, torch.float16, device="cuda"
    )
    upstream = upstream * 1e-6
    ref = run(token_logprobs_torch, hidden, weight, rows, targets, upstream.double(), None, torch.float64)
    ours = run(token_logprobs, hidden, weight, rows, targets, upstream, None, impl="triton")
    for name, o, r in (("dhidden", ours[1], ref[1]), ("dweight", ours[2], ref[2])):
        rounding = (r.half().double() - r).abs().max()
        err = (o.double() - r).abs().max()
        assert err <= 2 * rounding, f"{name}: error {err:.3g} vs fp16 rounding {rounding:.3g}"


@pytest.mark.gpu
def test_gpu_no_sync_and_nan_for_bad_indices():
    hidden, weight, rows, targets, upstream = make_inputs(
        1200, 1031, 1024, 32013, torch.bfloat16, device="cuda"
    )
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, rows, targets, impl="triton") * upstream).sum().backward()  # autotune first
    targets[3] = -100
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = token_logprobs(h, weight, rows, targets, impl="triton")
        (out.nan_to_num() * upstream).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out[3].isnan() and out.isnan().sum() == 1  # and the CUDA context is still usable


@pytest.mark.parametrize("softcap", [pytest.param(None, id="fp32"), pytest.param(5.0, id="fp32-softcap")])
def test_cublas_logits_variant_matches_the_fused_kernel(monkeypatch, softcap):
    """RRHF_FAST_DLOGITS=cublas: the chunk's logits from a GEMM, then the Triton epilogue; the same
    gradients as the fused kernel (fp32 here: half operands need CUDA's fp32-output GEMM)."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", 300)
    inputs = make_inputs(13, 21, 48, 1013, torch.float32, seed=8)
    fused = run(token_logprobs, *inputs, softcap, impl="triton")
    monkeypatch.setattr(tlp, "DLOGITS", "cublas")
    calls, real = [], tlp.dlogits_cublas
    monkeypatch.setattr(tlp, "dlogits_cublas", lambda *a: calls.append(a[4].shape) or real(*a))
    split = run(token_logprobs, *inputs, softcap, impl="triton")
    assert len(calls) == 4  # every chunk went through the split path
    for a, b in zip(fused[1:], split[1:], strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
