"""RunState: where a run is (step, epoch, position in the epoch) and its counters, and its conversion
to and from the trainer state a checkpoint keeps (checkpointing/checkpoint.py writes it as
trainer_state.pt, beside the RNGs, the schedule and the data fingerprint).

The position is the number of the epoch's queries already trained, not a step index, so that a
resume with another --queries-per-step / --grad-accum / --micro-batch-tokens plans the rest of the
epoch anew rather than skip or repeat queries. Checkpoints written before `queries_done` was kept
hold `position`, a step index into the epoch's plan under the same flags; they still resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rrhf_fast.errors import UserError
from rrhf_fast.step.steps import Step, queries_in

_COUNTERS = ("skipped_steps", "bad_in_row", "tokens_seen")


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken (skipped non-finite ones included)
    epoch: int = 0
    queries_done: int = 0  # of this epoch's queries
    skipped_steps: int = 0  # non-finite steps, skipped, over the whole run
    bad_in_row: int = 0  # non-finite steps in a row up to now
    tokens_seen: int = 0  # packed tokens trained, over every rank

    def start_epoch(self) -> None:
        self.epoch, self.queries_done = self.epoch + 1, 0

    def end_step(self, queries: int, tokens: int, finite: bool) -> None:
        """Count a step of `queries` queries and `tokens` tokens, skipped unless `finite`."""
        self.step += 1
        self.queries_done += queries
        self.tokens_seen += tokens
        if finite:
            self.bad_in_row = 0
        else:
            self.skipped_steps, self.bad_in_row = self.skipped_steps + 1, self.bad_in_row + 1

    def to_trainer_state(
        self, *, data_seed: int, schedule: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """What a checkpoint keeps of the run besides the step (save_checkpoint adds it and the RNGs):
        this state, the data order's seed, the learning-rate schedule and the data fingerprint."""
        return dict(epoch=self.epoch, queries_done=self.queries_done, data_seed=data_seed,
                    skipped_steps=self.skipped_steps, bad_in_row=self.bad_in_row,
                    tokens_seen=self.tokens_seen, schedule=schedule, data=data)  # fmt: skip

    @classmethod
    def from_trainer_state(
        cls, saved: dict[str, Any], steps_of_epoch: Callable[[int], list[Step]], where: str = "checkpoint"
    ) -> RunState:
        """The state a checkpoint's trainer state resumes; `steps_of_epoch(epoch)` plans an epoch with
        the run's flags, for a checkpoint that kept its position as a step index (`position`)."""
        missing = [k for k in ("step", "epoch", *_COUNTERS) if k not in saved]
        if missing or ("queries_done" not in saved and "position" not in saved):
            lacks = ", ".join(missing or ["queries_done"])
            raise UserError(f"{where}: the trainer state has no {lacks}; it is not an rrhf-fast checkpoint, "
                            "delete it")  # fmt: skip
        done = saved.get("queries_done")
        if done is None:
            done = queries_in(steps_of_epoch(saved["epoch"])[: saved["position"]])
        return cls(saved["step"], saved["epoch"], done, *(saved[k] for k in _COUNTERS))
