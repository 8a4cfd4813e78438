"""checkpointing.run_state: RunState <-> a checkpoint's trainer state, old checkpoints included."""

import pytest
import torch

from rrhf_fast.checkpointing.run_state import RunState
from rrhf_fast.errors import UserError

PLAN = [[[3, 1], [0]], [[2]], [[5, 4]]]  # one epoch's steps -> micro-batches -> queries


def _no_plan(epoch):
    raise AssertionError("a checkpoint with queries_done needs no plan")


def test_round_trip_through_a_saved_trainer_state(tmp_path):
    state = RunState(step=7, epoch=1, queries_done=5, skipped_steps=2, bad_in_row=1, tokens_seen=1234)
    saved = state.to_trainer_state(data_seed=3, schedule={"lr": 1e-5}, data={"queries": 8})
    assert "step" not in saved  # save_checkpoint adds it, with the RNGs
    torch.save({**saved, "step": state.step}, tmp_path / "s.pt")  # as save_checkpoint writes it
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert (loaded["data_seed"], loaded["schedule"], loaded["data"]) == (3, {"lr": 1e-5}, {"queries": 8})
    assert RunState.from_trainer_state(loaded, _no_plan) == state


def test_a_checkpoint_that_counted_steps_resumes_after_their_queries():
    """Checkpoints written before `queries_done` kept the position in steps of the same plan."""
    old = {"step": 2, "epoch": 0, "position": 2, "skipped_steps": 0, "bad_in_row": 0, "tokens_seen": 99}
    state = RunState.from_trainer_state(old, lambda epoch: PLAN)
    assert state == RunState(step=2, epoch=0, queries_done=4, tokens_seen=99)
    assert RunState.from_trainer_state({**old, "queries_done": 3}, _no_plan).queries_done == 3


def test_a_trainer_state_without_the_counters_is_refused_in_one_sentence():
    with pytest.raises(
        UserError, match=r"^ckpt: the trainer state has no bad_in_row; it is not an rrhf-fast"
    ):
        RunState.from_trainer_state({"step": 1, "epoch": 0, "queries_done": 0, "skipped_steps": 0,
                                     "tokens_seen": 0}, _no_plan, where="ckpt")  # fmt: skip


def test_steps_count_queries_tokens_and_non_finite_runs():
    state = RunState()
    state.end_step(queries=4, tokens=100, finite=False)
    state.end_step(queries=4, tokens=90, finite=False)
    assert (state.step, state.queries_done, state.tokens_seen, state.skipped_steps, state.bad_in_row) == (
        2, 8, 190, 2, 2,
    )  # fmt: skip
    state.end_step(queries=2, tokens=50, finite=True)
    assert (state.skipped_steps, state.bad_in_row) == (2, 0)
    state.start_epoch()
    assert (state.epoch, state.queries_done, state.step, state.tokens_seen) == (1, 0, 3, 240)
