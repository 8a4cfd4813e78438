"""Compile rrhf-fast's Triton kernels ahead of time for a GPU target, without a GPU.

Run as a script with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions):
`python tests/aot_compile.py CASES...` where a case is `kernel:config_index:dtype:cc` (the headline's
D = 4096 without soft-capping; `kernel:config_index:dtype:cc:softcap` compiles the soft-capped
variant, Gemma 2's), prints a JSON
object case -> {"shared": bytes, "ptx_mma": bool, "pipelined": bool, "cubin_bytes": int, "regs": int,
"stack": bytes, "local": bytes, "sass": {opcode: count}} or {"error": message} (and "_toolchain":
the Triton and ptxas versions), then the Triton version on the last line. `python tests/aot_compile.py
--table` prints the headline table of benchmarks/README.md ("Compile evidence") instead: every
token_logprobs config at D = 4096 without soft-capping, for sm_90, in bf16 and the autocast variant.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
rl = importlib.import_module("rrhf_fast.kernels.rrhf_loss")
dlc = importlib.import_module("rrhf_fast.kernels.dlogits_cublas")

MMA_MARK = {90: "wgmma.mma_async", 80: "mma.sync"}
ALIGNED_SIZES = ("M", "N", "K", "VC")


def _dtypes(dt):
    """(hidden, weight) dtypes of a case's dtype token; bf16w32: bf16 hidden, fp32 weight (autocast)."""
    return ("bf16", "fp32") if dt == "bf16w32" else (dt, dt)


def _fwd(dt, softcap=False):
    dt, wt = _dtypes(dt)
    sig = dict(H=f"*{dt}", W=f"*{wt}", ROWS="*i64", TGT="*i64", LSE_PART="*fp32", TGT_LOGIT="*fp32")
    sig.update(M="i32", V="i32", NUM_SPLITS="i32", group_m="i32", M_BUCKET="i32")
    sig.update(stride_h="i32", stride_w="i32", softcap="fp32")
    return tlp._fwd_kernel, sig, dict(D=4096, SOFTCAP=softcap), tlp.FWD_CONFIGS


def _dlogits(dt, softcap=False):
    dt, wt = _dtypes(dt)
    sig = dict(H=f"*{dt}", W=f"*{wt}", TGT="*i64", LSE="*fp32", DZ=f"*{dt}", M="i32")
    sig.update(VC="i32", v_offset="i32", M_BUCKET="i32", stride_h="i32", stride_w="i32", stride_dz="i32")
    sig.update(softcap="fp32")
    return tlp._dlogits_kernel, sig, dict(D=4096, SOFTCAP=softcap), tlp.DLOGITS_CONFIGS


def _mm_acc(dt, softcap=False):
    sig = dict(A=f"*{dt}", B=f"*{dt}", C="*fp32", M="i32", N="i32", K="i32",
               stride_am="i32", stride_bk="i32", stride_cm="i32")  # fmt: skip
    return tlp._mm_acc_kernel, sig, {}, tlp.MM_CONFIGS


def _rrhf_fwd(official, softcap=False):
    sig = dict(LOGP="*fp32", TOKEN_RESPONSE="*i64", RESPONSE_QUERY="*i64", RESP_START="*i32",
               TOK_START="*i32", SCORES="*fp32", PROMPT_LEN="*i64", P_OUT="*fp32", COEF_RANK="*fp32",
               COEF_SFT="*fp32", RANK_Q="*fp32", SFT_Q="*fp32", M="i32", R="i32",
               length_penalty="fp32")  # fmt: skip
    const = dict(OFFICIAL=official == "official", SFT_SUM=False, LP_ONE=True, BLOCK_K=8, BLOCK_T=64)
    return rl._rrhf_fwd_kernel, sig, const, [triton.Config({}, num_warps=4)]


def _rrhf_bwd(_, softcap=False):
    sig = dict(TOKEN_RESPONSE="*i64", COEF="*fp32", GRAD_LOGP="*fp32", M="i32", R="i32")
    return rl._rrhf_bwd_kernel, sig, dict(BLOCK=1024), [triton.Config({}, num_warps=4)]


def _epilogue(dt, softcap=False):
    sig = dict(Z="*fp32", TGT="*i64", LSE="*fp32", DZ=f"*{dt}", M="i32", VC="i32", v_offset="i32",
               stride_z="i32", stride_dz="i32", softcap="fp32")  # fmt: skip
    const = dict(SOFTCAP=softcap, BLOCK_M=32, BLOCK_V=256)
    return dlc._epilogue_kernel, sig, const, [triton.Config({}, num_warps=8)]


KERNELS = {"fwd": _fwd, "dlogits": _dlogits, "mm_acc": _mm_acc, "epilogue": _epilogue}
KERNELS.update(rrhf_fwd=_rrhf_fwd, rrhf_bwd=_rrhf_bwd)
MATMUL_KERNELS = {"fwd", "dlogits", "mm_acc"}


