"""The reference log-probs in the data (`ref_logps`, `ref_logps_from`): what every loss with a reference
model (dpo, dpo-pl, lipo) checks before training; `rrhf-fast ref-logps` (dpo.py) writes them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rrhf_fast.data.packing import TokenizedExample
from rrhf_fast.errors import UserError

logger = logging.getLogger(__name__)


def provenance(item: TokenizedExample, tokenizing: dict[str, Any]) -> dict[str, Any]:
    """What decides a record's reference log-probs besides the reference model: the tokenising
    flags, and the token count of the prompt and of each response (another tokenizer shows there)."""
    return {**tokenizing, "prompt_tokens": len(item.prompt_ids),
            "response_tokens": [len(r) for r in item.response_ids]}  # fmt: skip


def require_ref_logps(
    items: Sequence[TokenizedExample],
    path: str,
    where: Sequence[str] | None = None,
    tokenizing: dict[str, Any] | None = None,
    loss: str = "dpo",
) -> None:
    """--loss dpo (and every loss with a reference): every training example must carry its reference
    log-probs, computed from the tokens this run trains (when `tokenizing`, the run's flags, is given)."""
    missing = [i for i, it in enumerate(items) if not it.ref_logps]
    if missing:
        raise UserError(
            f'{path}: --loss {loss} needs a "ref_logps" list (the reference model\'s log-prob sum of each '
            f"response) in every record, but {len(missing)} of {len(items)} have none (the first is record "
            f"{missing[0] + 1}); add them with `rrhf-fast ref-logps --model REF --in {path} --out FILE`"
        )
    if tokenizing is None:
        return
    where = list(where) if where is not None else [f"{path} record {i + 1}" for i in range(len(items))]
    bare = [loc for it, loc in zip(items, where, strict=True) if it.ref_logps_from is None]
    if bare:
        logger.warning(
            "%d of %d records carry ref_logps without ref_logps_from (the first: %s): they cannot be "
            "checked against this run's tokens and are used as they are; re-run `rrhf-fast ref-logps` "
            "to have them checked",
            len(bare), len(items), bare[0],
        )  # fmt: skip
    for it, loc in zip(items, where, strict=True):
        if it.ref_logps_from is not None:
            _same_tokens(it.ref_logps_from, provenance(it, tokenizing), loc)


def _same_tokens(stored: Any, now: dict[str, Any], where: str) -> None:
    if not isinstance(stored, dict):
        raise UserError(
            f"{where}: field 'ref_logps_from' must be an object, as `rrhf-fast ref-logps` writes it"
        )
    differ = [k for k in now if stored.get(k) != now[k]]
    if differ:
        was = ", ".join(f"{k} {stored.get(k)!r}" for k in differ)
        is_ = ", ".join(f"{k} {now[k]!r}" for k in differ)
        raise UserError(
            f"{where}: its ref_logps were computed from other tokens ({was}) than this run trains ({is_}); "
            "recompute them with `rrhf-fast ref-logps` and the same --max-prompt-len / --max-response-len / "
            "--chat-template and tokenizer as this run"
        )
