"""What a record means, detected from its columns: one query, k responses, k scores.

| columns                                 | becomes                                                      |
|-----------------------------------------|--------------------------------------------------------------|
| query, responses, scores                | rrhf-fast's own (names set by --query/responses/scores-field) |
| prompt, completions, scores             | a ranked list                                                |
| prompt, chosen, rejected                | TRL's standard preference: responses [chosen, rejected],     |
|                                         | scores [1, 0] or (score_chosen, score_rejected)              |
| chosen, rejected                        | TRL's implicit prompt: the prompt is their shared start      |

Any text may instead be a conversation: a prompt is a list of `{"role", "content"}` messages, a
response one assistant message or a list of messages. Such a record is *conversational* (every
string in it then stands for one turn: a string query a user turn, a string response an assistant
turn) and is tokenised through the tokenizer's chat template (tokenize.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rrhf_fast.errors import DataError

Message = dict[str, str]
# The roles a chat template may know; anything else is almost always a typo ("asistant").
ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
# HH-RLHF's turns: "\n\nHuman: ...\n\nAssistant: ..." (and the same shape with other role names).
_TURN = re.compile(r"\n\n[A-Z][A-Za-z ]{0,30}:")


@dataclass(frozen=True)
class Fields:
    query: str = "query"
    responses: str = "responses"
    scores: str = "scores"
    require_scores: bool = True


@dataclass
class Parsed:
    query: str | list[Message]
    responses: list[str] | list[list[Message]]
    scores: list[float]
    meta: dict[str, Any]
    format: str  # "rrhf", "ranked", "pair", "implicit"


def parse_record(record: Any, fields: Fields, fail: Callable[[str | None, str], DataError]) -> Parsed:
    """The record as (query, responses, scores, meta) in the shape its columns say."""
    if not isinstance(record, dict):
        raise fail(None, f"expected a JSON object, got {json_type(record)}")
    if fields.query in record and fields.responses in record:
        return _listed(record, fields.query, fields.responses, fields, "rrhf", fail)
    if "prompt" in record and "completions" in record:
        return _listed(record, "prompt", "completions", fields, "ranked", fail)
    if "chosen" in record and "rejected" in record:
        return _pair(record, fields, fail)
    # The shape the record is closest to, by the columns only it has ("prompt" is in two): a CSV row
    # with an empty "rejected" cell lacks "rejected", not "query".
    shapes = [
        ((fields.query, fields.responses), (fields.query, fields.responses)),
        (("completions",), ("prompt", "completions")),
        (("chosen", "rejected"), ("chosen", "rejected")),
    ]
    _, closest = max(shapes, key=lambda shape: sum(name in record for name in shape[0]))
    for name in closest:
        if name not in record:
            raise fail(
                name,
                f"missing; present fields are {sorted(record)}: give {{{fields.query}, {fields.responses}, "
                f"{fields.scores}}}, {{prompt, chosen, rejected}}, {{chosen, rejected}} or "
                "{prompt, completions, scores}, or name your columns with --query-field / "
                "--responses-field / --scores-field",
            )
    raise AssertionError("unreachable")


def parse_prompt(
    record: Any, fail: Callable[[str | None, str], DataError], query_field: str = "query"
) -> str | list[Message]:
    """The prompt of a record of sampling's prompt files: `{"query": ...}` or TRL's prompt-only
    `{"prompt": ...}` (text or a conversation), or any training record shape (its prompt; for an
    implicit-prompt pair, the shared start of chosen and rejected). Other fields must be text too."""
    if not isinstance(record, dict):
        raise fail(None, f"expected a JSON object, got {json_type(record)}")
    if "chosen" in record and "rejected" in record and query_field not in record and "prompt" not in record:
        query, _ = implicit_prompt(record["chosen"], record["rejected"], fail)
        name = None
    else:
        name = next((n for n in (query_field, "prompt") if n in record), None)
        if name is None:
            problem = (f"missing; present fields are {sorted(record)}: give {{{query_field}: ...}} or TRL's "
                       "{prompt: ...}, as text or a list of messages")  # fmt: skip
            raise fail(query_field, problem)
        query = _query(record[name], lambda p: fail(name, p))
        if isinstance(query, str) and not query:
            raise fail(name, "is an empty string; give the prompt's text")
    _meta({k: v for k, v in record.items() if k != name}, fail)
    return query


def _listed(record: dict, qname: str, rname: str, fields: Fields, fmt: str, fail) -> Parsed:
    query = _query(record[qname], lambda p: fail(qname, p))
    responses = _responses(record[rname], lambda p: fail(rname, p))
    scores = parse_scores(record.get(fields.scores), fields.require_scores, lambda p: fail(fields.scores, p))
    if scores and len(scores) != len(responses):
        raise fail(
            fields.scores, f"has {len(scores)} scores for {len(responses)} responses; give one per response"
        )
    meta = _meta({k: v for k, v in record.items() if k not in (qname, rname, fields.scores)}, fail)
    return Parsed(query, responses, scores, meta, fmt)


def _pair(record: dict, fields: Fields, fail) -> Parsed:
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        query, fmt = _query(record["prompt"], lambda p: fail("prompt", p)), "pair"
        responses = [
            _response(chosen, lambda p: fail("chosen", p)),
            _response(rejected, lambda p: fail("rejected", p)),
        ]
    else:
        query, responses = implicit_prompt(chosen, rejected, fail)
        fmt = "implicit"
    scores = [1.0, 0.0]
    if "score_chosen" in record or "score_rejected" in record:
        pair = [record.get("score_chosen"), record.get("score_rejected")]
        name = "score_chosen" if pair[0] is None or not _is_number(pair[0]) else "score_rejected"
        scores = parse_scores(
            pair, True, lambda p: fail(name, p.replace("item 0", "it").replace("item 1", "it"))
        )
    used = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    meta = _meta({k: v for k, v in record.items() if k not in used}, fail)
    return Parsed(query, responses, scores, meta, fmt)


def implicit_prompt(chosen: Any, rejected: Any, fail) -> tuple[Any, list[Any]]:
    """TRL's `extract_prompt` (trl/data_utils.py): the shared start of chosen and rejected is the
    prompt. Conversations: their common leading messages. Text: cut at the end of the last turn
    marker ("\\n\\nAssistant:") inside the shared start, so that two answers which both begin
    "I" keep their "I" (TRL cuts at the first differing character, moving a space back)."""
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = (
            _messages(chosen, lambda p: fail("chosen", p)),
            _messages(rejected, lambda p: fail("rejected", p)),
        )
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0 or n == len(c) or n == len(r):
            raise fail(
                "chosen",
                "shares no leading messages with 'rejected' (or is a prefix of it); give a 'prompt' column",
            )
        return c[:n], [c[n:], r[n:]]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text:
            raise fail(name, f"must be a non-empty string or a list of messages, got {json_type(text)}")
        _text(text, lambda p, name=name: fail(name, p))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    turns = list(_TURN.finditer(chosen[:n]))
    if turns:
        n = turns[-1].end()
    elif 0 < n and chosen[n - 1] == " ":
        n -= 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise fail(
            "chosen",
            "has no prompt in common with 'rejected' followed by text in both; give a 'prompt' column",
        )
    return chosen[:n], [chosen[n:], rejected[n:]]


# ----------------------------------------------------------------------------------------------
# Texts and messages


def _query(value: Any, fail) -> str | list[Message]:
    if isinstance(value, str):
        return _text(value, fail)
    if isinstance(value, list):
        return _messages(value, fail)
    raise fail(f"must be a string or a list of messages, got {json_type(value)}")


def _responses(value: Any, fail) -> list[Any]:
    value = _maybe_json(value, list)
    if not isinstance(value, list):
        raise fail(f"must be a list of strings or messages, got {json_type(value)}")
    if not value:
        raise fail("is empty; every query needs at least one response")
    out = []
    for i, resp in enumerate(value):
        out.append(_response(resp, lambda p, i=i: fail(f"item {i} {p}")))
    return out


def _response(value: Any, fail) -> str | list[Message]:
    if isinstance(value, str):
        if not value:
            raise fail("is an empty string; drop it (and its score) or give text")
        return _text(value, fail)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return _messages(value, fail)
    raise fail(f"must be a string, a message or a list of messages, got {json_type(value)}")


def _messages(value: Any, fail) -> list[Message]:
    value = _maybe_json(value, list)
    if not isinstance(value, list) or not value:
        raise fail(f"must be a non-empty list of messages, got {json_type(value)}")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise fail(f"message {i} must be an object with string 'role' and 'content', got {str(m)[:80]}")
        if m["role"] not in ROLES:
            raise fail(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append(
            {"role": m["role"], "content": _text(m["content"], lambda p, i=i: fail(f"message {i} {p}"))}
        )
    return out


def _text(value: str, fail) -> str:
    """JSON's "\\ud800" decodes to a lone surrogate, which is no text: tokenizers fail on it with
    a TypeError that names nothing."""
    try:
        value.encode("utf-8")  # C speed; fails only on surrogates
    except UnicodeEncodeError as err:
        code = ord(value[err.start])
        problem = f"holds a lone UTF-16 surrogate (\\u{code:04x} at character {err.start}), which is not text"
        raise fail(problem + "; remove it") from None
    return value


def _meta(meta: dict[str, Any], fail) -> dict[str, Any]:
    """The fields kept as they are: they are written back, so they must be text too (a lone
    surrogate in one would fail only when the output is written, after the work)."""

    def walk(value: Any, name: str) -> None:
        if isinstance(value, str):
            _text(value, lambda p: fail(name, p))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, name)
                walk(v, name)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, name)

    try:  # the common case at C speed: everything encodes
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
        return meta
    except (UnicodeEncodeError, TypeError, ValueError):  # TypeError: a value JSON cannot hold (datasets)
        pass
    for key, value in meta.items():
        _text(key, lambda p: fail(None, "a field name " + p))
        walk(value, key)
    return meta


def _maybe_json(value: Any, kind: type) -> Any:
    """A CSV cell holding a JSON list is that list (CSV has no list type)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, kind) else value
    return value


