"""Anthropic HH-RLHF records as chat conversations, and the verifiable reward of the real run.

An HH record is two texts, `chosen` and `rejected`, each a whole dialogue of "\\n\\nHuman: ..." and
"\\n\\nAssistant: ..." turns that differ only in the last assistant turn. `rrhf-fast` reads such a
record as it is (TRL's implicit-prompt format: plain text); a chat model is trained on it as the
conversation it is: `to_conversation` turns it into a conversational record, `{"prompt": [user and
assistant messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`, which every command
tokenises through the model's chat template (SmolLM2: ChatML).

`brevity_reward` is the verifiable reward of `benchmarks/real_run.py`'s online run: a `--scorer
python:rrhf_fast.pipelines.hh:brevity_reward` that needs no model.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROLES = {"Human": "user", "Assistant": "assistant"}
_TURN = re.compile(r"\n\n(Human|Assistant):")
# the last assistant turn of a dialogue: where chosen and rejected part
_LAST_ASSISTANT = "\n\nAssistant:"


def read_hh(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of an HH-RLHF file (`.jsonl` or `.jsonl.gz`), in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def turns(text: str) -> list[dict[str, str]] | None:
    """The dialogue as messages; None when it does not alternate user, assistant, user, ... from a
    user turn, or a turn is empty (a few HH records do either)."""
    marks = list(_TURN.finditer(text))
    if not marks or marks[0].start() != 0:
        return None
    messages = []
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        content = text[mark.end() : nxt.start() if nxt else len(text)].strip()
        role = ROLES[mark.group(1)]
        if not content or role != ("user" if len(messages) % 2 == 0 else "assistant"):
            return None
        messages.append({"role": role, "content": content})
    return messages


def to_conversation(record: dict[str, Any]) -> dict[str, Any] | None:
    """`{"prompt", "chosen", "rejected"}` as messages; None when the record is not a clean dialogue
    ending in an assistant turn, or chosen and rejected end the same."""
    chosen, rejected = turns(record["chosen"]), turns(record["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or len(chosen) != len(rejected):
        return None
    if chosen[:-1] != rejected[:-1] or chosen[-1] == rejected[-1]:
        return None
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def conversations(path: str | Path) -> list[dict[str, Any]]:
    """Every clean record of the file as a conversation, in file order, each with its line number
    (`hh_line`, kept as metadata) so that a subset names the records it holds."""
    out = []
    for line, record in enumerate(read_hh(path), start=1):
        conv = to_conversation(record)
        if conv is not None:
            out.append({**conv, "hh_line": line})
    return out


# -------------------------------------------------------------------------------------------------
# the verifiable reward

BREVITY_WORDS = 25


def brevity_reward(query: Any, response: str) -> float:
    """1.0 for a complete answer of at most BREVITY_WORDS words (it ends with . ! or ?, so it was not
    cut off by --max-new-tokens), less for a longer one (0 at three times the limit), 0.5 less when it
    does not end a sentence; never below 0. The instruct model answers at length: it often misses."""
    words = len(response.split())
    if not words:
        return 0.0
    length = 1.0 if words <= BREVITY_WORDS else max(0.0, 1.0 - (words - BREVITY_WORDS) / (2 * BREVITY_WORDS))
    complete = response.rstrip().endswith((".", "!", "?"))
    return max(0.0, length - (0.0 if complete else 0.5))
