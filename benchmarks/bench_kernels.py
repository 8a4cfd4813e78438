"""token_logprobs forward and forward+backward, providers side by side.

Script: `python benchmarks/bench_kernels.py [--cpu-smoke] [--providers a,b] [--profile] [--out-dir DIR]`
appends to results/kernels.csv (GPU) or kernels_cpu_smoke.csv and regenerates kernels.md.
pytest-benchmark: `pytest benchmarks/bench_kernels.py` (the issue-3 headline shapes on CUDA, tiny on CPU).

Every provider computes the same thing: log_softmax(hidden[rows] @ weight.T)[m, targets[m]] for M
targets, then (fwd_bwd) backpropagates a non-uniform per-token upstream gradient into hidden and
weight. Third-party kernels take the gathered rows `hidden[rows]`, so their gather and its
scatter-add backward are timed with them. Each non-reference provider is first checked against an
fp64 reference on a small ragged shape and skipped, with the reason in the report, when it is absent
or computes something else (e.g. a backward that only handles a scalar upstream gradient).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch

from rrhf_fast.kernels import token_logprobs, token_logprobs_torch

try:
    import pytest
except ImportError:  # script mode without the dev extras: no pytest-benchmark tests
    pytest = None
# torch.compile last: its two inductor graphs compile for ~20 s each, and the rows of the others
# must not wait behind them (a run cut short by its time limit keeps what it measured).
PROVIDERS = ("torch", "triton", "triton/cublas-dlogits", "liger", "cce", "torch.compile")
MODES = ("fwd", "fwd_bwd")
# Effective FLOPs: forward = the logits matmul; backward recomputes the logits and does
# the two gradient matmuls (dhidden, dweight): 4 matmuls of 2*M*D*V in all.
FLOPS_PER_MDV = {"fwd": 2, "fwd_bwd": 8}
# do_bench's timed window (ms) at the headline shape: a ~55 ms forward+backward is timed ~18 times
# (at 100 ms it was timed once or twice); the sweeps keep 100 ms.
HEADLINE_REP_MS, HEADLINE_WARMUP_MS = 1000.0, 200.0

# The headline shape first (a run cut short by its time limit still has it), then the grid.
GPU_HEADLINE = (4096, 128256, 8192)
GPU_SWEEPS = [(4096, 128256, (8192, 1024, 4096, 16384))] + [
    (d, v, (1024, 4096, 16384))
    for d in (2048, 4096)
    for v in (32000, 128256, 151936)
    if (d, v) != (4096, 128256)
]
SMOKE_SWEEPS = [(32, 259, (16,)), (48, 300, (40,))]  # ragged: D, V, M no multiples of blocks
SMOKE_HEADLINE = (32, 259, 16)

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, D], N > M
    weight: torch.Tensor  # [V, D]
    rows: torch.Tensor  # [M] int64, distinct rows plus ~1/16 repeats (shared prompt rows)
    targets: torch.Tensor  # [M] int64
    grad: torch.Tensor  # [M] fp32 non-uniform upstream gradient


def make_inputs(m: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    n = m + m // 4 + 1
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)).to(dtype)
    rows = torch.randperm(n, generator=gen, device=device)[:m]
    repeats = max(1, m // 16)
    where = torch.randint(0, m, (repeats,), generator=gen, device=device)
    rows[where] = rows[torch.randint(0, m, (repeats,), generator=gen, device=device)]
    targets = torch.randint(0, v, (m,), generator=gen, device=device)
    grad = torch.rand(m, generator=gen, device=device) * 2 - 0.5
    return Inputs(hidden, weight, rows, targets, grad)


# ---------------------------------------------------------------------------------------------
# Providers: each a function (hidden, weight, rows, targets) -> logp [M] fp32


def liger_logprobs(hidden, weight, rows, targets):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # accum_dtype fp32: dweight accumulated in fp32 across token chunks, as ours does (docs/DESIGN.md §6).
    out = liger_fused_linear_cross_entropy(
        hidden[rows], weight, targets, reduction="none", accum_dtype=torch.float32
    )
    # Versions return the loss, a tuple (loss, z_loss, ...) or a CrossEntropyOutput.
    loss = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out.loss
    return -loss.float()


def cce_logprobs(hidden, weight, rows, targets):
    from cut_cross_entropy import linear_cross_entropy

    # filter_eps=None: no gradient filtering (by default CCE skips the gradient entries of tiny
    # probabilities), so the computation is the same exact one as ours.
    loss = linear_cross_entropy(hidden[rows], weight, targets, reduction="none", filter_eps=None)
    return -loss.float()


def cublas_dlogits_logprobs(hidden, weight, rows, targets):
    """Our kernels with the backward variant that takes the logits from cuBLAS: the call records the
    variant (token_logprobs.DLOGITS is read in forward), so only this provider's backward uses it."""
    tlp = sys.modules["rrhf_fast.kernels.token_logprobs"]
    before, tlp.DLOGITS = tlp.DLOGITS, "cublas"
    try:
        return token_logprobs(hidden, weight, rows, targets, impl="triton")
    finally:
        tlp.DLOGITS = before


