"""`rrhf-fast demo --online --reward-model`: the online demo scored by a learned reward model.

The task's reward function labels candidates once: per prompt, the warmed-up policy's own
candidates (drawn as the online rounds draw theirs), two corrupted gold answers and, for
`--gold-fraction` of the prompts, the gold answer. `rrhf-fast train-rm` (`train --loss rm`, the
warmed-up policy as its backbone) learns from the training prompts' labels; its held-out pairwise
accuracy is measured on the held-out prompts' labels. The online rounds then score with
`reward-model:DIR` instead of the function, and the policy's greedy held-out answers, which
`iterate` scores with the reward model, are scored again with the function: the true reward.
"""

from __future__ import annotations

import dataclasses
import json
import random
from itertools import combinations
from pathlib import Path
from typing import Any

from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.generation.sample import SampleConfig, generate_candidates, read_prompts
from rrhf_fast.pipelines.demo_task import DemoConfig, corrupt, digits_of, gold_of, query_reward, train_config


def train_reward_model(
    config: DemoConfig, policy: Path, files: dict[str, Path], out: Path, sample: SampleConfig
) -> dict[str, Any]:
    """Label, train; returns the checkpoint and the held-out pairwise accuracy before and after."""
    from rrhf_fast.training.train import train

    rng = random.Random(config.seed)
    data, examples = {}, {}
    for name, prompts_file in (("train", files["prompts"]), ("eval", files["eval_prompts"])):
        data[name] = out / f"rm-{name}.jsonl"
        examples[name] = labelled(config, policy, read_prompts(prompts_file), rng, sample)
        write_examples(data[name], examples[name])
    steps = config.rm_steps
    cfg = dataclasses.replace(train_config(config, policy, out, "reward-model", 1.0), loss="rm",
                              data=str(data["train"]), eval_data=str(data["eval"]), max_steps=steps,
                              eval_every=steps, warmup_steps=max(1, steps // 20), plot=False)  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "reward-model" / "metrics.jsonl").read_text().splitlines()]
    return {"checkpoint": result.checkpoint, "accuracy_start": rows[0]["eval_accuracy"],
            "accuracy": result.last["eval_accuracy"], "eval_pairs": _pairs(examples["eval"]),
            "train_prompts": len(examples["train"]), "steps": steps}  # fmt: skip


def labelled(
    config: DemoConfig, policy: Path, prompts: list[str], rng: random.Random, sample: SampleConfig
) -> list[Example]:
    """Each prompt's distinct non-empty candidates, scored by the task's reward function."""
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.loading import load_pretrained, quiet_progress_bars

    with quiet_progress_bars():
        model, tokenizer = load_pretrained(str(policy), AutoModelForCausalLM, "cpu", "auto")
    sampled = generate_candidates(model, tokenizer, prompts, config.samples, sample)
    examples = []
    for prompt, candidates in zip(prompts, sampled, strict=True):
        gold = gold_of(digits_of(prompt))
        extra = [corrupt(rng, gold, 1), corrupt(rng, gold, 3)]
        extra += [gold] if rng.random() < config.gold_fraction else []
        responses = [r for r in dict.fromkeys([*candidates, *extra]) if r]
        examples.append(Example(prompt, responses, [query_reward(prompt, r) for r in responses]))
    return examples


def true_rewards(run_dir: Path, rows: list[dict[str, Any]]) -> list[float]:
    """Each round's greedy held-out answers (round-NNN/eval.jsonl) scored by the task's function."""
    out = []
    for row in rows:
        lines = (
            (run_dir / f"round-{row['round']:03d}" / "eval.jsonl").read_text(encoding="utf-8").splitlines()
        )
        answers = [json.loads(line) for line in lines]
        out.append(sum(query_reward(a["query"], a["answer"]) for a in answers) / len(answers))
    return out


def _pairs(examples: list[Example]) -> int:
    """The pairs with different scores: the ones pairwise accuracy counts."""
    return sum(a != b for ex in examples for a, b in combinations(ex.scores, 2))
