"""Pre-flight for the first GPU run, on the CPU: what the GPU machine would otherwise find first.

- the dhidden / dweight GEMMs with out_dtype=fp32, probed once per device, and both branches of the
  backward (the cuBLAS calls and the Triton fallback) with the probe's answer forced;
- every real autotune config's tile sizes through the interpreter (the CPU tests otherwise run
  small tiles only), forward and backward, against the fp64 reference;
- the CUDA launch grids at the headline shape (M = 8192, D = 4096, V = 128256) on an H100 and an
  H200: within CUDA's limits and covering the vocabulary;
- RRHF_FAST_AUTOTUNE, the option that trims the autotune lists for a first run.
"""

import importlib

import pytest
import torch
import triton
from test_token_logprobs import assert_tolerance_rule, make_inputs, run

from rrhf_fast.kernels import autotune, token_logprobs
from rrhf_fast.kernels import utils as kutils
from rrhf_fast.kernels.utils import forward_grid

tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")

HEADLINE = dict(M=8192, D=4096, V=128256)
GPUS = [
    pytest.param(132, 50 << 20, id="h100"),
    pytest.param(132, 60 << 20, id="h200"),  # torch reports 60 MB of L2 on this workplace's H200
]


# ---------------------------------------------------------------------------------------------
# The out_dtype GEMMs: the probe, and both branches of the backward


def emulate_out_dtype(monkeypatch) -> list[str]:
    """torch.addmm / torch.mm with out_dtype=fp32 as cuBLAS computes them (half operands, fp32
    products and output), for the CPU backend, which has no kernel for them. Returns the call log."""
    calls: list[str] = []
    addmm, mm = torch.addmm, torch.mm

    def fake_addmm(c, a, b, *, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return addmm(c, a, b, out=out, **kw) if out is not None else addmm(c, a, b, **kw)
        calls.append(f"addmm {a.dtype}")
        return addmm(c, a.to(out_dtype), b.to(out_dtype), out=out)

    def fake_mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b, out=out) if out is not None else mm(a, b)
        calls.append(f"mm {a.dtype}")
        return mm(a.to(out_dtype), b.to(out_dtype), out=out) if out is not None else mm(a.float(), b.float())

    monkeypatch.setattr(torch, "addmm", fake_addmm)
    monkeypatch.setattr(torch, "mm", fake_mm)
    return calls


def count_calls(monkeypatch, name: str) -> list[str]:
    """Log each call of token_logprobs' module-level function `name` (its first argument)."""
    calls, real = [], getattr(tlp, name)

    def logged(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(tlp, name, logged)
    return calls


def test_probe_sees_the_cpu_backend_refuse_out_dtype():
    """The CPU backend declares the overloads and has no kernel for them: a real refusal, which the
    probe must answer with False and one warning naming the error, not raise."""
    with pytest.warns(UserWarning, match="out_dtype=float32 do not run on cpu.*NotImplementedError"):
        assert kutils.probe_out_dtype_mm(torch.device("cpu")) is False


def test_probe_checks_the_result(monkeypatch):
    emulate_out_dtype(monkeypatch)
    assert kutils.probe_out_dtype_mm(torch.device("cpu")) is True
    wrong = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: wrong(a, b, **kw) * 2)
    with pytest.warns(UserWarning, match="wrong result"):
        assert kutils.probe_out_dtype_mm(torch.device("cpu")) is False


def test_has_out_dtype_mm_forced_probed_and_planned(monkeypatch):
    monkeypatch.delenv("RRHF_FAST_OUT_DTYPE_MM", raising=False)
    assert kutils.has_out_dtype_mm(torch.device("cpu")) is False
    if not torch.cuda.is_available():  # a fake CUDA device (rrhf-fast plan): the declared path
        assert kutils.has_out_dtype_mm(torch.device("cuda")) is kutils._OUT_DTYPE_DECLARED
    for forced in (False, True):
        monkeypatch.setenv("RRHF_FAST_OUT_DTYPE_MM", str(int(forced)))
        assert kutils.has_out_dtype_mm(torch.device("cpu")) is forced