def build_provider(name: str, device: torch.device) -> LogprobFn:
    if name == "torch":
        return token_logprobs_torch
    if name == "torch.compile":
        for knob in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        return torch.compile(token_logprobs_torch, dynamic=False)
    if name == "triton":
        return functools.partial(token_logprobs, impl="triton")
    if name == "triton/cublas-dlogits":  # the backward's logits from cuBLAS + a Triton epilogue
        if device.type != "cuda":
            raise Unavailable("needs CUDA's fp32-output GEMM (torch >= 2.8) for half inputs")
        return cublas_dlogits_logprobs
    if name in ("liger", "cce"):
        if device.type != "cuda":
            raise Unavailable(f"{name} runs on CUDA only")
        try:
            __import__("liger_kernel.transformers.functional" if name == "liger" else "cut_cross_entropy")
        except ImportError as exc:
            raise Unavailable(f"not installed ({exc})") from exc
        return liger_logprobs if name == "liger" else cce_logprobs
    raise ValueError(name)


class Unavailable(Exception):
    """A provider that cannot run here, or computes something else; the message says why."""


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_provider(fn: LogprobFn, device: torch.device, dtype: torch.dtype) -> None:
    """Raise Unavailable unless fn matches an fp64 reference on a ragged shape, values and gradients.

    Tolerance: 4x the error of the torch reference run in the same dtype, at least 2e-2 relative:
    loose for rounding, tight enough to catch a different computation (errors of order 1).
    """
    x = make_inputs(37, 80, 523, dtype, device, seed=1)

    def run(f, cast):
        h = cast(x.hidden).detach().requires_grad_()
        w = cast(x.weight).detach().requires_grad_()
        logp = f(h, w, x.rows, x.targets)
        logp.backward(x.grad.to(logp.dtype))
        return logp.detach(), h.grad, w.grad

    try:
        got = run(fn, lambda t: t)
    except Exception as exc:
        raise Unavailable(common.describe(exc)) from exc
    ref = run(token_logprobs_torch, lambda t: t.double())
    same = run(token_logprobs_torch, lambda t: t)
    for what, g, r, s in zip(("logp", "dhidden", "dweight"), got, ref, same, strict=True):
        if g is None or g.shape != r.shape:
            raise Unavailable(f"{what}: no gradient or wrong shape")
        err, tol = rel_err(g, r), max(4 * rel_err(s, r), 2e-2)
        if not err <= tol:
            raise Unavailable(f"{what} differs from the fp64 reference: relative error {err:.2g} > {tol:.2g}")


# ---------------------------------------------------------------------------------------------
# Measurement


def make_call(fn: LogprobFn, x: Inputs, mode: str) -> Callable[[], object]:
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(x.hidden, x.weight, x.rows, x.targets)

        return call
    h = x.hidden.detach().requires_grad_()
    w = x.weight.detach().requires_grad_()

    def call():
        h.grad = w.grad = None
        fn(h, w, x.rows, x.targets).backward(x.grad)

    return call


