"""LLM labelers as scorers: RLAIF pairwise preferences and d-RLAIF direct ratings (Lee et al. 2023).

Both read a causal LM's next-token distribution right after an instruction template filled with
the query and the response(s), restricted to a few option strings and renormalised over them:

- `JudgeScorer`: the template shows two responses; the preference is the softmax over the log-probs
  of the two answer strings ("1" / "2"). Every pair is asked in both orders and the two answers
  averaged, which removes the labeler's position bias; a response's score is its mean debiased win
  probability against the others (0.5 when it is alone).
- `DirectScorer`: the template shows one response; the score is the probability-weighted mean of
  the rating scale.

Templates are plain-text files with `{query}`, `{response_1}`, `{response_2}` (judge) or `{query}`,
`{response}` (direct); defaults ship in rrhf_fast/templates/. The text up to the file's final
newline is the prompt, and the answer is read at the next token.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rrhf_fast.data.packing import tokenize_prompt
from rrhf_fast.errors import UserError
from rrhf_fast.generation.beam_search import last_logits, positions
from rrhf_fast.models.tokenizer import ensure_pad_token, left_pad

logger = logging.getLogger(__name__)

PLACEHOLDERS = {"judge": ("query", "response_1", "response_2"), "direct": ("query", "response")}


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
        require_chat_template(tokenizer, chat_template)
        ensure_pad_token(tokenizer)
        self.option_ids: list[int] | None = None

    def prompt_ids(self, **values: Any) -> list[int]:
        text = fill_template(self.template, {k: transcript(v) for k, v in values.items()})
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
        return unflatten(flat, responses)


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


def transcript(value: Any) -> str:
    """A query or response as the text a template quotes: a conversation (a list of messages) as
    its turns, "Role: content", separated by blank lines (HH-RLHF's shape); text as it is."""
    if isinstance(value, list):
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in value)
    return value


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
# Shared with the reward-model scorer


def require_chat_template(tokenizer: Any, wanted: bool) -> None:
    if wanted and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template was given but the scoring model's tokenizer has no chat template")


def unflatten(flat: Sequence[float], responses: Sequence[Sequence[str]]) -> list[list[float]]:
    out, pos = [], 0
    for rs in responses:
        out.append(list(flat[pos : pos + len(rs)]))
        pos += len(rs)
    return out