@pytest.mark.parametrize("softcap", [pytest.param(None, id="plain"), pytest.param(5.0, id="softcap")])
def test_backward_both_branches_of_the_probe_fp16(monkeypatch, softcap):
    """Probe refused: dhidden through the Triton GEMM and dweight through a half product. Probe
    accepted: cuBLAS addmm / mm with an fp32 output for every chunk. Both within the tolerance rule
    of the fp64 reference, and equal to each other up to fp32 summation order."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", 300)  # four chunks, the last one ragged
    inputs = make_inputs(37, 53, 96, 1013, torch.float16, seed=11)
    results = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("RRHF_FAST_OUT_DTYPE_MM", forced)
        with monkeypatch.context() as m:
            calls = emulate_out_dtype(m) if forced == "1" else []
            fallback = count_calls(m, "mm_accumulate")
            assert_tolerance_rule(*inputs, softcap)
            results[forced] = run(token_logprobs, *inputs, softcap, impl="triton")
        if forced == "1":
            assert not fallback and calls.count("addmm torch.float16") == 8  # 4 chunks x 2 runs
            assert calls.count("mm torch.float16") == 0  # fp16 dweight: the weight's own dtype
        else:
            assert len(fallback) == 8
    for name, a, b in zip(("logp", "dhidden", "dweight"), results["0"], results["1"], strict=True):
        assert (a.float() - b.float()).abs().max() <= 2e-3 * b.float().abs().max(), name


# ---------------------------------------------------------------------------------------------
# Every real config's tile sizes through the interpreter


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def config_cases():
    n = max(len(tlp.FWD_CONFIGS), len(tlp.DLOGITS_CONFIGS), len(tlp.MM_CONFIGS))
    for i in range(n):
        fwd = tlp.FWD_CONFIGS[i % len(tlp.FWD_CONFIGS)]
        dl = tlp.DLOGITS_CONFIGS[i % len(tlp.DLOGITS_CONFIGS)]
        mm = tlp.MM_CONFIGS[i % len(tlp.MM_CONFIGS)]
        ids = [i % len(tlp.FWD_CONFIGS), i % len(tlp.DLOGITS_CONFIGS), i % len(tlp.MM_CONFIGS)]
        yield pytest.param(fwd, dl, mm, id="fwd{}-dlogits{}-mm{}".format(*ids))


@pytest.mark.parametrize("fwd, dlogits, mm", list(config_cases()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_real_config_under_the_interpreter(monkeypatch, fwd, dlogits, mm, dtype):
    """M = 130 and D = 80 leave ragged row and depth blocks for every tile; two backward chunks.
    fp16 with the probe refused routes dhidden through the Triton GEMM, so its configs run too."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", 256)
    monkeypatch.setenv("RRHF_FAST_OUT_DTYPE_MM", "0")
    launched = count_calls(monkeypatch, "_launch")
    metas = []  # the meta-parameters each launch's grid was computed with: the tiles that ran

    def recorded(real):
        return lambda *sizes: lambda meta: metas.append(meta) or real(*sizes)(meta)

    for name in ("fwd_grid", "dlogits_grid", "mm_grid"):
        monkeypatch.setattr(tlp, name, recorded(getattr(tlp, name)))
    with autotune.pinned_configs(fwd=fwd, dlogits=dlogits, mm=mm):
        assert_tolerance_rule(*make_inputs(150, 130, 80, 300, dtype, seed=5), None)
    assert {"fwd", "dlogits"} <= set(launched) and ("mm" in launched) == (dtype == torch.float16)
    assert fwd.kwargs in metas and dlogits.kwargs in metas
    assert all(m in (fwd.kwargs, dlogits.kwargs, mm.kwargs) for m in metas)  # never the small tiles


# ---------------------------------------------------------------------------------------------
# CUDA grids at the headline shape

INT32_MAX, GRID_Y_MAX = 2**31 - 1, 65535


