"""Which launch configurations the kernels try: every one, a trimmed set, or one pinned config.

A first GPU run pays a compile per (kernel, config, shape specialisation, dtype) before it measures
anything (the project's figure: ~15 s per compile on 2 CPU cores), so the autotuners' lists can be
trimmed for it with `RRHF_FAST_AUTOTUNE`, read when the kernels are imported:

- `all` (the default): every config of FWD_CONFIGS, DLOGITS_CONFIGS and MM_CONFIGS;
- `preferred`: one config per kernel, the one the compile evidence favours (PREFERRED below);
- `fwd=4,dlogits=0,mm=0`: the named configs (indices into the lists; a kernel not named keeps all).

`pinned_configs(fwd=i, ...)` goes further, for one block of code: the launchers start the plain
kernel with that config, with no autotuner, on CUDA and under the interpreter alike. The parallel
warm compile of a GPU run (benchmarks/warm_compile.py) compiles each config in its own process that
way, into Triton's on-disk cache, where the autotuners of the run then find them; the CPU tests run
each real config's tile sizes through the interpreter the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import triton

KERNELS = ("fwd", "dlogits", "mm")
# By the sm_90 compile evidence (benchmarks/README.md): the forward's 128 x 256 tile at 16 warps fits
# 128 registers without a spill (Triton 3.6 and 3.9, bf16 and autocast); the dlogits kernel's
# 128 x 128 3-stage tile at 16 warps takes at most 112; the dhidden fallback GEMM's 128 x 128 tile
# spills nothing.
PREFERRED = {"fwd": 4, "dlogits": 0, "mm": 0}
_PINNED: dict[str, triton.Config] = {}


def choice(spec: str | None = None) -> dict[str, list[int] | None]:
    """kernel -> the config indices to keep (None: all), from an RRHF_FAST_AUTOTUNE value."""
    spec = (os.environ.get("RRHF_FAST_AUTOTUNE", "all") if spec is None else spec).strip() or "all"
    if spec == "all":
        return dict.fromkeys(KERNELS)
    if spec == "preferred":
        return {k: [i] for k, i in PREFERRED.items()}
    out: dict[str, list[int] | None] = dict.fromkeys(KERNELS)
    for part in spec.split(","):
        name, _, index = part.partition("=")
        if name.strip() not in KERNELS or not index.strip().isdigit():
            raise ValueError(
                f"RRHF_FAST_AUTOTUNE={spec!r}: expected 'all', 'preferred' or kernel=index pairs "
                f"such as 'fwd=4,dlogits=0' (kernels: {', '.join(KERNELS)}), but got {part!r}"
            )
        out[name.strip()] = sorted({*(out[name.strip()] or []), int(index)})
    return out


def select(kernel: str, configs: list[triton.Config], spec: str | None = None) -> list[triton.Config]:
    """The configs the autotuner of `kernel` tries under RRHF_FAST_AUTOTUNE (or `spec`)."""
    keep = choice(spec)[kernel]
    if keep is None:
        return list(configs)
    bad = [i for i in keep if not 0 <= i < len(configs)]
    if bad:
        raise ValueError(
            f"RRHF_FAST_AUTOTUNE: {kernel} has configs 0..{len(configs) - 1}, not {', '.join(map(str, bad))}"
        )
    return [configs[i] for i in keep]


@contextlib.contextmanager
def pinned_configs(**configs: triton.Config) -> Iterator[None]:
    """Launch each named kernel (fwd, dlogits, mm) with the given config inside the block."""
    unknown = set(configs) - set(KERNELS)
    if unknown:
        raise ValueError(f"pinned_configs: unknown kernel(s) {sorted(unknown)}; choose from {KERNELS}")
    saved = dict(_PINNED)
    _PINNED.update(configs)
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(saved)


def pinned(kernel: str) -> triton.Config | None:
    return _PINNED.get(kernel)
