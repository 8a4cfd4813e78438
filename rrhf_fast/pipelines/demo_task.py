"""The demo's task, shared by `rrhf-fast demo` (demo.py) and `rrhf-fast demo --online` (demo_online.py).

Sort a short string of distinct digits ("sort 4193:" -> "1349"). The reward is a Python function with
partial credit (the fraction of positions that match the sorted string, over the longer of the
two), so candidates are graded, not just right or wrong. Here: the flags of both demos, the
prompts, gold answers, reward and corruptions, greedy or sampled answers of the tiny model, and the
training config both demos start from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.models.wrapping import eval_mode


@dataclass
class DemoConfig:
    output_dir: str = field(
        default="demo_runs", metadata={"help": "where data, runs and plots go", "metavar": "DIR"}
    )
    steps: int = field(default=300, metadata={"help": "optimizer steps of each training run"})
    train_queries: int = field(default=1500, metadata={"help": "training queries"})
    eval_queries: int = field(default=150, metadata={"help": "held-out queries"})
    queries_per_step: int = field(default=16, metadata={"help": "queries per optimizer step"})
    gold_fraction: float = field(default=0.5, metadata={"help": "share of queries with the gold answer"})
    min_digits: int = field(default=3, metadata={"help": "shortest digit string (distinct digits)"})
    max_digits: int = field(default=6, metadata={"help": "longest digit string (at most 10)"})
    hidden_size: int = field(default=128, metadata={"help": "width of the tiny model"})
    layers: int = field(default=2, metadata={"help": "layers of the tiny model"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    optim: str = field(default="adamw8bit", metadata={"help": "optimizer", "choices": ("adamw8bit", "adamw")})
    seed: int = field(default=0, metadata={"help": "seed of the task, the model and the training"})
    sft_baseline: bool = field(default=True, metadata={"help": "also train the SFT-only baseline"})
    threads: int = field(default=2, metadata={
        "help": "CPU threads for torch (0: torch's default); 2, the count the README's figures were "
                "measured with: results depend on it"})  # fmt: skip
    seeds: str = field(default="", metadata={
        "help": "run once per seed ('0-4', '0,3,7') in OUTPUT_DIR/seed-N and print each figure per seed with "
                "its mean, min and max (OUTPUT_DIR/seeds.json)", "metavar": "SEEDS"})  # fmt: skip
    # ---- --losses (demo_losses.py)
    losses: str = field(default="", metadata={
        "help": "compare these losses (comma-separated --loss names, e.g. rrhf,pro,lipo,dpo-pl,simpo): each "
                "trained from the SFT warm-up (--sft-warmup) on the same data, steps and seed; the warmed-up "
                "policy is the reference of dpo, dpo-pl and lipo", "metavar": "LIST"})  # fmt: skip
    # ---- --online (demo_online.py)
    online: bool = field(
        default=False, metadata={"help": "SFT warm-up, then offline vs online RRHF (iterate)"}
    )
    rounds: int = field(default=3, metadata={"help": "--online: rounds sharing the --steps"})
    samples: int = field(default=4, metadata={"help": "--online: candidates from the policy per prompt"})
    strategy: str = field(default="beam", metadata={"help": "--online: how the candidates are drawn",
                                                    "choices": ("beam", "sample", "mixed")})  # fmt: skip
    temperature: float = field(default=1.0, metadata={"help": "--online: temperature of sample / mixed"})
    sft_warmup: int = field(
        default=20, metadata={"help": "--online and --losses: SFT steps on gold answers first"}
    )
    demo_fraction: float = field(
        default=0.2, metadata={"help": "--online: share of prompts with a gold answer"}
    )
    reward_model: bool = field(default=False, metadata={
        "help": "--online: also train a reward model on the reward function's labels and run online RRHF "
                "scored by it"})  # fmt: skip
    rm_steps: int = field(default=100, metadata={"help": "--online --reward-model: train-rm steps"})


# -------------------------------------------------------------------------------------------------
# prompts, gold answers, reward


def make_digits(rng: random.Random, min_digits: int, max_digits: int) -> str:
    """Distinct digits in random order: a tiny model learns to sort these in a few hundred steps."""
    return "".join(rng.sample("0123456789", rng.randint(min_digits, max_digits)))


def prompt_of(digits: str) -> str:
    return f"sort {digits}:"


def gold_of(digits: str) -> str:
    return "".join(sorted(digits))


def reward(digits: str, response: str) -> float:
    """Fraction of positions where `response` matches the sorted digits, over the longer length."""
    target = gold_of(digits)
    hits = sum(a == b for a, b in zip(response, target, strict=False))
    return hits / max(len(target), len(response), 1)


def digits_of(query: str) -> str:
    """The digits of a demo prompt ("sort 4193:" -> "4193")."""
    digits = query.removeprefix("sort ").removesuffix(":")
    if prompt_of(digits) != query:
        raise ValueError(f"not a demo prompt: {query!r}")
    return digits


def query_reward(query: str, response: str) -> float:
    """`reward` of a response to a demo prompt ("sort 4193:"); the scorer of `demo --online`."""
    return reward(digits_of(query), response)


def corrupt(rng: random.Random, text: str, edits: int) -> str:
    """`edits` random swaps, substitutions, deletions or duplications of digits; never `text` itself."""
    for _ in range(100):
        chars = list(text)
        for _ in range(edits):
            i = rng.randrange(len(chars))
            kind = rng.choice(("swap", "replace", "drop", "repeat")) if len(chars) > 1 else "replace"
            if kind == "swap":
                j = rng.randrange(len(chars))
                chars[i], chars[j] = chars[j], chars[i]
            elif kind == "replace":
                chars[i] = rng.choice("0123456789")
            elif kind == "drop":
                del chars[i]
            else:
                chars.insert(i, chars[i])
        if "".join(chars) != text:
            break
    return "".join(chars)


def build_examples(
    rng: random.Random, queries: list[str], samples: list[str], gold_fraction: float
) -> list[Example]:
    """Candidates per query: gold (for a share of queries), two corrupted golds, a model sample."""
    examples = []
    for digits, sample in zip(queries, samples, strict=True):
        gold = gold_of(digits)
        cands = [(corrupt(rng, gold, 1), "corrupted"), (corrupt(rng, gold, 3), "corrupted")]
        if rng.random() < gold_fraction:
            cands.insert(0, (gold, "gold"))
        cands.append((sample or "?", "sample"))
        responses = [text for text, _ in cands]
        scores = [reward(digits, text) for text in responses]
        meta = {"sources": [src for _, src in cands]}
        examples.append(Example(query=prompt_of(digits), responses=responses, scores=scores, meta=meta))
    return examples


# -------------------------------------------------------------------------------------------------
# answers of the tiny model


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Greedy (temperature 0) or sampled completions; prompts of one length run as one batch.

    No KV cache and no padding: the sequences are a few dozen tokens, and equal-length batches
    need no attention mask, so this stays exact for any attention implementation.
    """
    with eval_mode(model):
        return _generate(model, tokenizer, prompts, max_new_tokens, temperature, generator)


