"""`rrhf-fast iterate`: online RRHF. Each round samples from the CURRENT policy, scores, trains.

Round r (1..R) in `OUTPUT_DIR/round-NNN/`, one stage after another, each stage's file written
atomically and only when the stage is done:

    sampled.jsonl    k candidates per prompt from the round's starting policy (+ the --merge files)
    scored.jsonl     the same, scored by --scorer
    reference.jsonl  --loss dpo, dpo-pl, lipo only: the scored data with the starting policy's ref_logps
    train/           `rrhf-fast train` on that data, starting from the round's starting policy
    trained.json     the final checkpoint of train/: the next round's policy (with --lora-r, merged/:
                     the adapter folded into the round's starting model)
    eval.jsonl       greedy answers to --eval-prompts, scored by the same scorer
    round.json       the round's summary, written last: the round is complete

`round-000/` holds the starting model's evaluation, and `rounds.jsonl` one summary line per round.
`--resume` skips complete rounds and continues an interrupted one from its last complete stage
(an interrupted training continues from its last checkpoint, as `rrhf-fast train --resume` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_fast import config as config_module
from rrhf_fast.checkpointing.checkpoint import latest_checkpoint
from rrhf_fast.config import REFERENCE_LOSSES, RENAMED_FIELDS, TrainConfig, config_from_args, opt
from rrhf_fast.data.outputs import make_output_dir, remove_created
from rrhf_fast.data.records import Example, load_examples, write_examples, write_text_atomically
from rrhf_fast.errors import UserError
from rrhf_fast.generation.sample import SampleConfig, build_examples, read_prompts
from rrhf_fast.generation.score import KINDS, ScoreConfig, build_scorer, score_examples

ROUND_FILE, TRAINED_FILE, SUMMARY_FILE, CONFIG_FILE = (
    "round.json",
    "trained.json",
    "rounds.jsonl",
    "iterate.json",
)
# TrainConfig flags that iterate sets itself, per round.
_TRAIN_SKIP = ("data", "output_dir", "eval_data", "eval_every", "resume")
# Sampling tokenises prompts exactly as training does: these come from the training flags.
_SAMPLE_SKIP = ("max_prompt_len", "chat_template")


@dataclass
class IterateConfig:
    output_dir: str = field(
        metadata={"help": "one round-NNN/ directory per round, and rounds.jsonl", "metavar": "DIR"}
    )
    prompts: str = field(
        metadata={
            "help": 'training prompts: one per line, or JSONL {"query"} / {"prompt"}: text or messages',
            "metavar": "FILE",
        }  # fmt: skip
    )
    scorer: str = field(
        metadata={
            "help": "reward-model:PATH | python:MODULE:FUNCTION | judge:PATH | direct:PATH",
            "metavar": "SPEC",
        }
    )
    eval_prompts: str | None = opt(
        None, "held-out prompts: each round's greedy answers are scored", metavar="FILE"
    )
    rounds: int = opt(3, "sample -> score -> train rounds")
    num_candidates: int = opt(4, "candidates sampled from the current policy per prompt and round")
    merge: tuple[str, ...] = opt(
        (), "JSONL of fixed extra responses, added every round (repeatable)", metavar="FILE"
    )
    dedup: bool = opt(False, "drop repeated identical responses of a prompt")
    resume: bool = opt(
        False, "skip complete rounds, continue an interrupted one from its last complete stage"
    )


@dataclass
class Settings:
    """Everything a run needs; `train.data` and `train.output_dir` are set per round."""

    run: IterateConfig
    train: TrainConfig
    sample: SampleConfig = field(default_factory=SampleConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in ("run", "train", "sample", "score")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group
    config_module.add_arguments(group("the loop"), IterateConfig)
    train = group("training, each round (the flags of rrhf-fast train)")
    config_module.add_arguments(train, TrainConfig, skip=_TRAIN_SKIP)
    config_module.add_arguments(group("sampling (the flags of rrhf-fast sample)"), SampleConfig,
                                prefix="sample_", skip=_SAMPLE_SKIP)  # fmt: skip
    config_module.add_arguments(group("scoring (the flags of rrhf-fast score)"), ScoreConfig,
                                prefix="score_")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    run = config_from_args(args, IterateConfig)
    train = config_from_args(args, TrainConfig, data="", output_dir="", eval_data=None, eval_every=0,
                             resume=False)  # fmt: skip
    sample = config_from_args(args, SampleConfig, prefix="sample_", max_prompt_len=train.max_prompt_len,
                              chat_template=train.chat_template)  # fmt: skip
    rows = iterate(Settings(run, train, sample, config_from_args(args, ScoreConfig, prefix="score_")))
    summary = Path(run.output_dir) / SUMMARY_FILE
    print(f"iterate: held-out reward by round: {_rewards(rows)}; summary in {summary}")
    return 0


# -------------------------------------------------------------------------------------------------
# the loop


def iterate(settings: Settings) -> list[dict[str, Any]]:
    """Run (or resume) every round; returns the summary rows (round 0: the starting model)."""
    prompts, eval_prompts = read_prompts(settings.run.prompts), _eval_prompts(settings)
    out, created = _prepare(settings)
    try:
        return _rounds(settings, out, prompts, eval_prompts)
    except BaseException:
        _undo_empty_start(out, created)
        raise


def _rounds(settings: Settings, out: Path, prompts: list, eval_prompts: list) -> list[dict[str, Any]]:
    rows = []
    if eval_prompts:
        rows.append(_round_zero(settings, out / "round-000", eval_prompts))
        _write_summary(out, rows)
    policy = settings.train.model
    for r in range(1, settings.run.rounds + 1):
        row = _round(settings, out / f"round-{r:03d}", r, policy, prompts, eval_prompts)
        rows.append(row)
        _write_summary(out, rows)
        policy = str(out / row["model"])
        print(f"iterate: round {r}/{settings.run.rounds} done: {_brief(row)}")
    return rows


def _round(
    settings: Settings, rdir: Path, r: int, policy: str, prompts: list[Any], eval_prompts: list[Any]
) -> dict:
    if (rdir / ROUND_FILE).exists():
        print(f"iterate: round {r} is complete, skipped")
        return _read_json(rdir / ROUND_FILE)
    rdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    sampled, scored, data = rdir / "sampled.jsonl", rdir / "scored.jsonl", rdir / "scored.jsonl"
    _stage(sampled, seconds, "sample", lambda path: _sample(settings, policy, r, prompts, path))
    _stage(scored, seconds, "score", lambda path: _score(settings, sampled, path))
    if settings.train.loss in REFERENCE_LOSSES:
        data = rdir / "reference.jsonl"
        _stage(data, seconds, "reference", lambda path: _reference(settings, policy, scored, path))
    train_dir = rdir / "train"
    _stage(
        rdir / TRAINED_FILE, seconds, "train", lambda path: _train(settings, policy, data, train_dir, path)
    )
    trained = _read_json(rdir / TRAINED_FILE)
    eval_reward = None
    if eval_prompts:
        _stage(
            rdir / "eval.jsonl",
            seconds,
            "eval",
            lambda path: _evaluate(settings, str(rdir.parent / trained["model"]), eval_prompts, path),
        )
        eval_reward = _mean_reward(rdir / "eval.jsonl")
    row = {"round": r, "model": trained["model"], "eval_reward": eval_reward, **_data_stats(settings, data),
           "train_steps": trained["step"], "train_loss": trained["loss"], "seconds": seconds}  # fmt: skip
    _write_json(rdir / ROUND_FILE, row)
    return row


def _round_zero(settings: Settings, rdir: Path, eval_prompts: list[Any]) -> dict:
    """The starting model's held-out reward, the baseline every round is compared with."""
    if not (rdir / ROUND_FILE).exists():
        rdir.mkdir(parents=True, exist_ok=True)
        _stage(
            rdir / "eval.jsonl",
            {},
            "eval",
            lambda path: _evaluate(settings, settings.train.model, eval_prompts, path),
        )
        _write_json(rdir / ROUND_FILE, {"round": 0, "model": settings.train.model,
                                        "eval_reward": _mean_reward(rdir / "eval.jsonl")})  # fmt: skip
    return _read_json(rdir / ROUND_FILE)


