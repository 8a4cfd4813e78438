"""Pinned CPU numerics: the demo's figures are the same on any x86-64 CPU with AVX2.

CPU training here is deterministic on one machine (tests/test_determinism.py), but its rounding
follows what the libraries pick for the CPU they find, and three of them pick by instruction set:

- ATen's CPU capability dispatch: the vectorised kernels (reductions, softmax, norms, elementwise
  math, the CPU attention kernel) are compiled for DEFAULT, AVX2 and AVX512 and chosen at run
  time; a 16-lane AVX512 sum adds in another order than an 8-lane AVX2 one. Pinned to AVX2 by
  ATEN_CPU_CAPABILITY=avx2, which every x86-64 CPU with AVX2 runs (a CPU without it falls back).
- MKL, the BLAS of torch's x86 wheels (every fp32 matmul): its code path depends on the CPU, its
  vendor included. MKL's conditional numerical reproducibility pins it: MKL_CBWR=COMPATIBLE (SSE2
  code without the approximate rcp/rsqrt instructions) is the one branch MKL honours on non-Intel
  CPUs (MKL_CBWR=AVX2 falls back to AUTO there, as MKL's guide says and as this module's report
  shows on an AMD EPYC), and MKL_DYNAMIC=FALSE keeps its thread count the one asked for.
- oneDNN (mkldnn): capped at AVX2 by ONEDNN_MAX_CPU_ISA=AVX2 (fp32 training here does not reach
  it; pinned so that a path that does stays portable).
- the thread count: the demo runs 2 torch threads by default (`--threads`).

The libraries read these when they first run a kernel, so `pin()` must run before torch is
imported: `rrhf-fast demo` does it in cli.main, and any command does with RRHF_FAST_PIN_CPU=1 (=0:
none, the demo included). Off by default elsewhere: MKL's COMPATIBLE branch is SSE2 code and
ATen's AVX2 kernels half the width of AVX512's, and real runs need no figures that match another
machine's bit for bit. `report()` says what is in effect.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
SWITCH = "RRHF_FAST_PIN_CPU"
_MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512"}  # fmt: skip


def wanted(command: str | None, environ: dict[str, str] | None = None) -> bool:
    """Whether `command` runs pinned: RRHF_FAST_PIN_CPU=1 pins every command, =0 none (the demo
    unpinned: how the README's spread over settings was measured); unset, the demo only."""
    value = (os.environ if environ is None else environ).get(SWITCH, "")
    return value != "0" if value else command == "demo"


def pin(environ: dict[str, str] | None = None) -> bool:
    """Set PINS in the environment if torch is not imported yet (they take effect then); False, and
    the environment left alone, in a process that imported torch already (a test calling cli.main:
    too late for them, and children of that process must not inherit them unasked)."""
    if "torch" in sys.modules:
        return False
    (os.environ if environ is None else environ).update(PINS)
    return True


def report() -> dict[str, Any]:
    """What is in effect now (torch imported): ATen's capability, MKL's CNR branch (read from the
    library, None where torch has no MKL), the pins' variables and torch's thread count."""
    import torch

    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": _mkl_branch(),
        "threads": torch.get_num_threads(),
        **{name: os.environ.get(name) for name in PINS},
    }


def pinned(state: dict[str, Any]) -> bool:
    """Whether `report()` shows the pins in effect."""
    return state["aten_capability"] == "AVX2" and state["mkl_cbwr"] in ("COMPATIBLE", None)


def describe(state: dict[str, Any]) -> str:
    """One line for the demo's output."""
    mkl = "no MKL" if state["mkl_cbwr"] is None else f"MKL CNR branch {state['mkl_cbwr']}"
    words = (f"ATen {state['aten_capability']} kernels, {mkl}, oneDNN up to "
             f"{state['ONEDNN_MAX_CPU_ISA'] or 'the CPU'}, {state['threads']} torch threads")  # fmt: skip
    if pinned(state):
        return f"CPU numerics pinned: {words}"
    return (f"CPU numerics NOT pinned ({words}): figures may differ on another CPU; run `rrhf-fast demo` "
            "in a fresh process, which sets the pins before torch is imported")  # fmt: skip


def _mkl_branch() -> str | None:
    """mkl_serv_cbwr_get(MKL_CBWR_BRANCH) of the MKL linked into libtorch_cpu (the public
    mkl_cbwr_get is not exported there; this is what it calls)."""
    import ctypes
    from pathlib import Path

    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return _MKL_BRANCHES.get(get(1), str(get(1)))
