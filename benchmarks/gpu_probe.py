"""The first 20 seconds of a GPU run: what this machine is and what its torch can do.

`python benchmarks/gpu_probe.py [--cpu-smoke] [--out-dir DIR]` prints, and writes to
`probe_<gpu>.txt` (or `probe_cpu_smoke.txt`): GPU name, SMs, L2, memory; torch / CUDA / Triton /
transformers versions and the optional packages; whether `torch.addmm` / `torch.mm` take
`out_dtype=torch.float32` with half operands (the backward's dhidden and dweight GEMMs; refused, the
kernels fall back, rrhf_fast/kernels/utils.py); the varlen attention's signature (torch's and
flash-attn's); and one 8192 x 8192 x 8192 bf16 GEMM, the machine's real TFLOP/s, as a row of
`probe.csv` (the kernel estimates in benchmarks/README.md are fractions of it). The CPU smoke run
multiplies 256^3 fp32 instead, and its row has no GPU figure.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import sys

import common
import torch
from report import slug

from rrhf_fast.kernels.utils import probe_out_dtype_mm

OPTIONAL = (
    "triton",
    "transformers",
    "peft",
    "trl",
    "flash_attn",
    "bitsandbytes",
    "liger_kernel",
    "cut_cross_entropy",
)


def versions() -> list[str]:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__} (cuda {torch.version.cuda})"]
    for name in OPTIONAL:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # absent, or broken against this torch: say which
            out.append(f"{name}: not importable ({common.describe(exc)})")
        else:
            out.append(f"{name} {getattr(module, '__version__', '?')}")
    return out


def device_lines(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["device: cpu (smoke run)"]
    props = torch.cuda.get_device_properties(device)
    return [
        f"gpu: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
        f"L2 {props.L2_cache_size / 2**20:.0f} MiB, {props.total_memory / 2**30:.1f} GiB",
    ]


def varlen_lines() -> list[str]:
    out = []
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        out.append(f"torch varlen_attn: absent ({common.describe(exc)}); attn='auto' takes flex")
    else:
        out.append(f"torch varlen_attn{inspect.signature(varlen_attn)}")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        out.append("flash_attn_varlen_func: flash-attn not installed")
    else:
        out.append(f"flash_attn_varlen_func{inspect.signature(flash_attn_varlen_func)}")
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as exc:
        out.append(f"flex_attention: absent ({common.describe(exc)})")
    else:
        out.append("flex_attention: present")
    return out


def out_dtype_line(device: torch.device) -> str:
    ok = probe_out_dtype_mm(device)  # warns with the refusal when refused
    fallback = "" if ok else ": dhidden through the Triton GEMM, dweight through a half product"
    return f"addmm / mm with out_dtype=float32 on half operands: {'accepted' if ok else 'refused'}{fallback}"


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    device, smoke = common.resolve_device(args)
    rec = common.Recorder("probe", args.out_dir, device, smoke)
    lines = device_lines(device) + versions() + [out_dtype_line(device)] + varlen_lines()
    for line in lines:
        print(line, flush=True)
    n, dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)  # random data: zeros run faster
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    row = rec.measure(
        "gemm", f"{n}^3", "torch.mm", f"M=N=K={n}", n, dtype, lambda: torch.mm(a, b),
        flops=2 * n**3, rep_ms=300.0, warmup_ms=100.0,
    )  # fmt: skip
    gemm = f"{n}^3 {str(dtype).removeprefix('torch.')} GEMM: {row.get('tflops') or '-'} TFLOP/s"
    print(gemm, flush=True)
    env = rec.env
    name = "probe_cpu_smoke.txt" if smoke else f"probe_{slug(env['gpu'])}.txt"
    header = f"# probe on {env['gpu']}, {env['date']}, commit {env['commit']}"
    (rec.out_dir / name).write_text("\n".join([header, *lines, gemm]) + "\n")
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
