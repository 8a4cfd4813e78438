"""The fused kernels as custom ops: fake kernels allocate what the real launchers allocate, the ops
run on fake and meta tensors, autograd sees one node each, torch.compile keeps them in one graph."""

import gc
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from triton.runtime import interpreter

from rrhf_fast.kernels import ops, rrhf_loss, token_logprobs
from rrhf_fast.planning.memtrack import MemoryTracker

tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
rl = importlib.import_module("rrhf_fast.kernels.rrhf_loss")
TORCH_THREADS = 1


@pytest.fixture
def launches_unseen(monkeypatch):
    """The Triton interpreter copies a kernel's arguments to run it, which a GPU launch never does:
    hide its allocations from the tracker (the launch itself allocates nothing on a GPU)."""
    run = interpreter.GridExecutor.__call__

    def quiet(self, *args, **kwargs):
        with _disable_current_modes():
            out = run(self, *args, **kwargs)
            gc.collect()  # it leaves its copies in reference cycles, which would outlive the launch
        return out

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", quiet)


@pytest.fixture
def device_path(monkeypatch):
    """Fake tensors take the CUDA path of the public functions (no host checks: they hold no values;
    clamped indices and a validity mask instead): the real run takes it too, to be compared."""
    monkeypatch.setattr(tlp, "on_host", lambda t: False)
    monkeypatch.setattr(rl, "on_host", lambda t: False)


def token_logprobs_step(N, D, V, M, dtype, softcap, frozen, autocast=None):
    torch.manual_seed(0)
    w_dtype = torch.float32 if autocast else dtype  # autocast: an fp32 lm_head read as half
    hidden = torch.randn(N, D, dtype=dtype, requires_grad=frozen != "hidden")
    weight = (torch.randn(V, D) * 0.1).to(w_dtype).requires_grad_(frozen != "weight")
    rows, targets = torch.randint(0, N, (M,)), torch.randint(0, V, (M,))
    with MemoryTracker(inline=ops.BODIES, record=True) as tracker:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logp = token_logprobs(hidden, weight, rows, targets, softcap=softcap, impl="triton")
        tracker.phase = "backward"
        (logp * torch.linspace(-1, 1, M)).sum().backward()
    return tracker.report(), logp


def rrhf_step(official):
    logp = torch.randn(20, requires_grad=True)
    token_response = torch.tensor([0] * 3 + [1] * 3 + [2] * 4 + [3] * 2 + [4] * 4 + [5] * 4)
    response_query = torch.tensor([0, 0, 0, 1, 1, 1])
    scores, prompt_len = torch.tensor([1.0, 2, 3, 1, 3, 2]), torch.tensor([4, 5])
    mode = "official" if official else "paper"
    with MemoryTracker(inline=ops.BODIES, record=True) as tracker:
        out = rrhf_loss(logp, token_response, response_query, scores, prompt_len=prompt_len, mode=mode,
                        rank_weight=0.7, k_max=3, impl="triton")  # fmt: skip
        tracker.phase = "backward"
        out.loss.backward()
    return tracker.report(), out


TLP_CASES = [
    pytest.param(37, 32, 300, 29, torch.float32, None, None, None, id="fp32-ragged"),
    pytest.param(16, 24, 257, 40, torch.float16, 30.0, None, None, id="fp16-softcap-repeated-rows"),
    pytest.param(9, 16, 100, 7, torch.float32, None, "weight", None, id="frozen-weight"),
    pytest.param(9, 16, 100, 7, torch.float32, None, "hidden", None, id="frozen-hidden"),
    pytest.param(12, 16, 300, 10, torch.float32, None, None, torch.float16, id="autocast-fp32-weight"),
]


def assert_same_allocations(fake, real):
    assert [(a.shape, a.dtype, a.phase) for a in fake.allocations] == [
        (a.shape, a.dtype, a.phase) for a in real.allocations
    ]
    assert (fake.peak_bytes, fake.peak_phase) == (real.peak_bytes, real.peak_phase)


@pytest.mark.parametrize("N,D,V,M,dtype,softcap,frozen,autocast", TLP_CASES)
def test_token_logprobs_fake_allocates_what_the_kernel_allocates(
    launches_unseen, device_path, monkeypatch, N, D, V, M, dtype, softcap, frozen, autocast
):
    if autocast:
        monkeypatch.setattr(tlp, "VOCAB_CHUNK", 128)  # chunks of [128, D]: apart from [V, D]
    real, _ = token_logprobs_step(N, D, V, M, dtype, softcap, frozen, autocast)
    with FakeTensorMode():
        fake, logp = token_logprobs_step(N, D, V, M, dtype, softcap, frozen, autocast)
    assert isinstance(logp, FakeTensor)
    assert_same_allocations(fake, real)
    # The workspace is there: the dlogits buffer [M, chunk rounded up to 64] in the input dtype,
    # the forward's [2, M] split LSEs (2 splits on the CPU).
    half = autocast or dtype
    chunk = tlp._vocab_chunk(M, V, torch.tensor([], dtype=half).element_size())
    backward = [(a.shape, a.dtype) for a in fake.allocations if a.phase == "backward"]
    assert ((M, tlp.dz_row_stride(chunk)), half) in backward
    assert ((2, M), torch.float32) in [(a.shape, a.dtype) for a in fake.allocations if a.phase == "forward"]
    if frozen != "weight":  # g * hidden[rows] for the dweight GEMM
        assert ((M, D), half) in backward
    if autocast:  # the [chunk, D] rounded weight rows; the weight's gradient in fp32, not [V, D] half
        assert ((chunk, D), half) in backward and ((V, D), torch.float32) in backward
        assert ((V, D), half) not in backward


