"""What `rrhf-fast train --resume` checks against the checkpoint it continues, and what it says.

A checkpoint continues its run exactly (checkpoint.py); these are the ways a new command line can
ask for something else, and what each gets:
- other training data: refused. The data order is a pure function of the tokenised data (its
  size and packed lengths, steps.plan_steps), so the same position in other data would replay
  another order without a word. The trainer state keeps a fingerprint of the data to tell.
- another length (--max-steps, --epochs) or another --lr / --min-lr / --warmup-steps: the
  learning-rate schedule follows the new flags, and one line names the old and new lengths and the
  learning rate at the resume step under both. Without such a flag the checkpoint's schedule is
  kept: a changed --grad-accum, say, must not silently stretch or shrink it.
- any other changed flag is named in the "resumed from" line.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import TokenizedExample
from rrhf_fast.errors import UserError
from rrhf_fast.optimizers.optim import lr_at

# Flags that define the learning-rate schedule: changing one on resume asks for a new schedule.
SCHEDULE_FLAGS = ("max_steps", "epochs", "lr", "min_lr", "warmup_steps")
# Flags that only change bookkeeping (or the schedule, reported on its own line): any other change
# makes the resumed run differ from the original.
_BOOKKEEPING = {"output_dir", "resume", "max_steps", "epochs", "eval_data", "eval_every", "save_every",
                "keep_checkpoints", "log_every", "plot", "max_bad_steps", "device", "report_to", "run_name",
                "project", "fit_check"}  # fmt: skip


def data_fingerprint(items: Sequence[TokenizedExample]) -> dict[str, Any]:
    """The number of queries and tokens, and a hash of every query's token ids, lengths, scores and
    reference log-probs (--loss dpo: other ones would silently train towards another reference)."""
    digest = hashlib.sha256()
    for item in items:
        lengths = [len(item.prompt_ids), len(item.response_ids), *map(len, item.response_ids),
                   len(item.ref_logps)]  # fmt: skip
        digest.update(array("q", lengths).tobytes())
        digest.update(array("q", item.prompt_ids).tobytes())
        for response in item.response_ids:
            digest.update(array("q", response).tobytes())
        digest.update(array("d", item.scores).tobytes())
        digest.update(array("d", item.ref_logps).tobytes())
    return {"queries": len(items), "tokens": sum(it.packed_len for it in items), "sha256": digest.hexdigest()}


def check_same_data(state: dict[str, Any], fingerprint: dict[str, Any], data: str, checkpoint: Path) -> None:
    """A UserError unless the checkpoint was trained on data with this fingerprint (a checkpoint
    written before fingerprints were kept passes)."""
    saved = state.get("data")
    if saved is None or saved == fingerprint:
        return
    raise UserError(
        f"--data {data} is not the data {checkpoint} was trained on ({fingerprint['queries']} queries "
        f"and {fingerprint['tokens']} tokens now, {saved['queries']} and {saved['tokens']} then, or other "
        "token ids, scores or ref_logps), so the run would continue in another data order; resume with "
        "that run's --data, --model tokenizer, --max-prompt-len, --max-response-len and --chat-template, "
        "or train into a new --output-dir"
    )


# The parts of a schedule (lr_at's arguments), as the resume note names them.
_SCHEDULE_PARTS = (("total_steps", "steps"), ("warmup_steps", "warmup steps"), ("lr", "peak lr"),
                   ("min_lr", "min lr"))  # fmt: skip


def choose_schedule(
    new: dict[str, Any], state: dict[str, Any], saved: TrainConfig, config: TrainConfig
) -> tuple[dict[str, Any], str]:
    """The schedule a resumed run follows, and a line to print about it ("" when it is unchanged)."""
    old = state.get("schedule")
    if old is None or old == new:
        return new, ""
    step = state["step"]
    asked = [f"--{f.replace('_', '-')}" for f in SCHEDULE_FLAGS if getattr(saved, f) != getattr(config, f)]
    if asked:
        changes = [f"{what} {new[key]:g} instead of {old[key]:g}" for key, what in _SCHEDULE_PARTS
                   if new.get(key) != old.get(key)]  # fmt: skip
        return new, (
            f"note: {', '.join(asked)} changed, so the learning-rate schedule changes: "
            f"{', '.join(changes)}; lr at step {step}: {lr_at(step, **new):.4g} (the old schedule's: "
            f"{lr_at(step, **old):.4g})"
        )
    return old, (
        f"note: these flags would make a {new['total_steps']}-step schedule, the checkpoint's has "
        f"{old['total_steps']}; keeping the checkpoint's (give --max-steps or --epochs to change its length)"
    )


def changed_flags(saved: TrainConfig, config: TrainConfig, state: dict[str, Any], world: int) -> str:
    """The resume line's "; with changed flags: ..." part, or "" when nothing changed."""
    before = saved.to_dict()
    changed = [f"--{k.replace('_', '-')} {v} (was {before[k]})" for k, v in config.to_dict().items()
               if k not in _BOOKKEEPING and before.get(k) != v]  # fmt: skip
    text = "; with changed flags: " + ", ".join(changed) if changed else ""
    if state.get("world_size", 1) != world:
        text += (f"; saved by {state.get('world_size', 1)} processes, resumed on {world}: the same "
                 "updates up to float rounding")  # fmt: skip
    return text


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics rows a crashed run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