def _generate(model, tokenizer, prompts, max_new_tokens, temperature, generator) -> list[str]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        ids = torch.tensor([encoded[i] for i in indices], device=device)
        done = torch.zeros(len(indices), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, eos), token)
            new.append(token)
            done |= token == eos
            ids = torch.cat([ids, token[:, None]], dim=1)
            if done.all():
                break
        for row, i in enumerate(indices):
            tokens = [int(t[row]) for t in new]
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def score_greedy(model: Any, tokenizer: Any, queries: list[str], max_digits: int) -> tuple[float, list[str]]:
    answers = generate(model, tokenizer, [prompt_of(d) for d in queries], max_new_tokens=max_digits + 2)
    rewards = [reward(d, a) for d, a in zip(queries, answers, strict=True)]
    return sum(rewards) / len(rewards), answers


# -------------------------------------------------------------------------------------------------
# the queries and the training run both demos start from


def distinct_queries(rng: random.Random, n: int, config: DemoConfig) -> list[str]:
    seen: dict[str, None] = {}
    for _ in range(50 * n):
        if len(seen) == n:
            break
        seen.setdefault(make_digits(rng, config.min_digits, config.max_digits))
    if len(seen) < n:
        raise UserError(f"only {len(seen)} distinct digit strings for {n} queries; raise --max-digits")
    return list(seen)


