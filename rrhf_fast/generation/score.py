"""Score candidate responses (`rrhf-fast score --in FILE --scorer SPEC --out FILE`).

Every scorer has one method, `score(queries, responses) -> scores` (a list of floats per query),
and `build_scorer(SPEC)` makes one from:

- `reward-model:PATH`: an `AutoModelForSequenceClassification` with one label. By default a query's
  k responses go through ONE packed forward (the prompt encoded once, each response attending to
  it: rrhf_fast.models.reward), tokenised as `rrhf-fast train-rm` tokenises them (the prompt, then
  each response + EOS); the score is the model's output pooled as transformers pools it (its last
  non-pad token), equal to the model run on each prompt + response alone. `--no-packed`: one
  right-padded sequence per response, the text query + response tokenised jointly, no EOS added.
- `python:MODULE:FUNCTION`: `FUNCTION(query, response) -> float`; MODULE is a dotted module name
  (the current directory is searched) or the path of a .py file.
- `judge:PATH`: RLAIF: a causal LM compares two responses, asked in both orders to remove its
  position bias; a response's score is its mean win probability (labelers.JudgeScorer).
- `direct:PATH`: d-RLAIF: a causal LM rates one response; the score is the probability-weighted
  mean rating (labelers.DirectScorer).

Scores go into the training JSONL; existing scores are replaced only with `overwrite`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rrhf_fast import config as config_module
from rrhf_fast.checkpointing.provenance import save_run_config
from rrhf_fast.config import config_from_args, opt
from rrhf_fast.data.outputs import check_output_file
from rrhf_fast.data.packing import pack_tokenized, plan_microbatches, tokenize_example
from rrhf_fast.data.records import Example, load_examples_with_stats, write_examples
from rrhf_fast.data.schemas import as_messages
from rrhf_fast.errors import UserError
from rrhf_fast.generation.labelers import (
    DirectScorer,
    JudgeScorer,
    check_template,
    load_template,
    parse_options,
    require_chat_template,
    unflatten,
)
from rrhf_fast.models.loading import INFERENCE_DTYPES, load_pretrained
from rrhf_fast.models.reward import packed_rewards
from rrhf_fast.models.tokenizer import ensure_pad_token

logger = logging.getLogger(__name__)

KINDS = ("reward-model", "python", "judge", "direct")


class Scorer(Protocol):
    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per response of each query; higher is better."""
        ...


@dataclass
class ScoreConfig:
    """Options of the model-based scorers; each field is a `rrhf-fast score` flag."""

    template: str | None = opt(
        None, "judge / direct: instruction template file (default: the shipped one)", metavar="FILE"
    )
    answers: str = opt("1,2", "judge: the answer strings that name response 1 and response 2")
    ratings: str = opt("1-9", "direct: the rating strings, as a range (1-9) or a list (1,2,3,4,5)")
    chat_template: bool = opt(False, "put the text in the model's chat template (user turn)")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int | None = opt(None, "reward-model --no-packed: keep the last N tokens of query + response")
    packed: bool = opt(True, "reward-model: a query's responses in one packed forward (shared prompt)")
    micro_batch_tokens: int = opt(4096, "reward-model, packed: token budget of one packed forward")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "model dtype (auto: bfloat16 on CUDA, else float32)", choices=INFERENCE_DTYPES)


class ScoreError(UserError):
    """A scorer produced something that is not a finite number for one response."""

    def __init__(self, query_index: int, response_index: int, problem: str):
        super().__init__(f"query {query_index}, response {response_index}: {problem}")
        self.query_index, self.response_index, self.problem = query_index, response_index, problem


# ----------------------------------------------------------------------------------------------
# Reward model


