"""`rrhf-fast demo`: RRHF end to end on a CPU in a few minutes, nothing downloaded.

The task (demo_task.py): sort a short string of digits ("sort 4193:" -> "1349"), rewarded with
partial credit. A tiny random-initialised causal LM (rrhf_fast.models.tiny) with the local
byte-level tokenizer is trained offline on ranked candidates from three sources: the gold answer
(for only a share of the queries), corrupted copies of it, and the model's own samples, all scored
by the reward function. Training runs through `rrhf-fast train`'s
own loop; held-out prompts are answered greedily and scored before and after, once for RRHF and
once for an SFT-only baseline (`--rank-weight 0`) trained for the same steps on the same data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from rrhf_fast import config as config_module
from rrhf_fast import cpu_pins
from rrhf_fast.data.records import Example, write_examples  # noqa: F401 (importable from here, as before)
from rrhf_fast.models.tiny import save_tiny_model  # noqa: F401 (importable from here, as before)
from rrhf_fast.pipelines.demo_task import (  # noqa: F401 (build_examples .. generate: importable from here)
    DemoConfig,
    build_examples,
    check_config,
    distinct_queries,
    generate,
    prepare_task,
    prompt_of,
    reward,
    score_greedy,
    train_config,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_module.add_arguments(parser, DemoConfig)


def main(args: argparse.Namespace) -> int:
    config = config_module.config_from_args(args, DemoConfig)
    check_config(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        print(cpu_pins.describe(cpu_pins.report()))
        _run(config)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(config: DemoConfig) -> None:
    if config.losses:
        from rrhf_fast.pipelines.demo_losses import run_loss_demo as run
    elif config.online:
        from rrhf_fast.pipelines.demo_online import run_online_demo as run
    else:
        run = run_demo
    if config.seeds:
        from rrhf_fast.pipelines.demo_seeds import run_seeds

        run_seeds(config, run)
    else:
        run(config)


# -------------------------------------------------------------------------------------------------
# the demo


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Build data, train RRHF (and the SFT baseline), print rewards; return the figures."""
    from rrhf_fast.training.train import train

    started = time.perf_counter()
    out = Path(config.output_dir)
    task = prepare_task(config, out)
    model_dir, tokenizer, eval_q, before = task.model_dir, task.tokenizer, task.eval_queries, task.before
    _print_intro(config, task.examples[0], before, task.before_answers[:3], eval_q[:3])

    # ---- RRHF, then the SFT-only baseline, through the training loop of `rrhf-fast train`
    results: dict[str, Any] = {"before": before}
    runs = [("rrhf", 1.0)] + ([("sft", 0.0)] if config.sft_baseline else [])
    for name, rank_weight in runs:
        t0 = time.perf_counter()
        result = train(train_config(config, model_dir, out, name, rank_weight))
        after, answers = score_greedy(result.model, tokenizer, eval_q, config.max_digits)
        accuracy = result.last.get("eval_accuracy")
        results[name] = {"reward": after, "eval_accuracy": accuracy, "seconds": time.perf_counter() - t0}
        label = "RRHF (rank + SFT)" if name == "rrhf" else "SFT only (--rank-weight 0)"
        print(f"{label:27s} held-out reward {before:.3f} -> {after:.3f}, ranking accuracy "
              f"{accuracy:.3f}, {time.perf_counter() - t0:.0f} s; run in {out / name}")  # fmt: skip
        _print_answers(eval_q[:3], answers[:3])

    results["seconds"] = time.perf_counter() - started
    _print_summary(results, out)
    print(f"demo: reward {before:.3f} -> {results['rrhf']['reward']:.3f}")
    return results


def _print_intro(config: DemoConfig, example: Example, before: float, answers: list[str], queries: list[str]):
    print(f"demo: a tiny LM learns to sort digit strings on this CPU, {config.steps} steps per run")
    print(
        f"  data: {config.train_queries} training queries, {config.eval_queries} held-out; candidates from "
        f"gold ({config.gold_fraction:.0%} of queries), corrupted gold and the untrained model's samples"
    )
    cands = zip(example.responses, example.scores, example.meta["sources"], strict=True)
    print(f"  e.g. {example.query!r}: " + ", ".join(f"{r!r} ({s:.2f}, {src})" for r, s, src in cands))
    print(f"  held-out reward before training (greedy): {before:.3f}")
    _print_answers(queries, answers)


def _print_answers(queries: list[str], answers: list[str]) -> None:
    for digits, answer in zip(queries, answers, strict=True):
        print(f"    {prompt_of(digits)} {answer!r} (reward {reward(digits, answer):.2f})")


def _print_summary(results: dict[str, Any], out: Path) -> None:
    runs = ["rrhf"] + (["sft"] if "sft" in results else [])
    print(
        "  metrics and curves: " + ", ".join(f"{out / r}/metrics.jsonl, {out / r}/curves.png" for r in runs)
    )
    if "sft" in results:
        rrhf, sft = results["rrhf"], results["sft"]
        reward_gain, accuracy_gain = (
            rrhf["reward"] - sft["reward"],
            rrhf["eval_accuracy"] - sft["eval_accuracy"],
        )
        print(
            f"  RRHF minus SFT-only (same data, steps and seed): {reward_gain:+.3f} held-out reward, "
            f"{accuracy_gain:+.3f} ranking accuracy"
        )
    print(f"  total time {results['seconds']:.0f} s")
