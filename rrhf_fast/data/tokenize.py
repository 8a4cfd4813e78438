"""Examples -> token ids, the way the model was trained and will be prompted.

Joint tokenisation, as TRL's DPOTrainer does (trl/trainer/dpo_trainer.py, `_prepare_dataset`'s
`tokenize_fn`): each response is tokenised together with its prompt and cut at the prompt boundary,
so that prompt tokens + response tokens are exactly what the tokenizer gives for the whole text:

- plain text: `tokenizer(query + response)` (BOS and the tokenizer's own specials), then EOS;
- conversations (or `--chat-template`): the prompt is `apply_chat_template(prompt, add_generation_prompt
  =True)`, a response the rest of `apply_chat_template(prompt + response)`, so the assistant turn
  ends with whatever the template writes (its end-of-turn token), as TRL's `apply_chat_template` does.

Tokenising the response alone and concatenating differs where the tokenizer merges across the
boundary: a byte-level BPE turns a prompt's trailing " " and the response's "yes" into one "Ġyes"
(alone: "Ġ" | "yes"), a SentencePiece/Metaspace tokenizer puts an extra "▁" before every response.
When the boundary falls inside a token, the prompt shared by the k responses is the longest common
prefix of their joint tokenisations: every prompt + response is still the joint tokenisation, and
the record is counted (`TokenizedExample.merged`; tokenize_examples says how many, once).

Truncation keeps the special tokens: `max_prompt_len` drops the prompt's content from the left but
keeps its leading special tokens (BOS, the template's first header) and the trailing generation
prompt; `max_response_len` cuts a response before its end (EOS / end-of-turn and what the template
writes after it), which stays.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rrhf_fast.data.records import Example
from rrhf_fast.data.schemas import as_messages, is_conversational
from rrhf_fast.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    """Token ids of one query: the prompt (with its special tokens) and each response (+ its end)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    scores: list[float]  # [] when unscored: PackedBatch.scores is then NaN
    ref_logps: list[float] = field(default_factory=list)  # [] when absent: PackedBatch.ref_logps is NaN
    merged: bool = False  # the prompt/response boundary fell inside a token (module docstring)
    ref_logps_from: dict[str, Any] | None = None  # how ref_logps were tokenised (objectives/dpo.py)

    @property
    def packed_len(self) -> int:
        """Tokens this query takes in a packed row: the prompt once plus every response."""
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


@dataclass
class _Text:
    """One tokenised text, and how many of its tokens are structure rather than content."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    head: int = 0  # leading tokens that end before the first content character
    content_end: int | None = None  # character offset where the (last) content ends


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    locations: Sequence[str] | None = None,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    chat_template: bool = False,
) -> list[TokenizedExample]:
    """`tokenize_example` for each example; warns once with the count of records whose prompt and
    response share a token."""
    where = list(locations) if locations is not None else [None] * len(examples)
    items = [
        tokenize_example(ex, tokenizer, max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                         chat_template=chat_template, where=loc)
        for ex, loc in zip(examples, where, strict=True)
    ]  # fmt: skip
    merged = [
        loc or f"record {i + 1}" for i, (it, loc) in enumerate(zip(items, where, strict=True)) if it.merged
    ]
    if merged:
        logger.warning(
            "%d of %d records have a token spanning the end of the prompt and the start of a response "
            "(the first: %s); their responses keep the joint tokens, the shared prompt stops before it",
            len(merged), len(items), merged[0],
        )  # fmt: skip
    return items


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    chat_template: bool = False,
    where: str | None = None,
) -> TokenizedExample:
    """The example's prompt and response token ids (module docstring). Text is text: a literal
    "</s>" inside a plain query or response is not read as a special token. `where` (the record's
    "FILE:LINE") starts the message of an error about this example."""
    for name, value in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of tokens, got {value}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token before packing")
    label = where or f"query {str(example.query)[:60]!r}"
    if chat_template or is_conversational(example.query, example.responses):
        prompt, fulls = _chat_texts(example, tokenizer, label)
    else:
        prompt, fulls = _plain_texts(example, tokenizer)
    n = _common_prefix(prompt.ids, [f.ids for f in fulls])
    if n == 0:
        raise UserError(
            f"{label}: the query tokenises to no tokens of its own and the tokenizer adds no BOS: the first "
            "response token would have nothing to condition on; give a non-empty query"
        )
    prompt_ids = _cut_prompt(prompt, n, max_prompt_len, label)
    responses = [_cut_response(full, n, max_response_len, label) for full in fulls]
    scores = [float(s) for s in example.scores]
    ref = _ref_logps(example, label)
    ref_from = example.meta.get("ref_logps_from") if ref else None
    return TokenizedExample(prompt_ids, responses, scores, ref, n < len(prompt.ids), ref_from)


def tokenize_prompt(query: Any, tokenizer: Any, chat_template: bool = False) -> list[int]:
    """The prompt's token ids, untruncated: what sampling feeds the model for this query."""
    if chat_template or isinstance(query, list):
        messages, _ = as_messages(query, [])
        return _encode(_render_prompt(messages, tokenizer, None), tokenizer, special=False).ids
    return list(tokenizer(query, split_special_tokens=True)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Plain text and chat templates


def _plain_texts(example: Example, tokenizer: Any) -> tuple[_Text, list[_Text]]:
    enc = tokenizer(example.query, split_special_tokens=True, return_special_tokens_mask=True)
    mask = enc.get("special_tokens_mask") or [0] * len(enc["input_ids"])
    head = next((i for i, m in enumerate(mask) if not m), len(mask))
    prompt = _Text(list(enc["input_ids"]), [], head=head)
    eos = tokenizer.eos_token_id
    fulls = []
    for resp in example.responses:
        ids = list(tokenizer(example.query + resp, split_special_tokens=True)["input_ids"]) + [eos]
        fulls.append(_Text(ids, [], content_end=None))  # its end: the EOS alone
    return prompt, fulls


def _chat_texts(example: Example, tokenizer: Any, label: str) -> tuple[_Text, list[_Text]]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{label}: the record is a conversation (or --chat-template was given) but the tokenizer has no "
            "chat template; use the model's chat tokenizer or set tokenizer.chat_template"
        )
    messages, responses = as_messages(example.query, example.responses)
    prompt_text = _render_prompt(messages, tokenizer, label)
    prompt = _encode(prompt_text, tokenizer, special=False)
    prompt.head = _tokens_before(
        prompt, prompt_text.find(messages[0]["content"]) if messages[0]["content"] else 0
    )
    last = messages[-1]["content"]
    prompt.content_end = prompt_text.rfind(last) + len(last) if last else None
    fulls = []
    for i, resp in enumerate(responses):
        text = tokenizer.apply_chat_template(messages + resp, tokenize=False)
        if not text.startswith(prompt_text):
            raise UserError(
                f"{label}: the chat template renders the prompt followed by response {i} as text that does "
                "not start with the prompt alone, so no token boundary separates them; the template is not "
                "one rrhf-fast (or TRL) can train with"
            )
        full = _encode(text, tokenizer, special=False)
        content = resp[-1]["content"]
        end = text.rfind(content) if content else -1
        full.content_end = end + len(content) if end >= len(prompt_text) else None
        fulls.append(full)
    return prompt, fulls