def _stage(path: Path, seconds: dict[str, float], name: str, run) -> None:
    """Run a stage unless its file exists; the stage writes `path` atomically, last."""
    if path.exists():
        return
    t0 = time.perf_counter()
    run(path)
    seconds[name] = round(time.perf_counter() - t0, 3)


# -------------------------------------------------------------------------------------------------
# the stages


def _sample(settings: Settings, policy: str, r: int, prompts: list[Any], path: Path) -> None:
    from rrhf_fast.generation.sample import generate_candidates

    k = settings.run.num_candidates
    seed = None if settings.sample.seed is None else settings.sample.seed + r - 1  # new draws each round
    config = dataclasses.replace(settings.sample, seed=seed).validate(k)
    model, tokenizer = _load_policy(settings, policy)
    candidates = generate_candidates(model, tokenizer, prompts, k, config)
    examples = build_examples(
        prompts, candidates, config.sources(k), merge=settings.run.merge, dedup=settings.run.dedup
    )
    if not examples:
        raise UserError(
            f"round {r}: {policy} gave only empty responses (EOS first) and --merge added none: there is "
            "nothing to train on; start from a model that answers the prompts (e.g. after SFT)"
        )
    write_examples(path, examples)


def _score(settings: Settings, sampled: Path, path: Path) -> None:
    examples = load_examples(sampled, require_scores=False)
    score_examples(examples, build_scorer(settings.run.scorer, settings.score))
    write_examples(path, examples)


