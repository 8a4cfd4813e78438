"""Score candidate responses (`rrhf-fast score --in FILE --scorer SPEC --out FILE`).

Every scorer has one method, `score(queries, responses) -> scores` (a list of floats per query),
and `build_scorer(SPEC)` makes one from:

- `reward-model:PATH`: an `AutoModelForSequenceClassification` with one label; the score is its
  output for query + response, read by the model's own pooling (its last non-pad token).
- `python:MODULE:FUNCTION`: `FUNCTION(query, response) -> float`; MODULE is a dotted module name
  (the current directory is searched) or the path of a .py file.
- `judge:PATH`: RLAIF (Lee et al. 2023): a causal LM reads an instruction template holding the
  query and two responses; the preference is the softmax over the next-token log-probabilities of
  the two answer strings ("1" / "2"). Every pair is asked in both orders and the two answers
  averaged, which removes the labeler's position bias; a response's score is its mean debiased win
  probability against the others (0.5 when it is alone).
- `direct:PATH`: d-RLAIF (same paper): a causal LM rates one response on a scale; the score is the
  probability-weighted mean rating, the probabilities being the softmax over the rating tokens.

Templates are plain-text files with `{query}`, `{response_1}`, `{response_2}` (judge) or
`{query}`, `{response}` (direct); defaults ship in rrhf_fast/templates/. The text up to the file's
final newline is the prompt and the answer token is read right after it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch

from .beam_search import last_logits, left_pad, positions
from .data import Example, load_examples_with_stats, write_examples
from .errors import UserError
from .packing import tokenize_prompt
from .sample import (
    DTYPES,
    _opt,
    add_config_flags,
    config_from_args,
    ensure_pad_token,
    example_locations,
    load_pretrained,
    save_run_config,
)

logger = logging.getLogger(__name__)

KINDS = ("reward-model", "python", "judge", "direct")
PLACEHOLDERS = {"judge": ("query", "response_1", "response_2"), "direct": ("query", "response")}


class Scorer(Protocol):
    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per response of each query; higher is better."""
        ...


@dataclass
class ScoreConfig:
    """Options of the model-based scorers; each field is a `rrhf-fast score` flag."""

    template: str | None = _opt(
        None, "judge / direct: instruction template file (default: the shipped one)", metavar="FILE"
    )
    answers: str = _opt("1,2", "judge: the answer strings that name response 1 and response 2")
    ratings: str = _opt("1-9", "direct: the rating strings, as a range (1-9) or a list (1,2,3,4,5)")
    chat_template: bool = _opt(False, "put the text in the model's chat template (user turn)")
    batch_size: int = _opt(8, "sequences per forward pass")
    max_length: int | None = _opt(None, "reward-model: keep the last N tokens of query + response")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = _opt("auto", "model dtype (auto: bfloat16 on CUDA, else float32)", choices=DTYPES)


class ScoreError(UserError):
    """A scorer produced something that is not a finite number for one response."""

    def __init__(self, query_index: int, response_index: int, problem: str):
        super().__init__(f"query {query_index}, response {response_index}: {problem}")
        self.query_index, self.response_index, self.problem = query_index, response_index, problem


# ----------------------------------------------------------------------------------------------
# Reward model


