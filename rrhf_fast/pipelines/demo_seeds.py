"""`rrhf-fast demo --seeds 0-4` (also with `--online` or `--losses ...`): the demo once per seed, then each
figure's value per seed with its mean, min and max, as a markdown table (also written to
OUTPUT_DIR/seeds.json). Each seed runs in OUTPUT_DIR/seed-N. This is how the README's demo figures
and their spread over seeds are measured; the thread count (torch's intra-op threads, `--threads`)
is printed with them because the result moves with it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rrhf_fast.errors import UserError
from rrhf_fast.pipelines.demo_task import DemoConfig


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' and '0-2,5' too. One sentence for anything else."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise UserError(
                f"--seeds {text!r}: give seeds as '0-4' or '0,3,7' (non-negative integers)"
            ) from None
        if lo < 0 or hi < lo:
            raise UserError(f"--seeds {text!r}: {part.strip()!r} is not a range of non-negative seeds")
        seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    return seeds


def offline_figures(results: dict[str, Any]) -> dict[str, float]:
    """The offline demo's held-out rewards (run_demo's result)."""
    figures = {"before": results["before"], "RRHF": results["rrhf"]["reward"]}
    if "sft" in results:
        figures["SFT-only"] = results["sft"]["reward"]
        figures["RRHF minus SFT-only"] = figures["RRHF"] - figures["SFT-only"]
    return figures


def online_figures(results: dict[str, Any]) -> dict[str, float]:
    """The online demo's final held-out rewards (run_online_demo's result)."""
    final = {name: results[name]["rewards"][-1] for name in ("offline", "online", "offline-sft", "online-sft")
             if name in results}  # fmt: skip
    figures = {"start": results["online"]["rewards"][0], "offline RRHF": final["offline"],
               "online RRHF": final["online"],
               "online minus offline, RRHF": final["online"] - final["offline"]}  # fmt: skip
    if "online-sft" in final:
        figures.update({
            "online minus offline, SFT-only": final["online-sft"] - final["offline-sft"],
            "RRHF minus SFT-only, offline": final["offline"] - final["offline-sft"],
            "RRHF minus SFT-only, online": final["online"] - final["online-sft"],
        })  # fmt: skip
    return figures


def loss_figures(results: dict[str, Any]) -> dict[str, float]:
    """`demo --losses`' held-out rewards: the warmed-up policy's, then each loss's (run_loss_demo's)."""
    return {"warmed-up policy": results["start"], **{n: r["reward"] for n, r in results["losses"].items()}}


def run_seeds(config: DemoConfig, run: Callable[[DemoConfig], dict[str, Any]]) -> dict[str, Any]:
    """`run` (run_demo or run_online_demo) once per seed of `config.seeds`; prints and returns the table."""
    seeds = parse_seeds(config.seeds)
    out = Path(config.output_dir)
    threads = torch.get_num_threads()
    figures_of = loss_figures if config.losses else online_figures if config.online else offline_figures
    per_seed: dict[int, dict[str, float]] = {}
    for seed in seeds:
        print(f"==== {_name(config)} seed {seed} ({threads} torch threads)")
        per_seed[seed] = figures_of(
            run(replace(config, seed=seed, seeds="", output_dir=str(out / f"seed-{seed}")))
        )
    summary = {
        name: {"mean": statistics.fmean(v[name] for v in per_seed.values()),
               "min": min(v[name] for v in per_seed.values()), "max": max(v[name] for v in per_seed.values())}
        for name in per_seed[seeds[0]]
    }  # fmt: skip
    table = _markdown(per_seed, summary)
    title = f"{_name(config)} --seeds {config.seeds}"
    print(f"{title}: held-out reward of greedy answers, {threads} torch threads")
    print(table)
    result = {"command": title, "threads": threads, "seeds": seeds, "per_seed": per_seed, "summary": summary}
    (out / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {out / 'seeds.json'}")
    return result


def _name(config: DemoConfig) -> str:
    return f"demo --losses {config.losses}" if config.losses else "demo --online" if config.online else "demo"


def _markdown(per_seed: dict[int, dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    seeds = list(per_seed)
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min | max |",
             "|---" * (len(seeds) + 4) + "|"]  # fmt: skip
    for name, stats in summary.items():
        fmt = "{:+.3f}" if "minus" in name else "{:.3f}"
        cells = [fmt.format(per_seed[s][name]) for s in seeds]
        cells += [fmt.format(stats[k]) for k in ("mean", "min", "max")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