def train_config(
    config: DemoConfig, model_dir: Path, out: Path, name: str, rank_weight: float
) -> TrainConfig:
    run_dir = out / name
    if run_dir.exists():  # the demo always starts over
        import shutil

        shutil.rmtree(run_dir)
    return TrainConfig(
        model=str(model_dir),
        data=str(out / "train.jsonl"),
        output_dir=str(run_dir),
        eval_data=str(out / "eval.jsonl"),
        eval_every=max(1, config.steps // 5),
        max_steps=config.steps,
        queries_per_step=config.queries_per_step,
        micro_batch_tokens=4096,
        lr=config.lr,
        min_lr=config.lr / 10,
        warmup_steps=max(1, config.steps // 20),
        weight_decay=0.0,
        optim=config.optim,
        rank_weight=rank_weight,
        device="cpu",
        seed=config.seed,
        save_every=0,
        keep_checkpoints=1,
        log_every=0,
    )


class Task(NamedTuple):
    model_dir: Path  # the random-initialised tiny model
    tokenizer: Any
    examples: list[Example]  # every query's scored candidates: the training ones, then the held-out
    eval_queries: list[str]
    before: float  # the held-out reward of the initial model's greedy answers
    before_answers: list[str]


def prepare_task(config: DemoConfig, out: Path) -> Task:
    """The task, the initial model, its own samples, the scored candidates (train.jsonl, eval.jsonl)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_fast.models.loading import quiet_progress_bars

    check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    model_dir = save_tiny_model(out / "init-model", seed=config.seed, hidden_size=config.hidden_size,
                                layers=config.layers)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    queries = distinct_queries(rng, config.train_queries + config.eval_queries, config)
    eval_q = queries[config.train_queries :]
    gen = torch.Generator().manual_seed(config.seed)
    samples = generate(model, tokenizer, [prompt_of(d) for d in queries], config.max_digits + 2,
                       temperature=1.0, generator=gen)  # fmt: skip
    examples = build_examples(rng, queries, samples, config.gold_fraction)
    write_examples(out / "train.jsonl", examples[: config.train_queries])
    write_examples(out / "eval.jsonl", examples[config.train_queries :])
    before, before_answers = score_greedy(model, tokenizer, eval_q, config.max_digits)
    return Task(model_dir, tokenizer, examples, eval_q, before, before_answers)


def check_config(config: DemoConfig) -> None:
    for name in ("steps", "train_queries", "eval_queries", "queries_per_step", "min_digits", "hidden_size",
                 "layers"):  # fmt: skip
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not config.min_digits <= config.max_digits <= 10:
        raise UserError("--max-digits must be between --min-digits and 10 (the digits are distinct)")
    if config.rounds < 1 or config.samples < 1 or not config.temperature > 0:
        raise UserError("--rounds and --samples must be at least 1 and --temperature above 0")
    if config.reward_model and (not config.online or config.rm_steps < 1):
        raise UserError("--reward-model belongs to --online and needs --rm-steps of at least 1")
    if config.losses:
        from rrhf_fast.config import LOSSES

        names = [n.strip() for n in config.losses.split(",")]
        bad = [n for n in names if n not in LOSSES or n == "rm"]
        if bad or config.online:
            choices = ", ".join(x for x in LOSSES if x != "rm")
            raise UserError(
                f"--losses takes policy losses ({choices}) and not --online; got {config.losses!r}"
            )
    if not 0 <= config.gold_fraction <= 1:
        raise UserError("--gold-fraction must be between 0 and 1")