def _render_prompt(messages: list[dict], tokenizer: Any, label: str | None) -> str:
    """The prompt as the template writes it before the model's turn: with the generation prompt,
    or, when it ends with an assistant message, that message left open (TRL's rule)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{label or 'the query'}: a conversation needs a tokenizer with a chat template")
    open_turn = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not open_turn, continue_final_message=open_turn
    )


def _encode(text: str, tokenizer: Any, *, special: bool) -> _Text:
    # The template writes its own special tokens (BOS included) as text: add none.
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids, offsets = ids[1:], offsets[1:]  # a template that writes BOS twice: keep one
    return _Text(ids, offsets)


def _tokens_before(text: _Text, char: int) -> int:
    return sum(1 for _, end in text.offsets if end <= char) if char >= 0 else 0


def _tokens_from(text: _Text, start: int, char: int | None) -> int:
    """How many of text.ids[start:] begin at or after character `char` (the end part)."""
    if char is None:
        return 1 if not text.offsets else 0  # plain text: the EOS we appended
    return sum(1 for s, _ in text.offsets[start:] if s >= char)


def _common_prefix(prompt: list[int], fulls: list[list[int]]) -> int:
    n = len(prompt)
    for full in fulls:
        i = 0
        while i < min(n, len(full)) and prompt[i] == full[i]:
            i += 1
        n = i
    return n


# ----------------------------------------------------------------------------------------------
# Truncation that keeps the special tokens


def _cut_prompt(prompt: _Text, n: int, limit: int | None, label: str) -> list[int]:
    ids = prompt.ids[:n]
    if limit is None or n <= limit:
        return ids
    head = min(prompt.head, n)
    tail = _tokens_from(_Text(ids, prompt.offsets[:n]), 0, prompt.content_end) if prompt.offsets else 0
    tail = min(tail, n - head)
    keep = limit - head - tail
    if keep < 1:
        raise UserError(
            f"{label}: --max-prompt-len {limit} leaves no room for the prompt's text beside its "
            f"{head + tail} special / template tokens; give at least {head + tail + 1}"
        )
    return ids[:head] + ids[head : n - tail][-keep:] + ids[n - tail :]


def _cut_response(full: _Text, n: int, limit: int | None, label: str) -> list[int]:
    ids = full.ids[n:]
    if not ids:
        raise UserError(f"{label}: a response tokenises to no tokens after the prompt; give text")
    if limit is None or len(ids) <= limit:
        return ids
    tail = min(_tokens_from(full, n, full.content_end), len(ids))
    keep = limit - tail
    if keep < 1:
        raise UserError(
            f"{label}: --max-response-len {limit} leaves no room for a response's text beside its {tail} end "
            f"token(s) (EOS / end of turn); give at least {tail + 1}"
        )
    return ids[:keep] + ids[len(ids) - tail :]


def _ref_logps(example: Example, label: str) -> list[float]:
    """The record's `ref_logps` (one finite number per response), or [] when it has none."""
    value = example.meta.get("ref_logps")
    if value is None:
        return []
    ok = isinstance(value, list) and len(value) == len(example.responses)
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise UserError(
            f"{label}: field 'ref_logps' must be a list of one finite number per "
            f"response ({len(example.responses)}), got {str(value)[:80]}"
        )
    return [float(v) for v in value]
