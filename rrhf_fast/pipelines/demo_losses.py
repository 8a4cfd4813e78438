"""`rrhf-fast demo --losses rrhf,pro,lipo,dpo-pl,simpo`: the ranking losses compared on the demo's task.

The offline demo's data (demo.py: gold answers for a share of the queries, corrupted copies, the
initial model's samples, scored by the reward function). A short SFT warm-up on gold answers for
`--demo-fraction` of the training prompts (`--sft-warmup` steps, as `demo --online`) gives the
starting policy of every run and the reference of the losses that need one (dpo, dpo-pl, lipo:
`ref_logps` from it, through `add_reference_logps`, the code of `rrhf-fast ref-logps`). Then each
loss trains through `rrhf-fast train`'s loop with the same data, steps, learning rate and seed, its
own hyperparameters at their defaults (the papers'), and its greedy held-out answers are scored.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

from rrhf_fast.config import REFERENCE_LOSSES
from rrhf_fast.data.records import write_examples
from rrhf_fast.pipelines.demo_online import _warmup
from rrhf_fast.pipelines.demo_task import DemoConfig, digits_of, prepare_task, score_greedy, train_config


def run_loss_demo(config: DemoConfig) -> dict[str, Any]:
    """Warm up, then train each of `config.losses`; print and return every held-out reward."""
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.loading import quiet_progress_bars
    from rrhf_fast.objectives.dpo import add_reference_logps
    from rrhf_fast.training.train import train

    started = time.perf_counter()
    out = Path(config.output_dir)
    task = prepare_task(config, out)
    losses = [n.strip() for n in config.losses.split(",")]
    train_q = [digits_of(ex.query) for ex in task.examples[: config.train_queries]]
    for name in ("train-ref.jsonl", "eval-ref.jsonl"):  # computed again from this run's warm-up
        (out / name).unlink(missing_ok=True)
    demos = train_q[: max(1, round(config.demo_fraction * len(train_q)))]
    policy = _warmup(config, task.model_dir, out, demos) if config.sft_warmup else task.model_dir
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(policy)
    start, _ = score_greedy(model, task.tokenizer, task.eval_queries, config.max_digits)
    print(f"demo --losses: {len(losses)} losses, {config.steps} steps each from the SFT warm-up "
          f"({config.sft_warmup} steps on gold answers for {len(demos)} prompts), {config.train_queries} "
          f"training queries, seed {config.seed}")  # fmt: skip
    print(f"  held-out reward (greedy): initial model {task.before:.3f}, warmed-up policy {start:.3f}")

    results: dict[str, Any] = {"before": task.before, "start": start, "losses": {}}
    for loss in losses:
        t0 = time.perf_counter()
        cfg = dataclasses.replace(train_config(config, policy, out, loss, 1.0), loss=loss, plot=False)
        if loss in REFERENCE_LOSSES:  # the warmed-up policy is the reference
            cfg = _with_reference(model, task, cfg, out, add_reference_logps)
        result = train(cfg)
        after, _ = score_greedy(result.model, task.tokenizer, task.eval_queries, config.max_digits)
        accuracy = result.last.get("eval_accuracy")
        seconds = time.perf_counter() - t0
        results["losses"][loss] = {"reward": after, "eval_accuracy": accuracy, "seconds": seconds}
        print(f"  {loss:7s} held-out reward {start:.3f} -> {after:.3f}, ranking accuracy "
              f"{_fmt(accuracy)}, {seconds:.0f} s; run in {out / loss}")  # fmt: skip
    results["seconds"] = time.perf_counter() - started
    print(f"  total time {results['seconds']:.0f} s")
    print("demo: losses " + ", ".join(f"{n} {r['reward']:.3f}" for n, r in results["losses"].items()))
    return results


def _with_reference(model: Any, task: Any, cfg: Any, out: Path, add_reference_logps: Any) -> Any:
    """`cfg` reading train-ref.jsonl / eval-ref.jsonl: the data with the policy's ref_logps (once)."""
    paths = {"train": out / "train-ref.jsonl", "eval": out / "eval-ref.jsonl"}
    if not all(p.exists() for p in paths.values()):
        n = len(task.examples) - len(task.eval_queries)
        for name, part in (("train", task.examples[:n]), ("eval", task.examples[n:])):
            examples = copy.deepcopy(part)
            add_reference_logps(model, task.tokenizer, examples, cfg)
            write_examples(paths[name], examples)
    return dataclasses.replace(cfg, data=str(paths["train"]), eval_data=str(paths["eval"]))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