def sweeps(
    smoke: bool, headline_only: bool = False, sweep_only: bool = False
) -> list[tuple[int, int, tuple]]:
    """(D, V, Ms) to measure: the headline first, then the grid; or either alone."""
    hd, hv, hm = SMOKE_HEADLINE if smoke else GPU_HEADLINE
    if headline_only:
        return [(hd, hv, (hm,))]
    grid = SMOKE_SWEEPS if smoke else GPU_SWEEPS
    if sweep_only:
        grid = [(d, v, tuple(m for m in ms if (d, v, m) != (hd, hv, hm))) for d, v, ms in grid]
        return [(d, v, ms) for d, v, ms in grid if ms]
    return grid


def load_providers(names, device, dtype, smoke, explicit) -> dict[str, LogprobFn | str]:
    """name -> function, or name -> the reason it is skipped."""
    out: dict[str, LogprobFn | str] = {}
    for name in names:
        if name == "torch.compile" and smoke and not explicit:
            out[name] = "CPU smoke: inductor compiles take longer than a smoke run (ask with --providers)"
            continue
        try:
            fn = build_provider(name, device)
            if name not in ("torch", "torch.compile"):  # torch.compile: the reference, compiled
                check_provider(fn, device, dtype)
            out[name] = fn
        except Unavailable as exc:
            out[name] = str(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    device, smoke = common.resolve_device(args)
    dtype = torch.float32 if smoke else torch.bfloat16
    rec = common.Recorder("kernels", args.out_dir, device, smoke)
    names = common.selected(PROVIDERS, args.providers)
    providers = load_providers(names, device, dtype, smoke, explicit=bool(args.providers))
    headline = SMOKE_HEADLINE if smoke else GPU_HEADLINE
    for d, v, ms in sweeps(smoke, args.headline_only, args.sweep_only):
        sweep = f"D={d} V={v}"
        for m in ms:
            config = f"{sweep} M={m}"
            print(config, flush=True)
            x = make_inputs(m, d, v, dtype, device)
            for name, fn in providers.items():
                for mode in MODES:
                    bench = f"token_logprobs_{mode}"
                    if isinstance(fn, str):
                        rec.skip(bench, sweep, name, config, m, dtype, fn)
                    elif name == "torch.compile" and not smoke and (d, v, m) != GPU_HEADLINE:
                        # Inductor compiles each shape anew, ~20 s a graph: the headline shape only.
                        rec.skip(bench, sweep, name, config, m, dtype, "measured at the headline shape only")
                    else:
                        flops = FLOPS_PER_MDV[mode] * m * d * v
                        call = make_call(fn, x, mode)
                        at_headline = (d, v, m) == headline
                        rec.measure(
                            bench, sweep, name, config, m, dtype, call, flops=flops, tokens=m,
                            rep_ms=HEADLINE_REP_MS if at_headline else 100.0,
                            warmup_ms=HEADLINE_WARMUP_MS if at_headline else 25.0,
                        )  # fmt: skip
                        if args.profile and (d, v, m) == headline and mode == "fwd_bwd":
                            rec.profile(f"{name} fwd_bwd {config}", call)
            del x
            common.free_memory(device)
    print(rec.finish())
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_kernels.py`

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH_SHAPES = [(4096, 128256, m) for m in (1024, 4096, 8192)] if DEVICE.type == "cuda" else [(32, 259, 40)]


if pytest is not None:

    @pytest.mark.parametrize(
        "provider, mode, shape",
        [
            pytest.param(p, mode, shape, id=f"{p}-{mode}-D{shape[0]}-V{shape[1]}-M{shape[2]}")
            for p in PROVIDERS
            for mode in MODES
            for shape in BENCH_SHAPES
        ],
    )
    def test_token_logprobs(benchmark, provider, mode, shape):
        dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
        fn = load_providers([provider], DEVICE, dtype, smoke=False, explicit=True)[provider]
        if isinstance(fn, str):
            pytest.skip(fn)
        d, v, m = shape
        call = make_call(fn, make_inputs(m, d, v, dtype, DEVICE), mode)
        benchmark.extra_info["tflops_per_call"] = FLOPS_PER_MDV[mode] * m * d * v / 1e12
        benchmark(lambda: (call(), common.sync(DEVICE)))


if __name__ == "__main__":
    sys.exit(main())
