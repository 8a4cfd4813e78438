"""Markdown report and figures from a benchmark CSV: `python benchmarks/report.py results/kernels.csv`.

For each GPU in the CSV and each sweep, the latest measurement of every (provider, config) is shown
with the providers side by side, one table per metric, and one matplotlib figure. Providers without a
number (skipped, out of memory, failed) say why. The issue targets (TARGETS) are checked on GPU rows;
a missed one says by how much and points at the profiler summary.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

METRICS = (  # column, heading, format
    ("ms_median", "time, ms (median; p20-p80)", "{:.3f}"),
    ("peak_mem_gib", "peak memory, GiB", "{:.2f}"),
    ("tflops", "TFLOP/s (model FLOPs)", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
)
KEY = ("gpu", "benchmark", "sweep", "provider", "config", "dtype")


def num(value: str | None) -> float | None:
    try:
        v = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return None if v is None or math.isnan(v) else v


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in text).strip("-")


def read_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The newest row of each (gpu, benchmark, sweep, provider, config, dtype), in first-seen order.

    Runs append to the CSV, so a later row is a newer measurement.
    """
    newest: dict[tuple, dict[str, str]] = {}
    for row in rows:
        newest[tuple(row.get(k, "") for k in KEY)] = row
    return list(newest.values())


def unique(values) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------
# The performance targets (benchmarks/README.md, "Targets"), checked on the latest GPU rows


@dataclass
class Target:
    topic: str
    text: str
    check: Callable[[list[dict[str, str]]], tuple[str, bool | None]]  # -> (measured, met?)


def pick(rows, benchmark: str, config: str, provider: str) -> dict[str, str] | None:
    for r in rows:
        if (r["benchmark"], r["config"], r["provider"]) == (benchmark, config, provider):
            return r if r.get("status", "ok") == "ok" else None
    return None


def best(rows, benchmark: str, config: str, prefix: str, column: str, low: bool) -> dict | None:
    cands = [
        r
        for r in rows
        if r["benchmark"] == benchmark
        and r["config"] == config
        and r["provider"].startswith(prefix)
        and num(r.get(column)) is not None
    ]
    return (min if low else max)(cands, key=lambda r: num(r[column])) if cands else None


def short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def at_least(value: float | None, goal: float) -> tuple[str, bool | None]:
    if value is None:
        return "not measured", None
    text = f"{short(value)} (goal {short(goal)}"
    return text + ("" if value >= goal else f", short by {(goal - value) / goal:.0%}") + ")", value >= goal


def at_most(value: float | None, goal: float) -> tuple[str, bool | None]:
    if value is None:
        return "not measured", None
    text = f"{short(value)} (goal <= {short(goal)}"
    return text + ("" if value <= goal else f", over by {(value - goal) / goal:.0%}") + ")", value <= goal


def ratio(a: dict | None, b: dict | None, column: str) -> float | None:
    va, vb = (num(a.get(column)) if a else None), (num(b.get(column)) if b else None)
    return va / vb if va is not None and vb else None


KERNEL = ("token_logprobs_fwd_bwd", "D=4096 V=128256 M=8192")
STEP = ("rrhf_step", "k=6 P=512 R=128")
ATTN = ("attention_fwd_bwd", "k=6 P=512 R=128")

TARGETS = [
    Target(
        "kernels",
        "token_logprobs fwd+bwd, M=8192 D=4096 V=128256: >= 600 TFLOP/s effective (8*M*D*V)",
        lambda rows: at_least(num((pick(rows, *KERNEL, "triton") or {}).get("tflops")), 600.0),
    ),
    Target(
        "kernels",
        "same shape: triton time / Liger time <= 1 (no slower than Liger)",
        lambda rows: at_most(
            ratio(pick(rows, *KERNEL, "triton"), pick(rows, *KERNEL, "liger"), "ms_median"), 1.0
        ),
    ),
    Target(
        "kernels",
        "same shape: triton extra memory / torch extra memory <= 0.25 ('far below' the reference)",
        lambda rows: at_most(
            ratio(pick(rows, *KERNEL, "triton"), pick(rows, *KERNEL, "torch"), "extra_mem_gib"), 0.25
        ),
    ),
    Target(
        "step",
        "RRHF step, 1B, k=6 P=512 R=128, one query per forward for both: rrhf-fast tokens/s / reference >= 3",
        lambda rows: at_least(
            ratio(pick(rows, *STEP, "rrhf-fast"), pick(rows, *STEP, "reference"), "tokens_per_s"), 3
        ),
    ),
    Target(
        "step",
        "same config and micro-batches: rrhf-fast peak memory / reference peak memory <= 1/3",
        lambda rows: at_most(
            ratio(pick(rows, *STEP, "rrhf-fast"), pick(rows, *STEP, "reference"), "peak_mem_gib"), 1 / 3
        ),
    ),
    Target(
        "step",
        "same config, packed micro-batches as the trainer runs them: rrhf-fast/packed MFU >= 45%",
        lambda rows: at_least(num((pick(rows, *STEP, "rrhf-fast/packed") or {}).get("mfu")), 0.45),
    ),
    Target(
        "attention",
        "k=6 P=512: best padded-copies time / best shared-prompt time >= 2",
        lambda rows: at_least(
            ratio(
                best(rows, *ATTN, "padded/", "ms_median", low=True),
                best(rows, *ATTN, "shared-prompt/", "ms_median", low=True),
                "ms_median",
            ),
            2.0,
        ),
    ),
]