def test_cublas_variant_logits_buffer_is_in_the_plan(launches_unseen, device_path, monkeypatch):
    """RRHF_FAST_DLOGITS=cublas adds the fp32 logits buffer [M, stride] (fp32 inputs on the CPU)."""
    monkeypatch.setattr(tlp, "DLOGITS", "cublas")
    real, _ = token_logprobs_step(20, 16, 300, 20, torch.float32, None, None)
    with FakeTensorMode():
        fake, _ = token_logprobs_step(20, 16, 300, 20, torch.float32, None, None)
    assert_same_allocations(fake, real)
    shapes = [a.shape for a in fake.allocations if a.phase == "backward"]
    assert shapes.count((20, tlp.dz_row_stride(300))) == 2  # the dlogits buffer and the logits


def test_vocab_chunk_buffer_is_in_the_plan(launches_unseen, device_path, monkeypatch):
    """A smaller chunk cap must show in both (the fake reads the launcher's own chunk rule)."""
    monkeypatch.setattr(tlp, "VOCAB_CHUNK", 256)
    real, _ = token_logprobs_step(20, 16, 600, 20, torch.float32, None, None)
    with FakeTensorMode():
        fake, _ = token_logprobs_step(20, 16, 600, 20, torch.float32, None, None)
    assert (20, 256) in [a.shape for a in fake.allocations]
    assert fake.peak_bytes == real.peak_bytes


@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_rrhf_loss_fake_allocates_what_the_kernel_allocates(launches_unseen, device_path, official):
    real, out = rrhf_step(official)
    with FakeTensorMode():
        fake, _ = rrhf_step(official)
    assert [(a.shape, a.dtype, a.phase) for a in fake.allocations] == [
        (a.shape, a.dtype, a.phase) for a in real.allocations
    ]
    assert fake.peak_bytes == real.peak_bytes
    assert ((3,), torch.int32) in [(a.shape, a.dtype) for a in fake.allocations]  # offsets [G + 1]
    assert torch.isfinite(out.loss)


def test_one_autograd_node_each():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    rows, targets = torch.arange(5), torch.tensor([1, 2, 3, 4, 10])
    logp = token_logprobs(hidden, weight, rows, targets, impl="triton")
    assert "rrhf_fast_token_logprobs" in type(logp.grad_fn).__name__
    assert {type(f).__name__ for f, _ in logp.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
    out = rrhf_loss(logp, torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0]), torch.tensor([0.0, 1.0]),
                    impl="triton")  # fmt: skip
    assert "rrhf_fast_rrhf_loss" in type(out.loss.grad_fn).__name__
    assert out.loss.grad_fn.next_functions[0][0] is logp.grad_fn


def test_ops_run_on_the_meta_device():
    hidden = torch.empty(4096, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(128256, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    rows = torch.empty(4000, device="meta", dtype=torch.int64)
    logp, lse = torch.ops.rrhf_fast.token_logprobs(hidden, weight, rows, rows, None)
    assert lse.shape == (4000,) and not lse.requires_grad
    logp.sum().backward()
    assert logp.shape == (4000,) and logp.dtype == torch.float32
    assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
    assert weight.grad.shape == weight.shape and weight.grad.device.type == "meta"


class TinyHead(torch.nn.Module):
    """Embedding -> MLP -> fused log-probs: a model forward with the op inside."""

    def __init__(self, vocab=67, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, rows, targets):
        hidden = self.mlp(self.embed(ids))
        return token_logprobs(hidden, self.head.weight, rows, targets, impl="triton")


@pytest.mark.slow  # 17 s on 2 cores: inductor compiles forward and backward
def test_compiled_forward_matches_eager():
    torch.manual_seed(0)
    model = TinyHead()
    ids, rows = torch.randint(0, 67, (13,)), torch.arange(12)
    targets = ids[1:]
    upstream = torch.linspace(-1, 2, 12)

    def run(fn):
        model.zero_grad()
        logp = fn(ids, rows, targets)
        (logp * upstream).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters()]

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, fullgraph=True, backend="inductor"))  # fullgraph: no graph break
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
