"""`rrhf-fast plot RUN_DIR`: draw a run's metrics.jsonl as PNG curves (matplotlib, Agg backend)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from rrhf_fast.errors import UserError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

# One panel per entry: (title, [(metrics key, label), ...]). Missing keys are simply not drawn.
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("loss", [("loss", "train"), ("eval_loss", "held-out")]),
    (
        "rank / SFT loss",
        [
            ("rank_loss", "rank"),
            ("sft_loss", "SFT"),
            ("eval_rank_loss", "held-out rank"),
            ("eval_sft_loss", "held-out SFT"),
        ],
    ),  # fmt: skip
    (
        "reward-model loss / centring",
        [("rm_loss", "BT / listwise"), ("center_loss", "centring"), ("eval_rm_loss", "held-out")],
    ),  # fmt: skip
    ("ranking accuracy (pairs)", [("accuracy", "train"), ("eval_accuracy", "held-out")]),
    ("reward margin of ordered pairs", [("margin", "train"), ("eval_margin", "held-out")]),
    ("top-1 agreement", [("eval_top1", "held-out")]),
    ("reward of the top-scored response", [("best_reward", "train"), ("eval_best_reward", "held-out")]),
    ("learning rate", [("lr", "lr")]),
    ("gradient norm", [("grad_norm", "before clipping")]),
    ("tokens / s", [("tokens_per_s", "tokens/s")]),
    ("skipped (non-finite) steps", [("skipped_steps", "total")]),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `rrhf-fast train --output-dir`")
    parser.add_argument(
        "--out", metavar="FILE", default=None, help=f"PNG path (default: RUN_DIR/{PLOT_FILE})"
    )


def main(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the --output-dir of a training run")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if lineno > 1 and not line.endswith("\n"):
                    break  # the last line of a run killed mid-write
                raise UserError(f"{path}:{lineno}: not a JSON metrics line") from None
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the PNG of a run's curves; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{Path(run_dir) / METRICS_FILE}: no metrics yet; train at least one step")
    panels = [(title, series) for title, series in PANELS if any(key in r for r in rows for key, _ in series)]
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