@pytest.mark.parametrize("sms, l2", GPUS)
def test_forward_grid_at_the_headline_shape(sms, l2):
    M, D, V = HEADLINE["M"], HEADLINE["D"], HEADLINE["V"]
    splits, group = forward_grid(M, V, D, 2, sms, l2)
    assert group == l2 // 4 // (128 * D * 2)  # 12 row blocks on an H100, 15 on an H200
    for config in tlp.FWD_CONFIGS:
        meta = config.kwargs
        (programs,) = tlp.fwd_grid(M, splits)(meta)
        assert programs == -(-M // meta["BLOCK_M"]) * splits <= INT32_MAX
        # The kernel's split ranges: whole BLOCK_V tiles, together covering V, none empty.
        per_split = triton.cdiv(triton.cdiv(V, splits), meta["BLOCK_V"]) * meta["BLOCK_V"]
        assert splits * per_split >= V and (splits - 1) * per_split < V
        assert splits * M < INT32_MAX  # LSE_PART offsets pid_s * M + m are 32-bit
    assert (splits, group) == ((12, 12) if l2 == 50 << 20 else (splits, 15))
    assert splits * group >= sms  # a wave stays within two groups of row blocks


def test_backward_grids_at_the_headline_shape():
    M, D, V = HEADLINE["M"], HEADLINE["D"], HEADLINE["V"]
    chunk = tlp._vocab_chunk(M, V, 2)
    stride = tlp.dz_row_stride(chunk)
    assert chunk == 8192 and stride == 8192
    last = V - (V // chunk) * chunk
    assert last == 5376 and tlp.dz_row_stride(last) == last
    for config in tlp.DLOGITS_CONFIGS:
        for vc in (chunk, last):
            (programs,) = tlp.dlogits_grid(M, vc)(config.kwargs)
            assert programs == -(-M // config.kwargs["BLOCK_M"]) * -(-vc // config.kwargs["BLOCK_V"])
            assert programs <= INT32_MAX
    for config in tlp.MM_CONFIGS:  # the dhidden fallback: [M, D] output tiles
        (programs,) = tlp.mm_grid(M, D)(config.kwargs)
        assert programs == -(-M // config.kwargs["BLOCK_M"]) * -(-D // config.kwargs["BLOCK_N"])
    # The cuBLAS-dlogits variant's epilogue launches a 2-D grid of 32 x 256 tiles: y within 65535.
    grid = (triton.cdiv(M, 32), triton.cdiv(chunk, 256))
    assert grid == (256, 32) and grid[1] <= GRID_Y_MAX
    # The last chunk's first weight row: v0 * D elements, past int32 only beyond V * D = 2**31.
    assert (V - last) * D < INT32_MAX
    # dlogits [M, stride] bf16 128 MiB; the cuBLAS variant's fp32 logits 256 MiB.
    assert M * stride * 2 == 128 << 20


# ---------------------------------------------------------------------------------------------
# RRHF_FAST_AUTOTUNE


def test_autotune_choice_parses_the_option():
    assert autotune.choice("all") == {"fwd": None, "dlogits": None, "mm": None}
    assert autotune.choice("preferred") == {"fwd": [4], "dlogits": [0], "mm": [0]}
    assert autotune.choice("fwd=4,fwd=1,mm=2") == {"fwd": [1, 4], "dlogits": None, "mm": [2]}
    with pytest.raises(ValueError, match="RRHF_FAST_AUTOTUNE='fast'.*expected 'all', 'preferred'"):
        autotune.choice("fast")
    with pytest.raises(ValueError, match="fwd has configs 0..4, not 7"):
        autotune.select("fwd", tlp.FWD_CONFIGS, "fwd=7")
    # The preferred configs are the ones the compile evidence favours (benchmarks/README.md).
    pref = {k: autotune.select(k, getattr(tlp, f"{n}_CONFIGS"), "preferred")[0]
            for k, n in (("fwd", "FWD"), ("dlogits", "DLOGITS"), ("mm", "MM"))}  # fmt: skip
    fwd = pref["fwd"]
    assert (fwd.kwargs["BLOCK_M"], fwd.kwargs["BLOCK_V"], fwd.num_warps) == (128, 256, 16)
    assert (pref["dlogits"].kwargs["BLOCK_M"], pref["dlogits"].kwargs["BLOCK_V"]) == (128, 128)


def test_autotune_option_trims_the_autotuners(monkeypatch):
    monkeypatch.setenv("RRHF_FAST_AUTOTUNE", "preferred")
    try:
        importlib.reload(tlp)
        assert [len(t.configs) for t in (tlp._fwd_tuned, tlp._dlogits_tuned, tlp._mm_acc_tuned)] == [1, 1, 1]
        assert tlp._fwd_tuned.configs[0] is tlp.FWD_CONFIGS[4]
    finally:
        monkeypatch.delenv("RRHF_FAST_AUTOTUNE")
        importlib.reload(tlp)
    assert len(tlp._fwd_tuned.configs) == len(tlp.FWD_CONFIGS)


def test_pinned_configs_restore_and_reject_unknown_kernels():
    with autotune.pinned_configs(fwd=tlp.FWD_CONFIGS[1]):
        with autotune.pinned_configs(fwd=tlp.FWD_CONFIGS[2], mm=tlp.MM_CONFIGS[0]):
            assert autotune.pinned("fwd") is tlp.FWD_CONFIGS[2]
        assert autotune.pinned("fwd") is tlp.FWD_CONFIGS[1] and autotune.pinned("mm") is None
    assert autotune.pinned("fwd") is None
    with pytest.raises(ValueError, match="unknown kernel"):
        with autotune.pinned_configs(epilogue=tlp.FWD_CONFIGS[0]):
            pass


# ---------------------------------------------------------------------------------------------
# On the GPU (the visit's kernel-tests part): the probe's answer there, and both branches on real bf16


@pytest.mark.gpu
def test_gpu_probe_and_both_branches_bf16(monkeypatch):
    """Whatever the probe says on this GPU, the branch it picks passes the tolerance rule, and so
    does the fallback (forced); where out_dtype runs, the two agree up to summation order."""
    accepted = kutils.probe_out_dtype_mm(torch.device("cuda"))
    inputs = make_inputs(1200, 1031, 1024, 32013, torch.bfloat16, device="cuda")
    results = {}
    for forced in ("1", "0") if accepted else ("0",):
        monkeypatch.setenv("RRHF_FAST_OUT_DTYPE_MM", forced)
        with autotune.pinned_configs(mm=tlp.MM_CONFIGS[0]):  # one fallback compile, not three
            assert_tolerance_rule(*inputs, None)
            results[forced] = run(token_logprobs, *inputs, None, impl="triton")
    if accepted:
        for name, a, b in zip(("logp", "dhidden", "dweight"), results["0"], results["1"], strict=True):
            assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max(), name