class RewardModelScorer:
    """A sequence-classification reward model: packed (a query's responses share one encoding of
    its prompt), or one right-padded sequence per response (which leaves each sequence's positions
    and attention exactly as when it runs alone)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        chat_template: bool = False,
        packed: bool = True,
        micro_batch_tokens: int = 4096,
    ):
        if packed and max_length is not None:
            raise UserError("--max-length applies to --no-packed scoring; drop it, or add --no-packed")
        if model.config.num_labels != 1:
            raise UserError(f"the reward model has {model.config.num_labels} labels; a reward model has one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.chat_template = batch_size, max_length, chat_template
        require_chat_template(tokenizer, chat_template)
        pad = ensure_pad_token(tokenizer)
        if model.config.pad_token_id is None:  # the pooling finds the last token by the pad id
            model.config.pad_token_id = pad
        self.pad_id = model.config.pad_token_id
        self.packed, self.micro_batch_tokens = packed, micro_batch_tokens

    def encode(self, query: Any, response: Any) -> list[int]:
        """The reward model's tokens of query + response; a conversation (a list of messages, or a
        response that is one) always goes through the chat template."""
        tok = self.tokenizer
        if self.chat_template or isinstance(query, list) or isinstance(response, list):
            require_chat_template(tok, True)
            turns, (reply,) = as_messages(query, [response])
            turns = turns + reply
            ids = tok(tok.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(query + response, split_special_tokens=True)["input_ids"]
        return list(ids)[-self.max_length :] if self.max_length else list(ids)

    @torch.no_grad()
    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        if self.packed:
            return self._score_packed(queries, responses)
        seqs = [self.encode(q, r) for q, rs in zip(queries, responses, strict=True) for r in rs]
        flat = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])], mask[row, : len(seqs[i])] = torch.tensor(seqs[i]), 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, value in zip(idx, logits[:, 0].float().tolist(), strict=True):
                flat[i] = value
        return unflatten(flat, responses)

    def _score_packed(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        items = [
            tokenize_example(Example(q, list(rs), []), self.tokenizer, chat_template=self.chat_template,
                             where=f"query {i}")
            for i, (q, rs) in enumerate(zip(queries, responses, strict=True))
        ]  # fmt: skip
        out: list[list[float]] = [[] for _ in items]
        for group in plan_microbatches([it.packed_len for it in items], self.micro_batch_tokens):
            rewards = packed_rewards(self.model, pack_tokenized([items[i] for i in group])).tolist()
            for i in group:
                k = len(items[i].response_ids)
                out[i], rewards = rewards[:k], rewards[k:]
        return out


# ----------------------------------------------------------------------------------------------
# Python function


class FunctionScorer:
    """`fn(query, response) -> float` for every response."""

    def __init__(self, fn: Callable[[str, str], Any], name: str = "the scoring function"):
        self.fn, self.name = fn, name

    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for qi, (query, rs) in enumerate(zip(queries, responses, strict=True)):
            out.append([_as_score(self.fn(query, r), qi, ri, self.name) for ri, r in enumerate(rs)])
        return out


def _as_score(value: Any, qi: int, ri: int, name: str) -> float:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a 0-d numpy or torch scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ScoreError(qi, ri, f"{name} returned {type(value).__name__} {value!r}; it must return a number")
    if not math.isfinite(value):
        raise ScoreError(qi, ri, f"{name} returned {value}; scores must be finite numbers")
    return float(value)


def load_function(target: str) -> Callable[[str, str], Any]:
    """`MODULE:FUNCTION` with MODULE a dotted name or a .py path -> the function."""
    module_name, _, func_name = target.rpartition(":")
    if not module_name or not func_name:
        raise UserError(f"python scorer {target!r}: give MODULE:FUNCTION, e.g. python:my_rewards:length")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UserError(f"python scorer: no such file {module_name!r}")
        spec = importlib.util.spec_from_file_location(f"rrhf_fast_user_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:  # console scripts do not search the current directory
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise UserError(f"python scorer: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"python scorer: module {module_name!r} has no function {func_name!r}")
    try:
        inspect.signature(fn).bind("query", "response")
    except TypeError:
        raise UserError(
            f"python scorer {target!r}: {func_name}{inspect.signature(fn)} cannot be called as "
            f"{func_name}(query, response); define it with those two arguments"
        ) from None
    except ValueError:  # a builtin without a signature: its call will tell
        pass
    return fn


# ----------------------------------------------------------------------------------------------
# Building scorers, scoring files


def build_scorer(spec: str, config: ScoreConfig | None = None) -> Scorer:
    """A scorer from `reward-model:PATH`, `python:MODULE:FUNCTION`, `judge:PATH` or `direct:PATH`."""
    config = config or ScoreConfig()
    kind, _, target = spec.partition(":")
    if kind not in KINDS or not target:
        raise UserError(
            f"--scorer {spec!r}: give one of reward-model:PATH, python:MODULE:FUNCTION, judge:PATH, "
            "direct:PATH"
        )
    if kind == "python":
        return FunctionScorer(load_function(target), name=target)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "reward-model":
        model, tok = load_pretrained(target, AutoModelForSequenceClassification, config.device, config.dtype,
                                     flag="--scorer reward-model:")  # fmt: skip
        return RewardModelScorer(
            model,
            tok,
            batch_size=config.batch_size,
            max_length=config.max_length,
            chat_template=config.chat_template,
            packed=config.packed,
            micro_batch_tokens=config.micro_batch_tokens,
        )
    template = load_template(config.template, kind)
    check_template(template, kind)  # before loading a large model
    options = parse_options(config.answers if kind == "judge" else config.ratings)
    if kind == "direct" and not all(_is_number(o) for o in options):
        raise UserError(f"--ratings must be numbers, got {options}")
    flag = f"--scorer {kind}:"
    model, tok = load_pretrained(target, AutoModelForCausalLM, config.device, config.dtype, flag=flag)
    cls = JudgeScorer if kind == "judge" else DirectScorer
    return cls(
        model, tok, template, options, batch_size=config.batch_size, chat_template=config.chat_template
    )


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def refuse_scored(examples: Sequence[Example], where: Sequence[str], overwrite: bool) -> None:
    """Scores already there are replaced only with --overwrite."""
    scored = [i for i, ex in enumerate(examples) if ex.scores]
    if scored and not overwrite:
        raise UserError(
            f"{where[scored[0]]}: already has scores ({len(scored)} example(s) do); pass "
            "--overwrite to replace them"
        )


def score_examples(
    examples: list[Example],
    scorer: Scorer,
    *,
    overwrite: bool = False,
    locations: Sequence[str] | None = None,
) -> list[Example]:
    """Fill every example's scores in place (and return the examples).

    Examples that already have scores are an error unless `overwrite`; a scorer output that is not
    one finite number per response is an error naming the example.
    """
    where = list(locations) if locations is not None else [f"example {i}" for i in range(len(examples))]
    refuse_scored(examples, where, overwrite)
    try:
        scores = scorer.score([ex.query for ex in examples], [ex.responses for ex in examples])
    except ScoreError as err:
        raise UserError(f"{where[err.query_index]}: response {err.response_index}: {err.problem}") from None
    if len(scores) != len(examples):
        raise UserError(f"the scorer returned {len(scores)} score lists for {len(examples)} queries")
    for i, (ex, row) in enumerate(zip(examples, scores, strict=True)):
        if len(row) != len(ex.responses) or not all(math.isfinite(s) for s in row):
            raise UserError(
                f"{where[i]}: the scorer gave {row} for {len(ex.responses)} responses; it must give "
                "one finite number per response"
            )
        ex.scores = [float(s) for s in row]
    return examples


def score_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    scorer: Scorer | Callable[[], Scorer],
    *,
    overwrite: bool = False,
) -> list[Example]:
    """`rrhf-fast score`: read examples (scores may be empty), score them, write them atomically.

    `scorer` may be a function that builds it: it is then called once the data and `out_path` are
    checked, so that a bad record or output path is reported before a model loads."""
    stats = load_examples_with_stats(in_path, require_scores=False)
    if not stats.examples:
        raise UserError(f"{in_path}: holds no examples to score")
    refuse_scored(stats.examples, stats.locations(), overwrite)
    check_output_file(out_path)
    if not hasattr(scorer, "score"):
        scorer = scorer()
    score_examples(stats.examples, scorer, overwrite=overwrite, locations=stats.locations())
    write_examples(out_path, stats.examples)
    return stats.examples


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="in_path", required=True, metavar="FILE", help="JSONL of {query, responses}")
    p.add_argument(
        "--scorer",
        required=True,
        metavar="SPEC",
        help="reward-model:PATH | python:MODULE:FUNCTION | judge:PATH | direct:PATH",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL with the scores filled in")
    p.add_argument(
        "--overwrite", action=argparse.BooleanOptionalAction, default=False,
        help="replace scores the input already has",
    )  # fmt: skip
    config_module.add_arguments(p, ScoreConfig)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args, ScoreConfig)
    examples = score_file(args.in_path, args.out, lambda: build_scorer(args.scorer, config),
                          overwrite=args.overwrite)  # fmt: skip
    run = {"in": args.in_path, "out": args.out, "scorer": args.scorer, "overwrite": args.overwrite}
    save_run_config(args.out, "score", {**run, **asdict(config)})
    total = sum(len(ex.responses) for ex in examples)
    print(f"scored {total} responses of {len(examples)} queries into {args.out}")
    return 0