def _reference(settings: Settings, policy: str, scored: Path, path: Path) -> None:
    """The round's starting policy is the DPO reference: its log-prob sums, stored with the data."""
    from rrhf_fast.objectives.dpo import add_reference_logps

    examples = load_examples(scored)
    model, tokenizer = _load_policy(
        settings, policy, dtype="bfloat16" if settings.train.dtype == "bfloat16" else "float32"
    )
    add_reference_logps(model, tokenizer, examples, settings.train)
    write_examples(path, examples)


def _train(settings: Settings, policy: str, data: Path, run_dir: Path, path: Path) -> None:
    from rrhf_fast.training.train import train

    resume = run_dir.is_dir() and latest_checkpoint(run_dir) is not None  # an interrupted training
    name = f"{settings.train.run_name or Path(settings.run.output_dir).resolve().name}-{run_dir.parent.name}"
    config = dataclasses.replace(  # --report-to: one tracked run per round, named after it
        settings.train, model=policy, data=str(data), output_dir=str(run_dir), resume=resume, run_name=name
    )
    result = train(config)
    loss = result.last.get("loss") if result.last else None
    model_dir = Path(result.checkpoint)
    if (model_dir / "adapter_config.json").is_file():
        model_dir = _merge_adapter(model_dir, policy, path.parent / "merged")
    model = os.path.relpath(model_dir, path.parent.parent)  # relative to --output-dir
    _write_json(path, {"model": model, "step": result.step, "loss": loss})


def _merge_adapter(checkpoint: Path, base: str, dest: Path) -> Path:
    """--lora-r: the adapter folded into the round's starting model, the next round's full model
    (another adapter on top of a loaded one would be saved without it)."""
    from rrhf_fast.checkpointing.merge import merge

    tmp = dest.with_name(f".{dest.name}.tmp")
    for stale in (tmp, dest):
        shutil.rmtree(stale, ignore_errors=True)
    merge(checkpoint, tmp, base=base)
    os.replace(tmp, dest)
    return dest