def compile_case(case: str) -> dict:
    kernel, index, dt, cc, *variant = case.split(":")
    fn, sig, const, configs = KERNELS[kernel](dt, softcap=variant == ["softcap"])
    cfg = configs[int(index)]
    constexprs = dict(const, **cfg.kwargs)
    if kernel in MATMUL_KERNELS:
        constexprs["PRECISION"] = "ieee" if dt == "fp32" else "tf32"
    # What a launch specialises on: pointers, strides and sizes that are multiples of 16 (D = 4096,
    # aligned allocations). Without these hints no load vectorises, so none is made asynchronous and
    # the loops are not software-pipelined: the cubin would not be the one a GPU runs.
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items()
               if ty.startswith("*") or name.startswith("stride") or name in ALIGNED_SIZES}  # fmt: skip
    src = ASTSource(
        fn=fn,
        signature=dict(sig, **dict.fromkeys(constexprs, "constexpr")),
        constexprs=constexprs,
        attrs=aligned,
    )
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if getattr(cfg, "maxnreg", None) is not None:  # the register cap a launch with this config passes
        options["maxnreg"] = cfg.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", int(cc), 32), options=options)
    return {
        "shared": compiled.metadata.shared,
        "maxnreg": options.get("maxnreg"),
        "ptx_mma": MMA_MARK[int(cc)] in compiled.asm["ptx"],
        "pipelined": "cp.async" in compiled.asm["ptx"],  # loads overlap the matmuls of earlier stages
        "cubin_bytes": len(compiled.asm["cubin"]),
        **sass_summary(compiled.asm["cubin"]),
    }


def sass_summary(cubin: bytes) -> dict:
    """Registers, local memory (spills) and instruction counts read off the cubin with the cuobjdump
    that ships with Triton: LDGSTS = cp.async, UTMALDG = TMA loads, HGMMA = Hopper wgmma, HMMA =
    mma.sync, LDL/STL = local-memory (spill) traffic."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))
    opcodes = ("LDGSTS", "UTMALDG", "HGMMA", "HMMA", "LDL", "STL")
    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in opcodes}
    return {"regs": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", -1)),
            "local": int(usage.get("LOCAL", -1)), "sass": ops}  # fmt: skip


def ptxas_version() -> str:
    """The ptxas that compiled the cubins (the one Triton ships and calls), e.g. '12.8.93'."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    out = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"V(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


HEADLINE_KERNELS = {"fwd": ("bf16", "bf16w32"), "dlogits": ("bf16", "bf16w32"), "mm_acc": ("bf16",)}


def headline_cases() -> list[str]:
    """Every config of the three matmul kernels at the headline, sm_90: what the table shows."""
    configs = {"fwd": tlp.FWD_CONFIGS, "dlogits": tlp.DLOGITS_CONFIGS, "mm_acc": tlp.MM_CONFIGS}
    return [f"{k}:{i}:{dt}:90" for k, dts in HEADLINE_KERNELS.items() for i in range(len(configs[k]))
            for dt in dts]  # fmt: skip


def tile(case: str) -> str:
    kernel, index, *_ = case.split(":")
    cfg = KERNELS[kernel]("bf16")[3][int(index)]
    kw = cfg.kwargs
    n = kw.get("BLOCK_V", kw.get("BLOCK_N"))
    k = kw.get("BLOCK_D", kw.get("BLOCK_K"))
    return f"{kw['BLOCK_M']}x{n}x{k}, {cfg.num_warps}w/{cfg.num_stages}s"


def main(cases: list[str]) -> None:
    results = {"_toolchain": {"triton": triton.__version__, "ptxas": ptxas_version()}}
    for case in cases:
        try:
            results[case] = compile_case(case)
        except Exception as err:  # reported per case, asserted by the test
            results[case] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(results))
    print(triton.__version__)


def run_cases(cases: list[str], triton_path: str | None = None) -> dict:
    """This script in a fresh process without TRITON_INTERPRET, with `triton_path` (a Triton installed
    with pip --target) ahead of this environment's Triton when given; its JSON answer."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join([triton_path, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, __file__, *cases], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-2])


def table(other_triton: str | None) -> str:
    """The markdown table of benchmarks/README.md, "Compile evidence": this environment's Triton
    and, with `other_triton`, the one installed there, side by side."""
    cases = headline_cases()
    runs = [run_cases(cases)] + ([run_cases(cases, other_triton)] if other_triton else [])
    names = " / ".join(r["_toolchain"]["triton"] for r in runs)
    tools = "; ".join(f"Triton {r['_toolchain']['triton']} with ptxas {r['_toolchain']['ptxas']}"
                      for r in runs)  # fmt: skip
    lines = [
        f"sm_90, D = 4096, no soft-cap ({tools}):",
        "",
        f"| case (kernel:config:dtype:sm) | tile (M x N x K, warps/stages) | shared KiB | regs {names} "
        f"| stack B {names} | LDGSTS | UTMALDG | HGMMA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        first = runs[0][case]
        if "error" in first:
            lines.append(f"| {case} | {tile(case)} | error: {first['error'][:80]} |")
            continue
        regs = " / ".join(str(r[case].get("regs", "-")) for r in runs)
        stack = " / ".join(str(r[case].get("stack", "-")) for r in runs)
        sass = first["sass"]
        lines.append(
            f"| {case} | {tile(case)} | {first['shared'] // 1024} | {regs} | {stack} | "
            f"{sass['LDGSTS']} | {sass['UTMALDG']} | {sass['HGMMA']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2] if len(sys.argv) > 2 else None))
    else:
        main(sys.argv[1:])
