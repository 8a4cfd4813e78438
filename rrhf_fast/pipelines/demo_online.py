"""`rrhf-fast demo --online`: the demo's sorting task as an RLHF pipeline, offline vs online.

1. SFT warm-up: the random tiny model is fine-tuned for `--sft-warmup` steps on demonstrations
   (gold answers) for `--demo-fraction` of the training prompts: the starting policy of every run.
2. Reward-only RRHF through `rrhf-fast iterate`: per prompt, `--samples` candidates from the policy
   (diverse beam search, the RRHF paper's sampling policy, by default), scored by the task's reward
   (`python:rrhf_fast.pipelines.demo_task:query_reward`), no gold answers; held-out prompts answered greedily.
   - offline: ONE round of `--steps` steps on candidates of the starting policy;
   - online: `--rounds` rounds of `--steps / --rounds` steps, each sampling from the policy the
     previous round left: the same prompts, total steps and seed.
   With `--sft-baseline`, both again with `--rank-weight 0` (SFT on each prompt's best candidate).
   With `--reward-model` (demo_rm.py), online RRHF once more, scored by a reward model that
   `train-rm` learned from the function's labels; its held-out reward is still the function's.

Why this design (measured, see the README): a random model's candidates all score 0, so there is
nothing to rank without the warm-up; temperature-1 samples of the tiny model score far below its
greedy answers (0.14 vs 0.49 for seed 0), so training on them lowers the greedy reward, while beams
cover the mode; and gold answers in the rounds let SFT alone solve the task (0.99 in 300 steps),
leaving nothing for online sampling to add.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Any

from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.generation.sample import SampleConfig
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.pipelines.demo_rm import train_reward_model, true_rewards
from rrhf_fast.pipelines.demo_task import DemoConfig, distinct_queries, gold_of, prompt_of, train_config
from rrhf_fast.pipelines.iterate import IterateConfig, Settings, iterate

SCORER = "python:rrhf_fast.pipelines.demo_task:query_reward"
# name: (label, online, --rank-weight)
RUNS = {
    "offline": ("offline RRHF", False, 1.0),
    "online": ("online RRHF", True, 1.0),
    "offline-sft": ("offline SFT-only", False, 0.0),
    "online-sft": ("online SFT-only", True, 0.0),
    "online-rm": ("online RRHF (RM)", True, 1.0),
}


def run_online_demo(config: DemoConfig) -> dict[str, Any]:
    """Warm up, then each run of RUNS; returns every run's held-out rewards by round."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy, files = _task(config, out)
    print(f"demo --online: SFT warm-up ({config.sft_warmup} steps on gold answers for "
          f"{config.demo_fraction:.0%} of {config.train_queries} prompts), then reward-only RRHF on "
          f"{config.samples} {config.strategy} candidates per prompt from the policy, {config.steps} "
          f"steps per run: offline in 1 round, online in {config.rounds}")  # fmt: skip
    results: dict[str, Any] = {}
    names = ["offline", "online", *(["offline-sft", "online-sft"] if config.sft_baseline else [])]
    for name in names:
        label, online, rank_weight = RUNS[name]
        t0 = time.perf_counter()
        rows = iterate(
            _settings(config, policy, files, out / name, config.rounds if online else 1, rank_weight)
        )
        results[name] = {"rewards": [row["eval_reward"] for row in rows], "seconds": time.perf_counter() - t0}
    if config.reward_model:
        results["reward_model"] = _reward_model_run(config, policy, files, out)
        results["online-rm"] = results["reward_model"].pop("run")
    results["seconds"] = time.perf_counter() - started
    _print_summary(config, results, out)
    offline, online = results["offline"]["rewards"], results["online"]["rewards"]
    print(f"demo: online reward {online[0]:.3f} -> {online[-1]:.3f} (offline {offline[-1]:.3f})")
    return results


def _task(config: DemoConfig, out: Path) -> tuple[Path, dict[str, Path]]:
    """The warmed-up starting policy and the prompts files."""
    rng = random.Random(config.seed)
    model_dir = save_tiny_model(out / "init-model", seed=config.seed, hidden_size=config.hidden_size,
                                layers=config.layers)  # fmt: skip
    queries = distinct_queries(rng, config.train_queries + config.eval_queries, config)
    train_q, eval_q = queries[: config.train_queries], queries[config.train_queries :]
    files = {"prompts": out / "prompts.txt", "eval_prompts": out / "eval_prompts.txt"}
    files["prompts"].write_text("".join(prompt_of(d) + "\n" for d in train_q), encoding="utf-8")
    files["eval_prompts"].write_text("".join(prompt_of(d) + "\n" for d in eval_q), encoding="utf-8")
    demos = train_q[: max(1, round(config.demo_fraction * len(train_q)))]
    return (_warmup(config, model_dir, out, demos) if config.sft_warmup else model_dir), files


