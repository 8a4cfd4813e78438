"""`rrhf-fast plan` against a real GPU step: the planned peak beside `torch.cuda.max_memory_allocated`.

For each memory mode of `rrhf-fast train` (full fine-tuning with gradient checkpointing, `--optim
adamw8bit`, one packed micro-batch of --tokens tokens: one query, k = 4 responses), two training
steps run for real on the GPU through the trainer's own pieces (simulate.simulate with
`fake=False`: finish_model, the packed forward with our attention and kernels, the objective,
backward, clipping, the optimizer, or the updates in backward / the host step), on a model of
random weights built from the published dimensions. Beside it, what `rrhf-fast plan` says for the
same flags (fake tensors, 2 and 4 layers extrapolated). Three numbers a row:
- planned: plan's peak (bytes of live tensors);
- tracked: the live tensor bytes of the real steps (the MemoryTracker the CPU tests compare with);
- allocated: `torch.cuda.max_memory_allocated` over the two steps (what the caching allocator
  handed out: rounding to its blocks, its fragmentation; the number an OOM is about).
Host memory (--offload-optimizer): plan's host peak beside the tracked host bytes.

    python benchmarks/plan_vs_gpu.py [--models Llama-3.2-1B,Llama-3.1-8B] [--modes a,b] [--tokens 4096]
    python benchmarks/plan_vs_gpu.py --cpu-smoke     # tiny model on the CPU: tracked is the only measure

Writes results/plan_vs_gpu.csv (appends) and plan_vs_gpu.md (plan_vs_gpu_cpu_smoke.* on a CPU).
A mode that needs what the machine lacks (bitsandbytes for adamw8bit) is a row with its reason.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from memory_models import model_config  # noqa: E402

from rrhf_fast.config import TrainConfig  # noqa: E402
from rrhf_fast.planning.simulate import batch_shape, plan_step, simulate  # noqa: E402

GIB = 2**30
MODES = {  # name -> the flags beyond full fine-tuning with checkpointing and adamw8bit
    "fp32": {},  # fp32 master weights, bf16 autocast: the default
    "fp32-in-backward": dict(optim_in_backward=True),
    "bf16-stochastic-in-backward": dict(dtype="bfloat16", bf16_update="stochastic", optim_in_backward=True),
    "fp32-offload": dict(offload_optimizer=True),
    "bf16-offload": dict(dtype="bfloat16", offload_optimizer=True),
}
# The host step of --offload-optimizer is a CPU AdamW over every parameter: seconds for 1B, minutes
# for 8B (plan's estimate), so the 8B model runs the modes that stay on the GPU; the goal rows of
# issue #24 first (a run cut by its time limit keeps the rows it finished).
DEFAULT_RUNS = "Llama-3.1-8B:bf16-stochastic-in-backward,Llama-3.1-8B:fp32-in-backward,Llama-3.2-1B:*"
COLUMNS = ["model", "mode", "tokens", "planned_gib", "tracked_gib", "allocated_gib", "planned_vs_allocated",
           "planned_host_gib", "tracked_host_gib", "peak_phase_planned", "peak_phase_tracked", "seconds",
           "status", "note", "gpu", "torch", "triton", "bitsandbytes", "date", "commit"]  # fmt: skip


def runs(spec: str, modes: list[str]) -> list[tuple[str, str]]:
    """'MODEL:MODE' pairs ('*': every mode of --modes) in order."""
    out = []
    for item in spec.split(","):
        model, _, mode = item.partition(":")
        out += [(model, m) for m in (modes if mode in ("", "*") else [mode])]
    return out


def flags(mode: str, tokens: int, optim: str) -> TrainConfig:
    return TrainConfig(model="-", data="-", output_dir="-", gradient_checkpointing=True, optim=optim,
                       micro_batch_tokens=tokens, **MODES[mode])  # fmt: skip


def measure(model: str, mode: str, tokens: int, device: torch.device, smoke: bool, optim: str) -> dict:
    hf = model_config(model, smoke)
    config, shape = flags(mode, tokens, optim), batch_shape(tokens)
    row = dict(model="tiny-llama" if smoke else model, mode=mode, tokens=shape.tokens)
    start = time.perf_counter()
    planned = plan_step(hf, config, shape)
    row.update(planned_gib=planned.peak_bytes / GIB, planned_host_gib=planned.host_peak_bytes / GIB,
               peak_phase_planned=planned.peak_phase)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    real = simulate(hf, config, shape, fake=False, cuda=False, device=device)
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) - before
        row.update(allocated_gib=allocated / GIB, planned_vs_allocated=planned.peak_bytes / allocated)
    row.update(tracked_gib=real.peak_bytes / GIB, tracked_host_gib=real.host_peak_bytes / GIB,
               peak_phase_tracked=real.peak_phase, seconds=time.perf_counter() - start,
               status="ok")  # fmt: skip
    return row


def needs(mode: str, optim: str) -> str | None:
    """Why this machine cannot run the mode, or None."""
    if optim.startswith(("adamw8bit", "paged")):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed (carry its wheel, or --optim adamw)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="MODEL:MODE pairs; MODE '*' = every --modes")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--optim", default="adamw8bit", choices=["adamw8bit", "adamw"])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny Llama on the CPU, 128 tokens")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    tokens = 128 if smoke else args.tokens
    pairs = runs("tiny:*" if smoke else args.runs, args.modes.split(","))
    env = dict(gpu=common.gpu_name(device), torch=torch.__version__, triton=common.triton_version(),
               bitsandbytes=_version("bitsandbytes"), commit=common.git_commit(),
               date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))  # fmt: skip
    out = Path(args.out_dir) / ("plan_vs_gpu_cpu_smoke" if smoke else "plan_vs_gpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.with_suffix(".csv").exists()
    try:
        run_all(out, new, pairs, args.optim, tokens, device, smoke, env)
    finally:  # also when cut (SIGINT from the GPU script's timeout): the report of the rows written
        write_markdown(out)
    return 0


def run_all(out, new, pairs, optim, tokens, device, smoke, env) -> None:
    with open(out.with_suffix(".csv"), "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for model, mode in pairs:
            reason = needs(mode, optim)
            try:
                if reason:
                    row = dict(model=model, mode=mode, tokens=tokens, status="skipped", note=reason)
                else:
                    row = measure(model, mode, tokens, device, smoke, optim)
            except torch.OutOfMemoryError as exc:
                row = dict(model=model, mode=mode, tokens=tokens, status="oom", note=common.describe(exc))
            except Exception as exc:  # a row says what failed; the other modes still run
                row = dict(model=model, mode=mode, tokens=tokens, status="error", note=common.describe(exc))
            row = {**row, **env, "note": row.get("note", "") or f"optim {optim}"}
            writer.writerow({k: _cell(v) for k, v in row.items()})
            f.flush()
            print({k: _cell(v) for k, v in row.items() if k in COLUMNS[:13]}, flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def write_markdown(out: Path) -> None:
    if not out.with_suffix(".csv").exists():
        return
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [
        "# rrhf-fast plan vs the real step (benchmarks/plan_vs_gpu.py)",
        "",
        "Full fine-tuning, gradient checkpointing, one packed micro-batch (one query, k = 4 responses), "
        "two steps. planned: `rrhf-fast plan`'s peak (fake tensors); tracked: the live tensor bytes "
        "of the real steps; allocated: `torch.cuda.max_memory_allocated` over them, less what was "
        "allocated before (empty on a CPU). GiB.",
        "",
        "| date | commit | gpu | model | mode | tokens | planned | tracked | allocated | planned / "
        "allocated | host planned | host tracked | phase (plan / real) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note'][:120]}"
        lines.append(
            f"| {r['date']} | {r['commit']} | {r['gpu']} | {r['model']} | {r['mode']} | {r['tokens']} | "
            f"{r['planned_gib']} | {r['tracked_gib']} | {r['allocated_gib']} | {r['planned_vs_allocated']} | "
            f"{r['planned_host_gib']} | {r['tracked_host_gib']} | {r['peak_phase_planned']} / "
            f"{r['peak_phase_tracked']} | {status} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out.with_suffix('.md')}")


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())