def target_lines(topic: str, rows: list[dict[str, str]], profile: Path | None) -> list[str]:
    lines = []
    for t in (t for t in TARGETS if t.topic == topic):
        measured, met = t.check(rows)
        mark = {True: "met", False: "**missed**", None: "no data"}[met]
        lines.append(f"| {t.text} | {measured} | {mark} |")
    if not lines:
        return []
    out = ["### Targets", "", "| target | measured | |", "|---|---|---|", *lines, ""]
    if any("**missed**" in line for line in lines):
        where = (
            f"the profiler summary in [{profile.name}]({profile.name})"
            if profile is not None and profile.exists()
            else "no profiler summary yet: rerun the script with `--profile`"
        )
        out += [f"Where the time goes for a missed target: {where}.", ""]
    return out


# ---------------------------------------------------------------------------------------------
# Tables and figures


def cell(row: dict[str, str] | None, column: str, pattern: str) -> str:
    if row is None:
        return ""
    if row.get("status", "ok") != "ok":
        return row["status"]
    value = num(row.get(column))
    if value is None:
        return "-"
    text = pattern.format(value)
    if column == "ms_median" and num(row.get("ms_p20")) is not None:
        text += f" ({num(row['ms_p20']):.3g}-{num(row['ms_p80']):.3g})"
    return text


def sweep_section(rows: list[dict[str, str]], figure: Path | None) -> list[str]:
    # A provider with no number anywhere in the sweep is only listed below, with its reason.
    providers = unique(r["provider"] for r in rows if r.get("status", "ok") == "ok")
    configs = unique(r["config"] for r in sorted(rows, key=lambda r: num(r.get("x")) or 0.0))
    by = {(r["provider"], r["config"]): r for r in rows}
    out: list[str] = []
    for column, heading, pattern in METRICS if providers else ():
        if column != "ms_median" and all(num(r.get(column)) is None for r in rows):
            continue
        out += [f"{heading}:", "", "| config | " + " | ".join(providers) + " |"]
        out.append("|---|" + "---|" * len(providers))
        for c in configs:
            out.append(
                f"| {c} | " + " | ".join(cell(by.get((p, c)), column, pattern) for p in providers) + " |"
            )
        out.append("")
    notes = unique(
        f"- `{r['provider']}` {r['status']}: {r.get('note', '')}"
        for r in rows
        if r.get("status", "ok") != "ok"
    )
    if notes:
        out += ["Providers without a number, and why:", "", *notes, ""]
    if figure is not None:
        out += [f"![{figure.stem}]({figure.name})", ""]
    return out


def plot_sweep(rows: list[dict[str, str]], path: Path, title: str) -> Path | None:
    """Time per provider across the sweep (log scale), and peak memory beside it where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok" and num(r.get("ms_median")) is not None]
    if not ok:
        return None
    configs = unique(r["config"] for r in sorted(rows, key=lambda r: num(r.get("x")) or 0.0))
    panels = [("ms_median", "ms (median), log scale")]
    if any(num(r.get("peak_mem_gib")) is not None for r in ok):
        panels.append(("peak_mem_gib", "peak memory, GiB, log scale"))
    width = max(6.0, 0.9 * len(configs) + 3)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for provider in unique(r["provider"] for r in ok):
            pts = sorted(
                (configs.index(r["config"]), num(r[column]))
                for r in ok
                if r["provider"] == provider and num(r.get(column)) is not None
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(csv_path: Path) -> Path:
    """Regenerate `<stem>.md` and one PNG per (GPU, sweep) beside the CSV; returns the markdown path."""
    csv_path = Path(csv_path)
    stem = csv_path.stem
    topic = stem.removesuffix("_cpu_smoke")
    rows = latest(read_rows(csv_path))
    out = [
        f"# Benchmarks: {topic}",
        "",
        f"Generated by `benchmarks/report.py` from `{csv_path.name}`: the latest measurement of each",
        "provider and config (the CSV keeps every run). Columns are explained in `benchmarks/README.md`.",
        "",
    ]
    for gpu in unique(r["gpu"] for r in rows):
        g_rows = [r for r in rows if r["gpu"] == gpu]
        versions = ", ".join(unique(f"torch {r['torch']}, triton {r['triton'] or '-'}" for r in g_rows))
        dates = sorted(unique(r["date"][:10] for r in g_rows))
        out += [f"## {gpu}", "", f"{versions}; measured {', '.join(dates)}; commit(s) "]
        out[-1] += ", ".join(unique(r["commit"] for r in g_rows)) + "."
        out.append("")
        if gpu == "cpu":
            out += ["CPU smoke run: tiny shapes that only show the harness works. No targets apply.", ""]
        else:
            profile = csv_path.parent / f"{topic}_profile_{slug(gpu)}.txt"
            out += target_lines(topic, g_rows, profile)
        for bench, sweep in unique((r["benchmark"], r["sweep"]) for r in g_rows):
            s_rows = [r for r in g_rows if (r["benchmark"], r["sweep"]) == (bench, sweep)]
            name = f"{stem}_{slug(gpu)}_{slug(bench)}_{slug(sweep)}.png"
            figure = plot_sweep(s_rows, csv_path.parent / name, f"{bench} {sweep} ({gpu})")
            out += [f"### {bench}, {sweep} ({s_rows[0]['dtype']})", ""]
            out += sweep_section(s_rows, figure)
    md = csv_path.with_suffix(".md")
    md.write_text("\n".join(out))
    return md


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.joinpath("results").glob("*.csv"))
    for p in paths:
        print(write_report(p))