def _evaluate(settings: Settings, model_path: str, prompts: list[Any], path: Path) -> None:
    """Greedy answers, scored by the run's scorer: the held-out reward of the policy."""
    from rrhf_fast.generation.sample import generate_candidates

    model, tokenizer = _load_policy(settings, model_path)
    sample, train = settings.sample, settings.train
    greedy = SampleConfig(strategy="greedy", max_new_tokens=sample.max_new_tokens, stop=sample.stop,
                          batch_size=sample.batch_size, max_prompt_len=train.max_prompt_len,
                          chat_template=train.chat_template)  # fmt: skip
    answers = [a for (a,) in generate_candidates(model, tokenizer, prompts, 1, greedy)]
    del model
    scored = score_examples([Example(q, [a], []) for q, a in zip(prompts, answers, strict=True)],
                            build_scorer(settings.run.scorer, settings.score))  # fmt: skip
    rows = [{"query": ex.query, "answer": ex.responses[0], "reward": ex.scores[0]} for ex in scored]
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _load_policy(settings: Settings, path: str, dtype: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.loading import load_pretrained, quiet_progress_bars

    with quiet_progress_bars():
        return load_pretrained(path, AutoModelForCausalLM, settings.train.device, dtype)


# -------------------------------------------------------------------------------------------------
# bookkeeping


def _prepare(settings: Settings) -> tuple[Path, list[Path]]:
    if settings.run.rounds < 1 or settings.run.num_candidates < 1:
        raise UserError("--rounds and --num-candidates must be at least 1")
    settings.train.validate()
    if settings.train.loss == "rm":
        raise UserError(
            "--loss rm trains a reward model, not the policy iterate samples from; train it with "
            "`rrhf-fast train-rm` and pass --scorer reward-model:DIR"
        )
    settings.sample.validate(settings.run.num_candidates)
    kind, _, target = settings.run.scorer.partition(":")
    if kind == "python" or kind not in KINDS or not target:
        build_scorer(settings.run.scorer)  # a bad spec or function fails now, not after the first sampling
    created = make_output_dir(settings.run.output_dir)  # the flag as given: Path("") would be "."
    out = Path(settings.run.output_dir)
    saved = out / CONFIG_FILE
    if saved.exists() and not settings.run.resume:
        remove_created(created)
        raise UserError(f"--output-dir {out} already holds an iterate run; pass --resume to continue it "
                        "or choose a new --output-dir")  # fmt: skip
    if saved.exists():
        old = _read_json(saved)
        if isinstance(old.get("train"), dict):  # a run saved before TrainConfig renamed fields
            old["train"] = {RENAMED_FIELDS.get(k, k): v for k, v in old["train"].items()}
        changed = _changed(old, json.loads(json.dumps(settings.to_dict())))
        if changed:
            print(f"iterate: resuming with changed flags: {', '.join(changed)}")
    _write_json(saved, settings.to_dict())
    return out, created


def _undo_empty_start(out: Path, created: list[Path]) -> None:
    """A run that failed before any stage wrote its file (a bad model, a bad scorer) leaves nothing:
    the output directory it created goes, with its config and empty round directories."""
    if not created:
        return
    files = [p for p in out.rglob("*") if not p.is_dir()]
    if files != [out / CONFIG_FILE]:
        return
    (out / CONFIG_FILE).unlink()
    for sub in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        sub.rmdir()
    remove_created(created)


def _changed(old: dict, new: dict) -> list[str]:
    return [f"{part}.{k}: {old.get(part, {}).get(k)!r} -> {v!r}" for part, values in new.items()
            for k, v in values.items() if k != "resume" and old.get(part, {}).get(k) != v]  # fmt: skip


def _eval_prompts(settings: Settings) -> list[Any]:
    return read_prompts(settings.run.eval_prompts) if settings.run.eval_prompts else []


def _data_stats(settings: Settings, data: Path) -> dict[str, Any]:
    """The training data's rewards: the policy's own candidates, and the best per prompt."""
    examples = load_examples(data)
    own = set(settings.sample.sources(settings.run.num_candidates))
    sampled = [sc for ex in examples for sc, src in zip(ex.scores, _sources(ex), strict=True) if src in own]
    return {"prompts": len(examples), "responses": sum(len(ex.responses) for ex in examples),
            "sampled_reward": sum(sampled) / len(sampled) if sampled else None,
            "best_reward": sum(max(ex.scores) for ex in examples) / len(examples)}  # fmt: skip


def _sources(ex: Example) -> list[str]:
    names = ex.meta.get("sources")
    return names if isinstance(names, list) and len(names) == len(ex.responses) else [""] * len(ex.responses)


def _mean_reward(path: Path) -> float:
    rewards = [json.loads(line)["reward"] for line in path.read_text(encoding="utf-8").splitlines()]
    return math.fsum(rewards) / len(rewards)


def _write_summary(out: Path, rows: list[dict]) -> None:
    write_text_atomically(out / SUMMARY_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def _brief(row: dict) -> str:
    shown = {
        k: v for k, v in row.items() if k in ("eval_reward", "sampled_reward", "best_reward", "train_loss")
    }
    return ", ".join(f"{k} {v:.4f}" for k, v in shown.items() if isinstance(v, float))


def _rewards(rows: list[dict]) -> str:
    return (
        " -> ".join(f"{row['eval_reward']:.3f}" for row in rows if row.get("eval_reward") is not None) or "-"
    )
