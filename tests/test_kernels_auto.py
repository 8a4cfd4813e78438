"""`impl="auto"` (`--kernels auto`): the table rule, and the fallback to the torch path when Triton fails.

On the CPU, under the interpreter, with the CPU admitted as a device where auto considers the fused
kernel (auto.DEVICES), so that the rule and the fallback run as they would on CUDA. A Triton failure
is forced for real: a pinned config whose tile is not a power of two, which Triton itself refuses
at the first launch (the forward's, or the backward's with a good forward).
"""

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from test_token_logprobs import make_inputs

from rrhf_fast.kernels import autotune, rrhf_loss, token_logprobs, token_logprobs_torch

auto = importlib.import_module("rrhf_fast.kernels.auto")
tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

BAD_FWD = triton.Config({"BLOCK_M": 32, "BLOCK_V": 48, "BLOCK_D": 64})  # tl.arange(0, 48): refused
BAD_DLOGITS = triton.Config({"BLOCK_M": 32, "BLOCK_V": 48, "BLOCK_D": 64, "GROUP_M": 4})


@pytest.fixture
def cpu_auto(monkeypatch):
    """auto considers the fused kernel on the CPU (the interpreter), with no failure recorded."""
    monkeypatch.setattr(auto, "DEVICES", ("cuda", "cpu"))
    auto.reset()
    yield
    auto.reset()


def entry(**kw):
    return dict(dict(gpu="cpu", D=32, V=259, M=40, dtype="float32", torch_ms=1.0, triton_ms=2.0), **kw)


def with_table(monkeypatch, *entries):
    monkeypatch.setattr(auto, "table", lambda: tuple(entries))


def test_the_shipped_table_is_empty_so_auto_is_the_fused_kernel_on_cuda():
    data = json.loads(auto.TABLE_PATH.read_text())
    assert data["entries"] == [] and set(data["format"]) >= {"gpu", "D", "V", "M", "dtype", "torch_ms"}
    auto.reset()
    assert auto.choose(torch.device("cuda"), 4096, 128256, 8192, torch.bfloat16) == "triton"
    assert auto.choose(torch.device("cpu"), 4096, 128256, 8192, torch.bfloat16) == "torch"


def test_the_table_rule(monkeypatch, cpu_auto):
    cpu = torch.device("cpu")
    choose = lambda M=40, dtype=torch.float32: auto.choose(cpu, 32, 259, M, dtype)  # noqa: E731
    assert choose() == "triton"  # no entry: the fused kernel
    with_table(monkeypatch, entry())
    assert choose() == "torch"  # measured faster, fits
    assert choose(M=600) == "triton"  # another row-count bucket: no entry
    assert choose(dtype=torch.float16) == "triton"  # another dtype: no entry
    monkeypatch.setenv("RRHF_FAST_AUTO_LOGITS_GIB", str(40 * 259 * 16 / 2**30 * 0.99))
    assert choose() == "triton"  # the torch path's logits do not fit the budget
    monkeypatch.setenv("RRHF_FAST_AUTO_LOGITS_GIB", str(40 * 259 * 16 / 2**30))
    assert choose() == "torch"
    with_table(monkeypatch, entry(torch_ms=3.0))
    assert choose() == "triton"  # measured slower
    with_table(monkeypatch, entry(gpu="NVIDIA H100 80GB HBM3"))
    assert choose() == "triton"  # another GPU's measurement


def test_auto_picks_torch_where_the_table_says_so(monkeypatch, cpu_auto):
    """With an entry, token_logprobs under auto runs the torch path: no Triton launch at all."""
    h, w, rows, tgt, _ = make_inputs(47, 40, 32, 259, torch.float32)
    with_table(monkeypatch, entry())
    launched = []
    monkeypatch.setattr(tlp, "_forward", lambda *a: launched.append(a))
    out = token_logprobs(h, w, rows, tgt, impl="auto")
    assert not launched
    torch.testing.assert_close(out, token_logprobs_torch(h, w, rows, tgt), rtol=0, atol=0)
    with_table(monkeypatch)
    with pytest.raises(TypeError):  # no entry: the fused launcher runs (here a stub returning None)
        token_logprobs(h, w, rows, tgt, impl="auto")
    assert launched


