"""What `impl="auto"` (`--kernels auto`) runs for token_logprobs, and its fallback when Triton fails.

The rule, per call:
1. off CUDA: the torch path (the fused kernels need a GPU; the interpreter is for tests);
2. on CUDA after a Triton failure on that device (below): the torch path;
3. on CUDA where `auto_table.json` holds a measurement for this GPU and shape in which the torch
   path was faster, and the torch path's [M, V] logits fit the memory budget: the torch path;
4. else the fused kernel. An absent entry means the fused kernel: the table is empty until a GPU
   run fills it (`python benchmarks/auto_table.py kernels.csv` writes it from the kernel benchmark's
   rows), so today auto is the fused kernel on every GPU.

The table's key is the GPU's name (`torch.cuda.get_device_name`), D, V, the dtype the kernel runs in
and the row count's autotune bucket (`utils.m_bucket`: M rounded up to a power of two in
[512, 32768]). The torch path's memory is TORCH_BYTES_PER_LOGIT bytes a logit (the input-dtype
logits, their fp32 copy and log-softmax, kept for backward, and the fp32 gradient); its budget is
RRHF_FAST_AUTO_LOGITS_GIB where set, else half the device memory the caching allocator has not
reserved (read without a sync).

A Triton failure: an exception raised by Triton's code (a compile error, a ptxas failure, a launch
out of resources), at a forward or a backward launch under `auto`. The call then runs the torch
path, one warning names the failure, and every later call of that kernel on that device takes the
torch path. rrhf_loss's kernels fall back the same way (on CUDA auto is always their Triton path
otherwise: no table). `impl="triton"` never falls back: it raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import traceback
import warnings
from functools import cache
from pathlib import Path

import torch

from .utils import m_bucket

TABLE_PATH = Path(__file__).with_name("auto_table.json")
TORCH_BYTES_PER_LOGIT = {torch.float32: 16, torch.float16: 14, torch.bfloat16: 14}
DEVICES = ("cuda",)  # where auto considers the fused kernel (tests add "cpu" under the interpreter)
# (kernel, device) -> the Triton failure that switched that kernel to the torch path there
_FAILED: dict[tuple[str, str], str] = {}
# True while a token_logprobs call under impl="auto" runs the fused op: its autograd context then
# knows that a failing backward may fall back too.
AUTO_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("rrhf_fast_auto_call", default=False)


@cache
def table() -> tuple[dict, ...]:
    """The measured entries of auto_table.json (read once)."""
    data = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    return tuple(data["entries"])


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def lookup(gpu: str, D: int, V: int, M: int, dtype: torch.dtype) -> dict | None:
    name = str(dtype).removeprefix("torch.")
    for entry in table():
        if (entry["gpu"], entry["D"], entry["V"], entry["dtype"]) == (gpu, D, V, name) and m_bucket(
            entry["M"]
        ) == m_bucket(M):
            return entry
    return None


def logits_budget(device: torch.device) -> float:
    """Bytes the torch path's logits may take on `device`."""
    forced = os.environ.get("RRHF_FAST_AUTO_LOGITS_GIB", "")
    if forced:
        return float(forced) * 2**30
    if device.type != "cuda":
        return float("inf")
    total = torch.cuda.get_device_properties(device).total_memory
    return (total - torch.cuda.memory_reserved(device)) / 2


def choose(device: torch.device, D: int, V: int, M: int, dtype: torch.dtype) -> str:
    """'triton' or 'torch' for a token_logprobs call under impl="auto" (the module doc's rule)."""
    if device.type not in DEVICES:
        return "torch"
    if failed("token_logprobs", device):
        return "torch"
    if not table():  # nothing measured: the fused kernel (and no device query)
        return "triton"
    entry = lookup(device_name(device), D, V, M, dtype)
    if entry is None or not entry["torch_ms"] < entry["triton_ms"]:
        return "triton"
    fits = M * V * TORCH_BYTES_PER_LOGIT.get(dtype, 16) <= logits_budget(device)
    return "torch" if fits else "triton"


def describe(impl: str, device: torch.device) -> str:
    """What a run's `--kernels` resolves to on `device`, for its run.json: 'torch', 'triton', or for
    auto on a GPU the table has entries for, that the choice is made per shape."""
    from .utils import resolve_impl

    resolved = resolve_impl(impl, device)
    if impl != "auto" or resolved != "triton" or device.type != "cuda":
        return resolved
    name = device_name(device)
    if any(e["gpu"] == name for e in table()):
        return "auto: triton, torch at the shapes auto_table.json measured faster"
    return resolved


def is_triton_failure(exc: BaseException) -> bool:
    """Whether `exc` came out of Triton's code (compile, ptxas, launch), not ours or torch's."""
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    import triton

    root = Path(triton.__file__).resolve().parent
    frames = traceback.extract_tb(exc.__traceback__)
    return any(Path(f.filename).resolve().is_relative_to(root) for f in frames)


def failed(kernel: str, device: torch.device) -> bool:
    """Whether `kernel`'s Triton path failed on `device` (auto then takes the torch path)."""
    return (kernel, str(device)) in _FAILED


def record_failure(kernel: str, device: torch.device, exc: BaseException, where: str) -> None:
    """Switch `kernel` on `device` to the torch path, with one warning."""
    key = (kernel, str(device))
    if key in _FAILED:
        return
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    _FAILED[key] = reason
    cost = {"token_logprobs": " (same values, the [tokens, vocab] logits held in memory)"}.get(kernel, "")
    warnings.warn(
        f"{kernel}: the fused Triton kernel failed at its first {where} on {device} ({reason}); "
        f"--kernels auto takes the torch path from now on{cost}. --kernels triton would raise instead.",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def auto_call():
    token = AUTO_CALL.set(True)
    try:
        yield
    finally:
        AUTO_CALL.reset(token)


def torch_backward(hidden, weight, rows, targets, grad, softcap, need_dh: bool, need_dw: bool):
    """(dhidden, dweight) of the torch path: what the fused backward computes, for its fallback."""
    from .reference import token_logprobs_torch

    with torch.enable_grad():
        h = hidden.detach().requires_grad_(need_dh)
        w = weight.detach().requires_grad_(need_dw)
        logp = token_logprobs_torch(h, w if w.dtype == h.dtype else w.to(h.dtype), rows, targets, softcap)
        wanted = [t for t, need in ((h, need_dh), (w, need_dw)) if need]
        grads = iter(torch.autograd.grad(logp.float(), wanted, grad.to(logp.dtype)))
    return (next(grads) if need_dh else None), (next(grads) if need_dw else None)


def reset() -> None:
    """Forget recorded failures and the cached table (tests)."""
    _FAILED.clear()
    getattr(table, "cache_clear", lambda: None)()  # (a test may have replaced it)
