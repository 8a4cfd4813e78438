"""The memory-fit study: the largest packed step that trains on one GPU, per model and method.

`python benchmarks/memory_fit.py [--models A,B] [--providers full,lora,qlora,reference]
[--no-targets | --targets-only] [--max-queries N] [--cpu-smoke] [--out-dir DIR] [--report]`
appends to results/memory_fit.csv (memory_fit_cpu_smoke.csv without CUDA), rewrites memory_fit.md.

Models (memory_models.py) are built from their published dimensions on the meta device, nothing
downloaded, and materialised on the GPU with random weights: Llama-3.2-1B, Llama-3.2-3B,
Llama-3.1-8B, Qwen2.5-7B (a tiny Llama in smoke runs). Each query has k=6 responses of 128
tokens after a 512-token prompt (1,280 packed tokens). Methods, each built by the trainer's own
`finish_model` and stepped by its `forward_backward`, with gradient checkpointing and clipping as
in `rrhf-fast train`:
- `full`: every weight trained, bf16 weights, bitsandbytes AdamW8bit;
- `lora`: bf16 base, LoRA r=16 on every decoder linear, AdamW8bit on the adapters;
- `qlora`: NF4 base with double quantisation, bf16 compute, the same adapters;
- `reference`: `full`'s settings with the naive official-style step (reference_step.py: k padded
  copies, full logits in fp32), its G queries' graphs alive together as in one batched forward.
For each, G (queries in one packed micro-batch, the step) doubles from 1 until a step runs out of
memory, then bisects; a row records the largest G that fits (tokens/s, peak memory) and one the
smallest that does not. `--max-queries` caps G (a capped row says so).

Targets, tried exactly: Llama-3.1-8B full fine-tuning on an 80 GB GPU and QLoRA within
24 GB, each a step of 8 queries in micro-batches of one query (the authors' per-device batch),
with the caching allocator capped to the card's size (`torch.cuda.set_per_process_memory_fraction`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import common
import torch
import workload
from memory_models import METHODS, SHAPES, build
from reference_step import query_loss
from report import read_rows, write_report

from rrhf_fast.data.packing import pack_tokenized
from rrhf_fast.objectives import build_objective
from rrhf_fast.optimizers.optim import build_optimizer
from rrhf_fast.training.train import forward_backward

K, PROMPT, RESPONSE = 6, 512, 128
SMOKE_K, SMOKE_PROMPT, SMOKE_RESPONSE = 2, 8, 4
MIB = 2**20
# Allocator caps: an H100 80GB shows 81,559 MiB; a 24 GB card (RTX 4090) 24,564 MiB, of which about
# 600 MiB go to the CUDA context outside the allocator.
CAP_80GB, CAP_24GB = 81_559 * MIB, (24_564 - 600) * MIB

TARGETS = [  # (sweep label, model, method, allocator cap, queries per step, queries per micro-batch)
    ("80 GB: Llama-3.1-8B full fine-tuning", "Llama-3.1-8B", "full", CAP_80GB, 8, 1),
    ("24 GB: Llama-3.1-8B QLoRA", "Llama-3.1-8B", "qlora", CAP_24GB, 8, 1),
]


# ---------------------------------------------------------------------------------------------
# One training step of G queries


def make_step(method, model, flags, optimizer, items, per_micro, device, autocast) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [items[i : i + per_micro] for i in range(0, len(items), per_micro)]
    if method == "reference":
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

        def backward() -> None:
            for group in groups:
                with autocast:
                    loss = sum(query_loss(model, q, pad_id=pad_id)[0] for q in group) / len(items)
                loss.backward()
    else:
        batches = [pack_tokenized(group).to(device) for group in groups]
        objective = build_objective(flags)

        def backward() -> None:
            forward_backward(model, objective, batches, autocast, queries=len(items))

    def step() -> None:
        try:
            backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        finally:  # also after running out of memory half-way: the next trial starts clean
            optimizer.zero_grad(set_to_none=True)

    return step


def run_step(step: Callable[[], None], device: torch.device, repeats: int = 2) -> dict | None:
    """Warm-up once, then `repeats` timed steps: {ms (mean), peak_gib, extra_gib}; None out of memory."""
    try:
        step()  # first call: optimizer states, kernel autotuning, allocator growth
        common.sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            common.sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one; cuBLAS' own says ALLOC_FAILED
        if isinstance(err, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in str(err):
            return None
        raise
    finally:
        common.free_memory(device)
    peak = torch.cuda.max_memory_allocated(device) / common.GIB if device.type == "cuda" else float("nan")
    return {"ms": sum(times) / len(times), "peak_gib": peak, "extra_gib": peak - before / common.GIB}


def largest_fit(fits: Callable[[int], bool], cap: int) -> tuple[int, int | None]:
    """(largest G in 1..cap with fits(G), smallest G without, or None up to the cap): doubling, then
    bisection. Assumes a larger step never needs less memory."""
    good, bad, g = 0, None, 1
    while bad is None and good < cap:
        if fits(g):
            good, g = g, min(2 * g, cap)
        else:
            bad = g
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


# ---------------------------------------------------------------------------------------------
# The study: rows into the CSV as they are measured


class Study:
    def __init__(self, args, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.rec = common.Recorder("memory_fit", args.out_dir, device, smoke)
        self.shape = (SMOKE_K, SMOKE_PROMPT, SMOKE_RESPONSE) if smoke else (K, PROMPT, RESPONSE)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def queries(self, g: int, vocab: int):
        k, p, r = self.shape
        return workload.random_queries(g, k, p, r, vocab, seed=g)

    def trial(self, method, model, flags, optimizer, g: int, per_micro: int) -> dict | None:
        items = self.queries(g, model.config.vocab_size)
        autocast = self.autocast or torch.autocast("cpu", enabled=False)
        step = make_step(method, model, flags, optimizer, items, per_micro, self.device, autocast)
        result = run_step(step, self.device)
        if result is not None:
            result["tokens"] = sum(it.packed_len for it in items)
        return result

    def row(self, sweep, method, g, per_micro, result, note="", status=None) -> None:
        """One CSV row (common.COLUMNS): a measured step, or why there is none (oom / error)."""
        k, p, r = self.shape
        tokens = g * (p + k * r)
        micro = "" if per_micro >= g else f", micro-batches of {per_micro}"
        row = dict.fromkeys(common.COLUMNS, "")
        config = f"G={g} ({tokens} tokens/step{micro})"
        row.update(self.rec.env, benchmark="memory_fit", sweep=sweep, provider=method, dtype="bfloat16",
                   x=common.fmt(float(tokens)), config=config, note=note)  # fmt: skip
        if result is None:
            row.update(status=status or "oom", note=note or "torch.cuda.OutOfMemoryError")
        else:
            speed = result["tokens"] / (result["ms"] / 1e3)
            row.update(status="ok", ms_median=common.fmt(result["ms"]), tokens_per_s=common.fmt(speed),
                       peak_mem_gib=common.fmt(result["peak_gib"]),
                       extra_mem_gib=common.fmt(result["extra_gib"]))  # fmt: skip
        common.append_row(self.rec.csv_path, row)
        peak = row["peak_mem_gib"] or "-"
        print(f"  {sweep:<40} {method:<10} G={g:<4} {row['status']} peak {peak} GiB", note)

    def fresh(self, shape: str, method: str):
        model, flags = build(shape, method, self.device, self.smoke)
        optimizer = build_optimizer(model.named_parameters(), flags.optim, lr=1e-5)
        return model, flags, optimizer

    def sweep(self, shape: str, method: str, cap: int) -> None:
        label = f"{shape} k={self.shape[0]} P={self.shape[1]} R={self.shape[2]}"
        try:
            setup = self.fresh(shape, method)
        except torch.cuda.OutOfMemoryError:
            return self.row(label, method, 1, 1, None, "the model and its optimizer alone do not fit")
        except Exception as exc:  # one method failing must not end the study: its row says why
            return self.row(label, method, 1, 1, None, common.describe(exc), status="error")
        best: dict[int, dict] = {}

        def fits(g: int) -> bool:
            best[g] = self.trial(method, *setup, g, per_micro=g)
            return best[g] is not None

        try:
            good, bad = largest_fit(fits, cap)
        except Exception as exc:  # one method failing must not end the study: its row says why
            return self.row(label, method, 1, 1, None, common.describe(exc), status="error")
        finally:
            setup = None  # noqa: F841 (drops the model and optimizer before the memory is freed)
            common.free_memory(self.device)
        if good:
            self.row(label, method, good, good, best[good], "" if bad else f"--max-queries {cap} reached")
        if bad:
            self.row(label, method, bad, bad, None, "smallest step that runs out of memory")

    def target(self, label: str, shape: str, method: str, cap_bytes: int, g: int, per_micro: int) -> None:
        capped = self.device.type == "cuda"
        if capped:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), self.device)
        note = f"allocator capped at {cap_bytes / common.GIB:.1f} GiB" if capped else "CPU: no cap"
        status = None
        try:
            result = self.trial(method, *self.fresh(shape, method), g, per_micro)
        except torch.cuda.OutOfMemoryError:
            result = None
        except Exception as exc:
            result, status, note = None, "error", common.describe(exc)
        finally:
            common.free_memory(self.device)
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        self.row(label, method, g, per_micro, result, note, status=status)


# ---------------------------------------------------------------------------------------------
# Report: report.py's tables, then the summary and the targets' verdicts


def summary_lines(rows: list[dict[str, str]]) -> list[str]:
    """Per GPU: the newest answer for each (model, method), then each target's verdict."""
    newest: dict[tuple, dict[str, dict]] = {}
    for r in rows:  # file order: a later row is a newer measurement
        newest.setdefault((r["gpu"], r["sweep"], r["provider"]), {})[r["status"]] = r
    targets = tuple(t[0] for t in TARGETS)
    out = []
    for gpu in dict.fromkeys(r["gpu"] for r in rows):
        mine = [(sweep, method, by) for (g, sweep, method), by in newest.items() if g == gpu]
        out += [f"## Summary ({gpu})", "", "| model, shape | method | largest step that fits | peak GiB "
                "| tokens/s | smallest that does not |", "|---|---|---|---|---|---|"]  # fmt: skip
        out += [_fit_line(sweep, method, by) for sweep, method, by in mine if not sweep.startswith(targets)]
        out += ["", f"### Targets ({gpu})", "", "| target | step | verdict |", "|---|---|---|"]
        out += [_target_line(sweep, method, by) for sweep, method, by in mine if sweep.startswith(targets)]
        out.append("")
    return out


