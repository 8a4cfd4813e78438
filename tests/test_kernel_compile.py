"""The Triton kernels compile for real GPUs (sm_90 Hopper, sm_80 Ampere) without one.

The interpreter accepts programs the compiler rejects (non-power-of-two blocks, dtype mixes, shared
memory overflows), so CPU tests alone could pass on kernels that never launch on a GPU. Triton's
ahead-of-time compiler runs on a CPU: each launch configuration is compiled to a cubin in a
subprocess without TRITON_INTERPRET (tests/aot_compile.py), its matrix multiplies must lower to
tensor-core instructions whose operands are loaded asynchronously (a software-pipelined loop), and
its shared memory must fit the chip; the cubin's SASS (read with the cuobjdump that ships with Triton)
must hold the tensor-core instructions (HGMMA on sm_90, HMMA on sm_80) fed by cp.async (LDGSTS).
Registers and spills per config: benchmarks/README.md, "Compile evidence" (`python
tests/aot_compile.py --table DIR` regenerates its table); the slow
`test_headline_configs_do_not_spill` prints them per config and fails on a spill.

Another Triton (the GPU machines have 3.6; this venv 3.9): `pip install --target DIR --no-deps
triton==3.6.0`, then `AOT_TRITON_PATH=DIR pytest tests/test_kernel_compile.py -m "slow or not slow"`.
"""

import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")

SCRIPT = Path(__file__).with_name("aot_compile.py")
SMEM_LIMIT = {"90": 232448, "80": 166912}  # bytes a block may use: sm_90 227 KiB, sm_80 163 KiB
N_CONFIGS = {"fwd": len(tlp.FWD_CONFIGS), "dlogits": len(tlp.DLOGITS_CONFIGS), "mm_acc": len(tlp.MM_CONFIGS)}

DEFAULT_CASES = (
    [f"{k}:0:bf16:90" for k in N_CONFIGS]
    + ["fwd:0:bf16w32:90", "dlogits:0:bf16w32:90"]
    + [
        f"rrhf_{part}:0:{mode}:{cc}"
        for part in ("fwd", "bwd")
        for mode in ("paper", "official")
        for cc in (90, 80)
    ]
    + ["epilogue:0:bf16:90", "epilogue:0:fp16:80"]
    + ["fwd:0:bf16:90:softcap", "dlogits:0:bf16:90:softcap"]  # Gemma 2's soft-capped variant
)
DTYPES = {
    "fwd": ("bf16", "fp16", "fp32", "bf16w32"),
    "dlogits": ("bf16", "fp16", "fp32", "bf16w32"),
    "mm_acc": ("bf16", "fp16", "fp32"),
}  # bf16w32: bf16 hidden, fp32 weight (autocast)
ALL_CASES = [
    f"{k}:{i}:{dt}:{cc}" for k, n in N_CONFIGS.items() for i in range(n)
    for dt in DTYPES[k] for cc in (90, 80)
]  # fmt: skip


def compile_all(cases: list[str], timeout: int = 1200) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("AOT_TRITON_PATH"):  # a Triton installed with --target, ahead of this venv's
        env["PYTHONPATH"] = os.pathsep.join([os.environ["AOT_TRITON_PATH"], env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *cases], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *_, results, version = done.stdout.splitlines()
    if os.environ.get("AOT_TRITON_PATH"):
        assert version == triton_at(os.environ["AOT_TRITON_PATH"]), "compiled with the wrong Triton"
    return json.loads(results)


HEADLINE_DTYPES = {"fwd": ("bf16", "bf16w32"), "dlogits": ("bf16", "bf16w32"), "mm_acc": ("bf16",)}
HEADLINE_CASES = [f"{k}:{i}:{dt}:90" for k, dts in HEADLINE_DTYPES.items() for i in range(N_CONFIGS[k])
                  for dt in dts]  # fmt: skip


def triton_at(path: str) -> str:
    (info,) = Path(path).glob("triton-*.dist-info")
    return info.name.removeprefix("triton-").removesuffix(".dist-info")


def check(case: str, result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0
    kernel, _, dtype, cc, *_variant = case.split(":")
    if kernel in N_CONFIGS and dtype != "fp32":  # fp32 runs in exact IEEE arithmetic, not on tensor cores
        assert result["ptx_mma"], "matmul did not lower to tensor-core instructions"
        assert result["pipelined"], "no asynchronous loads: the matmul loop is not software-pipelined"
    if dtype in ("bf16", "fp16") and cc == "90":  # the H100 is the target: every half config fits it
        assert result["shared"] <= SMEM_LIMIT[cc]
    if kernel in N_CONFIGS and dtype != "fp32":  # the SASS itself: async copies feed the tensor cores
        mma = "HGMMA" if cc == "90" else "HMMA"
        assert result["sass"][mma] > 0 and result["sass"]["LDGSTS"] > 0, result["sass"]


@pytest.fixture(scope="module")
def default_results():
    return compile_all(DEFAULT_CASES)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_kernels_compile(default_results, case):
    check(case, default_results[case])


@pytest.mark.slow
def test_every_autotune_config_compiles_for_every_dtype_and_chip():
    results = compile_all(ALL_CASES, timeout=3600)  # 82 compiles: ~20 min on 2 CPU cores
    for case in ALL_CASES:
        check(case, results[case])
    # Elsewhere (fp32 tiles take twice the bytes; sm_80 has less shared memory) the autotuner skips
    # a config that does not fit, so some config of every kernel must.
    for kernel, n in N_CONFIGS.items():
        for dtype, cc in itertools.product(DTYPES[kernel], SMEM_LIMIT):
            fits = [results[f"{kernel}:{i}:{dtype}:{cc}"]["shared"] <= SMEM_LIMIT[cc] for i in range(n)]
            assert any(fits), f"no {kernel} config fits sm_{cc} shared memory in {dtype}"
            # Half precision (the GPU's dtypes; fp32 is the exactness reference, IEEE and not tuned):
            # some config that fits keeps its accumulator in registers, no local-memory spills.
            clean = [results[f"{kernel}:{i}:{dtype}:{cc}"]["stack"] == 0 for i in range(n)]
            ok = any(f and c for f, c in zip(fits, clean, strict=True))
            assert ok or dtype == "fp32", f"{kernel} {dtype} sm_{cc}: every fitting config spills"


@pytest.mark.slow
def test_headline_configs_do_not_spill():
    """Every config of the three matmul kernels, compiled for sm_90 at the headline (D = 4096, no
    soft-cap) in bf16 and the autocast variant: registers and spill bytes printed per config, and
    none that fits shared memory spills (one that does not fit is skipped by the autotuner)."""
    results = compile_all(HEADLINE_CASES)
    lines, spills = [f"Triton {results['_toolchain']['triton']}, ptxas {results['_toolchain']['ptxas']}"], []
    for case in HEADLINE_CASES:
        r = results[case]
        assert "error" not in r, (case, r["error"])
        fits = r["shared"] <= SMEM_LIMIT["90"]
        skipped = "" if fits else "  (does not fit: skipped)"
        kib = r["shared"] // 1024
        lines.append(f"{case:<22} regs {r['regs']:>3}  spill {r['stack']:>3} B  shared {kib:>3} KiB{skipped}")
        if fits and r["stack"] != 0:
            spills.append(f"{case}: {r['stack']} bytes")
    print("\n".join(lines))
    assert not spills, "configs that spill: " + ", ".join(spills)