def is_conversational(query: Any, responses: list[Any]) -> bool:
    return isinstance(query, list) or any(isinstance(r, list) for r in responses)


def as_messages(query: Any, responses: list[Any]) -> tuple[list[Message], list[list[Message]]]:
    """A conversational record with every string turned into its turn."""
    q = [{"role": "user", "content": query}] if isinstance(query, str) else query
    rs = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    return q, rs


# ----------------------------------------------------------------------------------------------
# Scores


def parse_scores(value: Any, require: bool, fail) -> list[float]:
    value = _maybe_json(value, list)
    if value is None or (isinstance(value, list) and not value):
        if require:
            what = "missing" if value is None else "empty"
            raise fail(f"{what}; score the responses first with `rrhf-fast score`")
        return []
    if not isinstance(value, list):
        raise fail(f"must be a list of numbers, got {json_type(value)}")
    scores = []
    for i, s in enumerate(value):
        if not _is_number(s):
            raise fail(f"item {i} must be a number, got {json_type(s)} {s!r}")
        try:
            s = float(s)
        except OverflowError:
            s = math.inf
        if math.isinf(s):  # JSON's 1e400 reads as inf
            raise fail(f"item {i} is out of the float range (beyond ±1.8e308, or Infinity); "
                       "scores must be finite numbers")  # fmt: skip
        if not math.isfinite(s):
            raise fail(f"item {i} is {s}; scores must be finite numbers")
        scores.append(s)  # float64: ranking compares these exactly (packing.score_ranks)
    return scores


def _is_number(s: Any) -> bool:
    return not isinstance(s, bool) and isinstance(s, (int, float))


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__