def _fit_line(sweep: str, method: str, by: dict[str, dict]) -> str:
    ok, bad = by.get("ok"), by.get("oom") or by.get("error")
    fit = (ok["config"] + (f" ({ok['note']})" if ok["note"] else "")) if ok else "nothing"
    peak, speed = (ok["peak_mem_gib"] or "-", ok["tokens_per_s"]) if ok else ("-", "-")
    return f"| {sweep} | {method} | {fit} | {peak} | {speed} | {bad['config'] if bad else '-'} |"


def _target_line(sweep: str, method: str, by: dict[str, dict]) -> str:
    r = max(by.values(), key=lambda row: row["date"])
    verdict = f"**does not fit** ({r['status']}: {r['note']})"
    if r["status"] == "ok":
        verdict = f"fits: peak {r['peak_mem_gib'] or '-'} GiB, {r['tokens_per_s']} tokens/s ({r['note']})"
    return f"| {sweep} ({method}) | {r['config']} | {verdict} |"


def finish(csv_path) -> object:
    """report.py's tables and figures (`python benchmarks/report.py` redraws those alone), then ours."""
    md = write_report(csv_path)
    md.write_text(md.read_text() + "\n" + "\n".join(summary_lines(read_rows(csv_path))))
    return md


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])  # --providers: a subset of METHODS; --profile: unused
    p.add_argument("--models", default=",".join(SHAPES), help="a subset of " + ", ".join(SHAPES))
    p.add_argument("--max-queries", type=int, default=None, help="largest G tried (default 32, smoke 3)")
    p.add_argument("--no-targets", action="store_true", help="skip the two targets")
    p.add_argument("--targets-only", action="store_true", help="only the two targets")
    p.add_argument("--report", action="store_true", help="only regenerate memory_fit.md from the CSV")
    args = p.parse_args(argv)
    device, smoke = common.resolve_device(args)
    study = Study(args, device, smoke)
    methods = common.selected(METHODS, args.providers)
    shapes = ["tiny-llama"] if smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    if not smoke and set(shapes) - set(SHAPES):
        raise SystemExit(f"unknown model(s) {sorted(set(shapes) - set(SHAPES))}; choose from {list(SHAPES)}")
    if not args.report:
        for label, shape, method, cap_bytes, g, per_micro in [] if args.no_targets else TARGETS:
            if smoke:  # the same code path on the tiny model: only the harness is shown to work
                label, shape, g = f"{label} [smoke: tiny model]", "tiny-llama", 2
            study.target(label, shape, method, cap_bytes, g, per_micro)
        for shape in [] if args.targets_only else shapes:
            for method in methods:
                study.sweep(shape, method, args.max_queries or (3 if smoke else 32))
    print(finish(study.rec.csv_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