class RewardModelScorer:
    """A sequence-classification reward model on query + response, batched, right padded (which
    leaves each sequence's positions and attention exactly as when it runs alone)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        chat_template: bool = False,
    ):
        if model.config.num_labels != 1:
            raise UserError(f"the reward model has {model.config.num_labels} labels; a reward model has one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.chat_template = batch_size, max_length, chat_template
        _check_chat_template(tokenizer, chat_template)
        pad = ensure_pad_token(tokenizer)
        if model.config.pad_token_id is None:  # the pooling finds the last token by the pad id
            model.config.pad_token_id = pad
        self.pad_id = model.config.pad_token_id

    def encode(self, query: str, response: str) -> list[int]:
        tok = self.tokenizer
        if self.chat_template:
            turns = [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
            ids = tok(tok.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(query + response, split_special_tokens=True)["input_ids"]
        return list(ids)[-self.max_length :] if self.max_length else list(ids)

    @torch.no_grad()
    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
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
        return _unflatten(flat, responses)


def _check_chat_template(tokenizer: Any, wanted: bool) -> None:
    if wanted and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template was given but the scoring model's tokenizer has no chat template")


def _unflatten(flat: Sequence[float], responses: Sequence[Sequence[str]]) -> list[list[float]]:
    out, pos = [], 0
    for rs in responses:
        out.append(list(flat[pos : pos + len(rs)]))
        pos += len(rs)
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
    return fn


# ----------------------------------------------------------------------------------------------
# LLM labelers (RLAIF judge, d-RLAIF direct rating)


class _Labeler:
    """A causal LM read at the next position after a filled-in template."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str,
        options: Sequence[str],
        *,
        kind: str,
        batch_size: int = 8,
        chat_template: bool = False,
    ):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.options, self.batch_size, self.chat_template = list(options), batch_size, chat_template
        check_template(template, kind)
        _check_chat_template(tokenizer, chat_template)
        ensure_pad_token(tokenizer)
        self.option_ids: list[int] | None = None

    def prompt_ids(self, **values: str) -> list[int]:
        text = fill_template(self.template, values)
        if self.option_ids is None:
            self.option_ids = option_token_ids(self.tokenizer, text, self.options, self.chat_template)
        return tokenize_prompt(text, self.tokenizer, self.chat_template)

    @torch.no_grad()
    def option_probs(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """[len(prompts), len(options)]: the softmax over the options' next-token log-probs."""
        device = next(self.model.parameters()).device
        out, mass = [], []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = left_pad(
                prompts[start : start + self.batch_size], self.tokenizer.pad_token_id, device
            )
            logp = last_logits(self.model, ids, mask, positions(mask)).float().log_softmax(-1)
            chosen = logp[:, self.option_ids].cpu()
            out.append(chosen.softmax(-1))
            mass.append(chosen.exp().sum(-1))
        mass = torch.cat(mass)
        logger.info("labeler: mean probability on the answer tokens %.3f", mass.mean().item())
        if mass.mean() < 0.1:
            logger.warning(
                "the labeler puts little probability on %s: check the template and --answers "
                "/ --ratings (or use --chat-template for a chat model)",
                self.options,
            )
        return torch.cat(out).double()


class JudgeScorer(_Labeler):
    """RLAIF preferences, position-debiased, turned into mean win probabilities."""

    def __init__(
        self, model: Any, tokenizer: Any, template: str, answers: Sequence[str] = ("1", "2"), **kw: Any
    ):
        if len(answers) != 2:
            raise UserError(f"--answers needs two strings (for response 1 and 2), got {list(answers)}")
        super().__init__(model, tokenizer, template, answers, kind="judge", **kw)

    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        pairs = [
            (q, i, j)
            for q, rs in enumerate(responses)
            for i in range(len(rs))
            for j in range(len(rs))
            if i != j
        ]
        prompts = [
            self.prompt_ids(query=queries[q], response_1=responses[q][i], response_2=responses[q][j])
            for q, i, j in pairs
        ]
        first = self.option_probs(prompts)[:, 0].tolist() if prompts else []
        p_first = dict(zip(pairs, first, strict=True))  # P(the response shown first is better)
        scores = []
        for q, rs in enumerate(responses):
            wins = [0.0] * len(rs)
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    p = (p_first[q, i, j] + 1.0 - p_first[q, j, i]) / 2  # P(i beats j), both orders
                    wins[i] += p
                    wins[j] += 1.0 - p
            scores.append([w / (len(rs) - 1) if len(rs) > 1 else 0.5 for w in wins])
        return scores


class DirectScorer(_Labeler):
    """d-RLAIF: the probability-weighted mean of the rating scale."""

    def __init__(
        self, model: Any, tokenizer: Any, template: str, ratings: Sequence[str] = ("1", "2", "3"), **kw: Any
    ):
        self.values = torch.tensor([float(r) for r in ratings], dtype=torch.float64)
        super().__init__(model, tokenizer, template, ratings, kind="direct", **kw)

    def score(self, queries: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        prompts = [
            self.prompt_ids(query=q, response=r) for q, rs in zip(queries, responses, strict=True) for r in rs
        ]
        flat = (self.option_probs(prompts) @ self.values).tolist() if prompts else []
        return _unflatten(flat, responses)


def option_token_ids(tokenizer: Any, prompt: str, options: Sequence[str], chat_template: bool) -> list[int]:
    """The token each option string starts with when written right after the prompt.

    Found by tokenising prompt + option, so a tokenizer that merges a leading space or marks word
    starts ("1" vs "▁1") gets the token the model would really produce.
    """
    text = prompt
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def encode(t: str) -> list[int]:
        return list(
            tokenizer(t, add_special_tokens=False, split_special_tokens=not chat_template)["input_ids"]
        )

    base, ids = encode(text), []
    for option in options:
        full = encode(text + option)
        if full[: len(base)] != base or len(full) == len(base):
            raise UserError(
                f"the answer {option!r} merges with the template's last characters when tokenised; "
                "end the template with a newline or another separator"
            )
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids]
        raise UserError(
            f"the answer strings {list(options)} do not start with distinct tokens ({tokens}), so their "
            "next-token probabilities cannot be told apart; use strings that are distinct single tokens "
            "(e.g. --ratings 1-9 rather than 1-10)"
        )
    return ids


# ----------------------------------------------------------------------------------------------
# Templates


def load_template(path: str | os.PathLike | None, kind: str) -> str:
    """The template text (a shipped default when `path` is None), without its final newline."""
    if path is None:
        text = (resources.files("rrhf_fast") / "templates" / f"{kind}.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--template {path}: cannot read it ({err})") from None
    return text.removesuffix("\n").removesuffix("\r")


def check_template(template: str, kind: str) -> None:
    missing = [p for p in PLACEHOLDERS[kind] if "{" + p + "}" not in template]
    if missing:
        need = ", ".join("{" + p + "}" for p in PLACEHOLDERS[kind])
        raise UserError(
            f"the {kind} template lacks {', '.join('{' + m + '}' for m in missing)}; it needs {need}"
        )


def fill_template(template: str, values: dict[str, str]) -> str:
    """Substitute `{name}` placeholders in one pass (text inside the values is never substituted)."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def parse_options(spec: str) -> list[str]:
    """ "1,2" -> ["1", "2"]; "1-5" -> ["1", ..., "5"]; ranges and items may be mixed."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            out.extend(str(v) for v in range(lo, hi + 1))
        elif part:
            out.append(part)
    if not out:
        raise UserError(f"no options in {spec!r}; give e.g. 1-9 or 1,2")
    return out


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
        model, tok = load_pretrained(target, AutoModelForSequenceClassification, config.device, config.dtype)
        return RewardModelScorer(
            model,
            tok,
            batch_size=config.batch_size,
            max_length=config.max_length,
            chat_template=config.chat_template,
        )
    template = load_template(config.template, kind)
    check_template(template, kind)  # before loading a large model
    options = parse_options(config.answers if kind == "judge" else config.ratings)
    if kind == "direct" and not all(_is_number(o) for o in options):
        raise UserError(f"--ratings must be numbers, got {options}")
    model, tok = load_pretrained(target, AutoModelForCausalLM, config.device, config.dtype)
    cls = JudgeScorer if kind == "judge" else DirectScorer
    return cls(
        model, tok, template, options, batch_size=config.batch_size, chat_template=config.chat_template
    )


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


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
    scored = [i for i, ex in enumerate(examples) if ex.scores]
    if scored and not overwrite:
        raise UserError(
            f"{where[scored[0]]}: already has scores ({len(scored)} example(s) do); pass "
            "--overwrite to replace them"
        )
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
    in_path: str | os.PathLike, out_path: str | os.PathLike, scorer: Scorer, *, overwrite: bool = False
) -> list[Example]:
    """`rrhf-fast score`: read examples (scores may be empty), score them, write them atomically."""
    stats = load_examples_with_stats(in_path, require_scores=False)
    if not stats.examples:
        raise UserError(f"{in_path}: holds no examples to score")
    score_examples(stats.examples, scorer, overwrite=overwrite, locations=example_locations(stats))
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
    p.add_argument("--overwrite", action="store_true", help="replace scores the input already has")
    add_config_flags(p, ScoreConfig)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args, ScoreConfig)
    examples = score_file(args.in_path, args.out, build_scorer(args.scorer, config), overwrite=args.overwrite)
    run = {"in": args.in_path, "out": args.out, "scorer": args.scorer, "overwrite": args.overwrite}
    save_run_config(args.out, "score", {**run, **asdict(config)})
    total = sum(len(ex.responses) for ex in examples)
    print(f"scored {total} responses of {len(examples)} queries into {args.out}")
    return 0