def _warmup(config: DemoConfig, model_dir: Path, out: Path, demos: list[str]) -> Path:
    """SFT on gold answers (one response per query: the RRHF loss is its SFT term alone)."""
    from rrhf_fast.training.train import train

    write_examples(out / "demos.jsonl", [Example(prompt_of(d), [gold_of(d)], [1.0]) for d in demos])
    cfg = dataclasses.replace(train_config(config, model_dir, out, "sft-warmup", 0.0), eval_data=None,
                              data=str(out / "demos.jsonl"), eval_every=0, max_steps=config.sft_warmup,
                              plot=False)  # fmt: skip
    return train(cfg).checkpoint


def _reward_model_run(config: DemoConfig, policy: Path, files: dict[str, Path], out: Path) -> dict[str, Any]:
    """train-rm on the function's labels, then the online run scored by the reward model; the run's
    held-out rewards are its greedy answers scored again by the function."""
    t0 = time.perf_counter()
    rm = train_reward_model(config, policy, files, out, _sample_config(config))
    rm["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_dir = out / "online-rm"
    rows = iterate(
        _settings(config, policy, files, run_dir, config.rounds, 1.0, f"reward-model:{rm['checkpoint']}")
    )
    rm["run"] = {"rewards": true_rewards(run_dir, rows), "rm_rewards": [row["eval_reward"] for row in rows],
                 "seconds": time.perf_counter() - t0}  # fmt: skip
    return rm


def _settings(
    config: DemoConfig,
    policy: Path,
    files: dict[str, Path],
    run_dir: Path,
    rounds: int,
    rank_weight: float,
    scorer: str = SCORER,
) -> Settings:
    if run_dir.exists():  # the demo always starts over
        shutil.rmtree(run_dir)
    steps = max(1, config.steps // rounds)
    train = dataclasses.replace(
        train_config(config, policy, run_dir, "unused", rank_weight),
        data="", output_dir="", eval_data=None, eval_every=0, max_steps=steps,
        warmup_steps=max(1, steps // 20), plot=False,
    )  # fmt: skip
    run = IterateConfig(output_dir=str(run_dir), prompts=str(files["prompts"]), scorer=scorer,
                        eval_prompts=str(files["eval_prompts"]), rounds=rounds, num_candidates=config.samples,
                        dedup=True)  # fmt: skip
    return Settings(run, train, _sample_config(config))


def _sample_config(config: DemoConfig) -> SampleConfig:
    """How every run, and the reward model's labelled data, draws candidates from the policy."""
    return SampleConfig(strategy=config.strategy, temperature=config.temperature, batch_size=64,
                        seed=config.seed, max_new_tokens=config.max_digits + 2)  # fmt: skip


def _print_summary(config: DemoConfig, results: dict[str, Any], out: Path) -> None:
    print("  held-out reward (greedy answers) by round; round 0 is the warmed-up starting policy")
    for name in (n for n in RUNS if n in results):
        rewards = "  ".join(f"{r:.3f}" for r in results[name]["rewards"])
        seconds = results[name]["seconds"]
        print(f"    {RUNS[name][0]:17s} {rewards}   ({seconds:.0f} s, {out / name}/rounds.jsonl)")
    final = {name: results[name]["rewards"][-1] for name in RUNS if name in results}
    line = (
        f"  online minus offline (same prompts, steps, seed): RRHF {final['online'] - final['offline']:+.3f}"
    )
    if "online-sft" in final:
        gains = (final["online-sft"] - final["offline-sft"], final["offline"] - final["offline-sft"],
                 final["online"] - final["online-sft"])  # fmt: skip
        line += ", SFT-only {:+.3f}; RRHF minus SFT-only: offline {:+.3f}, online {:+.3f}".format(*gains)
    print(line + f"; total time {results['seconds']:.0f} s")
    if "reward_model" in results:
        _print_reward_model(results, final, out)


def _print_reward_model(results: dict[str, Any], final: dict[str, float], out: Path) -> None:
    rm, own = results["reward_model"], results["online-rm"]["rm_rewards"]
    print(
        f"  reward model ({out / 'reward-model'}, train-rm, {rm['steps']} steps on the function's labels of "
        f"{rm['train_prompts']} prompts' candidates, {rm['seconds']:.0f} s): held-out pairwise accuracy "
        f"{rm['accuracy_start']:.3f} -> {rm['accuracy']:.3f} ({rm['eval_pairs']} pairs)"
    )
    print(
        f"  final held-out reward (by the function) of online RRHF scored by the reward model "
        f"{final['online-rm']:.3f}, scored by the function {final['online']:.3f}; the reward model's own "
        f"score of the RM run's answers by round: {'  '.join(f'{r:.3f}' for r in own)}"
    )