def grads(impl, h, w, rows, tgt, upstream):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = token_logprobs(h, w, rows, tgt, impl=impl)
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_triton_failure_falls_back_to_torch_with_one_warning(cpu_auto, where):
    h, w, rows, tgt, upstream = make_inputs(47, 40, 32, 259, torch.float32)
    expected = grads("torch", h, w, rows, tgt, upstream)
    pins = {"forward": dict(fwd=BAD_FWD), "backward": dict(dlogits=BAD_DLOGITS)}[where]
    with autotune.pinned_configs(**pins):
        with pytest.warns(RuntimeWarning, match="fused Triton kernel failed at its first") as caught:
            got = grads("auto", h, w, rows, tgt, upstream)
        assert len([c for c in caught if "fused Triton kernel failed" in str(c.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call: the torch path, no second warning
            again = grads("auto", h, w, rows, tgt, upstream)
    for a, b, c in zip(got, again, expected, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    assert auto.failed("token_logprobs", torch.device("cpu"))


def test_explicit_triton_raises_and_our_own_errors_are_not_swallowed(cpu_auto, monkeypatch):
    h, w, rows, tgt, _ = make_inputs(47, 40, 32, 259, torch.float32)
    with autotune.pinned_configs(fwd=BAD_FWD), pytest.raises(Exception) as info:
        token_logprobs(h, w, rows, tgt, impl="triton")
    assert auto.is_triton_failure(info.value) and not auto._FAILED

    def broken(*_a):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(tlp, "_forward", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        token_logprobs(h, w, rows, tgt, impl="auto")
    assert not auto._FAILED


def test_auto_table_is_filled_from_the_kernel_benchmark(tmp_path):
    import auto_table

    header = "benchmark,provider,config,dtype,gpu,ms_median,date,commit,status\n"
    rows = [
        "token_logprobs_fwd_bwd,torch,D=4096 V=128256 M=8192,bfloat16,NVIDIA H100,48.0,d1,c1,ok",
        "token_logprobs_fwd_bwd,triton,D=4096 V=128256 M=8192,bfloat16,NVIDIA H100,55.0,d1,c1,ok",
        "token_logprobs_fwd_bwd,liger,D=4096 V=128256 M=8192,bfloat16,NVIDIA H100,50.0,d1,c1,ok",
        "token_logprobs_fwd,torch,D=4096 V=128256 M=8192,bfloat16,NVIDIA H100,9.0,d1,c1,ok",
        "token_logprobs_fwd_bwd,torch,D=2048 V=32000 M=1024,bfloat16,NVIDIA H100,3.0,d1,c1,ok",
        "token_logprobs_fwd_bwd,triton,D=2048 V=32000 M=1024,bfloat16,NVIDIA H100,,d1,c1,error",
        "token_logprobs_fwd_bwd,torch,D=32 V=259 M=16,float32,cpu,0.1,d1,c1,ok",
        "token_logprobs_fwd_bwd,triton,D=32 V=259 M=16,float32,cpu,9.0,d1,c1,ok",
    ]
    (tmp_path / "kernels.csv").write_text(header + "\n".join(rows) + "\n")
    out = tmp_path / "table.json"
    out.write_text(auto.TABLE_PATH.read_text())
    assert auto_table.main([str(tmp_path / "kernels.csv"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["entries"] == [dict(gpu="NVIDIA H100", D=4096, V=128256, M=8192, dtype="bfloat16",
                                    torch_ms=48.0, triton_ms=55.0, source="kernels.csv d1 c1")]  # fmt: skip
    assert "format" in data  # the rest of the file kept


@triton.jit
def _refused_bwd_kernel(TOKEN_RESPONSE, COEF, GRAD_LOGP, M, R, BLOCK: tl.constexpr):
    tl.store(GRAD_LOGP + tl.arange(0, 3), tl.zeros((3,), dtype=tl.float32))  # 3: Triton refuses it


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_rrhf_loss_falls_back_to_torch_too(cpu_auto, monkeypatch, where):
    from test_rrhf_loss import make_batch

    rl = importlib.import_module("rrhf_fast.kernels.rrhf_loss")
    logp, tr, rq, scores, pl = make_batch([3, 2, 4], seed=3)
    logp = logp.float()

    def loss_and_grad(impl):
        x = logp.clone().requires_grad_()
        out = rrhf_loss(x, tr, rq, scores, prompt_len=pl, impl=impl)
        out.loss.backward()
        return out.loss.detach(), x.grad

    expected = loss_and_grad("torch")
    if where == "forward":  # a block of 3 responses: tl.arange(0, 3) is refused at the first launch
        monkeypatch.setattr(rl, "next_power_of_2", lambda n: 3)
    else:
        monkeypatch.setattr(rl, "_rrhf_bwd_kernel", _refused_bwd_kernel)
    with pytest.warns(RuntimeWarning, match="rrhf_loss: the fused Triton kernel failed at its first"):
        got = loss_and_grad("auto")
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert auto.failed("rrhf_loss", torch.device("cpu")) and not auto.failed(
        "token_logprobs", torch.device("cpu")
    )
    with pytest.raises(Exception) as info:
        rrhf_loss(logp.clone().requires_grad_(), tr, rq, scores, prompt_len=pl, impl="triton").loss.backward()
    assert auto.is_triton_failure(info.value)


def test_run_info_names_what_auto_resolves_to(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(auto, "device_name", lambda d: "NVIDIA H100")
    with_table(monkeypatch)
    assert auto.describe("auto", cuda) == "triton" and auto.describe("auto", cpu) == "torch"
    assert auto.describe("torch", cuda) == "torch"
    with_table(monkeypatch, entry(gpu="NVIDIA H100"))
    assert auto.describe("auto", cuda).startswith("auto: triton, torch at the shapes")
    assert auto.describe("triton", cuda) == "triton"
