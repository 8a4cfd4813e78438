"""`rrhf-fast train`'s set-up, one named call per part, in the order train() makes them: the run
directory and a checkpoint to resume, the data (tokenised once, every query checked to fit a
micro-batch), the learning-rate schedule (a resumed run's settled against its checkpoint before any
weights load), the model (refused if packing cannot mirror its forward), the optimizer, and the
state a checkpoint restores.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrhf_fast.checkpointing.checkpoint import (
    CONFIG_FILE,
    latest_checkpoint,
    load_training_state,
    read_trainer_state,
)
from rrhf_fast.checkpointing.provenance import RUN_FILE, resolved_settings, write_run_info
from rrhf_fast.checkpointing.resume import (
    changed_flags,
    check_same_data,
    choose_schedule,
    data_fingerprint,
    truncate_metrics,
)
from rrhf_fast.checkpointing.run_state import RunState
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import TokenizedExample, check_positions, describe_packing, packing_summary
from rrhf_fast.data.records import load_examples_with_stats
from rrhf_fast.data.tokenize import tokenize_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import max_positions
from rrhf_fast.models.wrapping import unwrap
from rrhf_fast.objectives import Objective
from rrhf_fast.optimizers.optim import default_warmup, make_optimizer  # noqa: F401  (train imports it from here)
from rrhf_fast.parallel import distributed
from rrhf_fast.reporting.plot import METRICS_FILE
from rrhf_fast.step.backward import training_autocast
from rrhf_fast.step.steps import StepPlanner

# -------------------------------------------------------------------------------------------------
# the run directory, the device, the seeds


def checkpoint_to_resume(config: TrainConfig, out_dir: Path, log: Callable[[str], None]) -> Path | None:
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if config.resume and checkpoint is None:
        log(f"no checkpoint in {out_dir}, starting from step 0")
    return checkpoint


def check_device_flags(config: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        return
    if config.attn in ("varlen", "flex"):
        raise UserError(f"--attn {config.attn} needs a CUDA GPU; on {device.type} use --attn dense (or auto)")
    if config.kernels == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UserError(f"--kernels triton needs a CUDA GPU; on {device.type} use --kernels torch (or auto)")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    return training_autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------
# data: tokenised once, checked, fingerprinted; the learning-rate schedule


@dataclass
class TrainData:
    items: list[TokenizedExample]
    where: list[str]  # "FILE:LINE" of each item
    eval_items: list[TokenizedExample] | None
    eval_where: list[str]
    fingerprint: dict[str, Any]
    packing: dict[str, Any]  # packing.packing_summary of the training data (run.json "packing")


def load_data(
    config: TrainConfig, tokenizer: Any, objective: Objective, log: Callable[[str], None] | None = None
) -> TrainData:
    """The training (and held-out) examples, tokenised once, each checked to fit a micro-batch; `log`
    gets the packing summary."""
    items, where = _tokenize(config.data, tokenizer, config, objective)
    eval_items, eval_where = None, []
    if config.eval_data:
        eval_items, eval_where = _tokenize(config.eval_data, tokenizer, config, objective, config.eval_split)
    packing = packing_summary(items)
    if log is not None:
        log(describe_packing(packing))
    return TrainData(items, where, eval_items, eval_where, data_fingerprint(items), packing)


def _tokenize(
    path: str, tokenizer: Any, config: TrainConfig, objective: Objective, split: str | None = None
) -> tuple[list[TokenizedExample], list[str]]:
    """The tokenised examples of `path` and where each one is ("FILE:LINE"), every one checked to fit
    a micro-batch: an error names the record, not its index in a shuffled step."""
    stats = load_examples_with_stats(path, **config.data_options(split))
    if not stats.examples:
        raise UserError(f"{path}: no examples; give a file with one query per record")
    where = stats.locations()
    items = tokenize_examples(stats.examples, tokenizer, locations=where, **config.tokenizing())
    budget = config.micro_batch_tokens
    for item, loc in zip(items, where, strict=True):
        if item.packed_len > budget:
            raise UserError(
                f"{loc}: the query packs to {item.packed_len} tokens (its prompt once plus its "
                f"{len(item.response_ids)} responses), over the micro-batch budget --micro-batch-tokens "
                f"{budget}; raise --micro-batch-tokens, or truncate with --max-prompt-len / "
                "--max-response-len"
            )
    objective.check_data(items, path, where)
    return items, where


def plan_schedule(
    config: TrainConfig,
    planner: StepPlanner,
    fingerprint: dict[str, Any],
    checkpoint: Path | None,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], TrainConfig | None]:
    """The learning-rate schedule (lr_at's arguments) and a resumed run's saved flags: a checkpoint
    of other data is refused, and its schedule settled, before any weights are loaded."""
    total_steps = planner.total_steps()
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup(total_steps)
    schedule = dict(lr=config.lr, total_steps=total_steps, warmup_steps=warmup, min_lr=config.min_lr)
    if warmup > total_steps:  # a note, not an error: a short trial run of a long setup is legitimate
        log(f"note: --warmup-steps {warmup} is beyond the run's {total_steps} steps: the learning rate "
            f"never reaches --lr {config.lr}")  # fmt: skip
    if checkpoint is None:
        return schedule, None
    saved_state, saved_config = read_trainer_state(checkpoint), TrainConfig.load(checkpoint / CONFIG_FILE)
    check_same_data(saved_state, fingerprint, config.data, checkpoint)
    schedule, note = choose_schedule(schedule, saved_state, saved_config, config)
    if note:
        log(note)
    return schedule, saved_config


# -------------------------------------------------------------------------------------------------
# model, optimizer, and what a resumed run restores


def build_model(
    config: TrainConfig,
    device: torch.device,
    data: TrainData,
    autocast: contextlib.AbstractContextManager,
    objective: Objective,
    tokenizer: Any,
) -> Any:
    """The objective's model (Objective.load_model: the causal LM, or train-rm's reward model),
    switched to packed attention; refused if the data or the packing do not fit it."""
    model = objective.load_model(device, tokenizer, autocast)
    _check_vocabulary(model, [(data.items, data.where), (data.eval_items or [], data.eval_where)])
    positions = max_positions(model.config)
    for items, where in [(data.items, data.where), (data.eval_items or [], data.eval_where)]:
        check_positions(items, where, positions)
    return model


def _check_vocabulary(model: Any, datasets: list[tuple[list[TokenizedExample], list[str]]]) -> None:
    """Every token id must index the embedding and the lm_head: a tokenizer with more tokens than
    the weights otherwise fails deep inside the forward (an IndexError, a CUDA device-side assert)."""
    base = unwrap(model)
    embedding = base.get_input_embeddings().weight.shape[0]
    output = base.get_output_embeddings()  # None for a reward model (a score head, no lm_head)
    head = embedding if output is None else output.weight.shape[0]
    for items, where in datasets:
        for item, loc in zip(items, where, strict=True):
            top = max(max(item.prompt_ids), *(max(r) for r in item.response_ids))
            if top >= min(embedding, head):
                raise UserError(
                    f"{loc}: token id {top} is outside the model's vocabulary ({embedding} embedding rows, "
                    f"{head} lm_head rows): the tokenizer has more tokens than the weights; use the "
                    "model's own tokenizer, or resize its embeddings (resize_token_embeddings) and save it"
                )


@dataclass
class Job:
    """What the loop runs, fixed once set up (what changes from step to step is RunState's)."""

    config: TrainConfig
    dist: distributed.Dist
    device: torch.device
    autocast: contextlib.AbstractContextManager
    objective: Objective
    tokenizer: Any
    model: Any  # the model itself: what is saved
    module: Any  # what the forward goes through: `model`, or DDP / FSDP2 around the objective's forward
    optimizer: torch.optim.Optimizer
    out_dir: Path
    schedule: dict[str, Any]  # lr_at's arguments
    fingerprint: dict[str, Any]  # of the training data (resume.data_fingerprint)
    packing: dict[str, Any] = field(default_factory=dict)  # TrainData.packing, for run.json

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters in the model's order (the clipped norm sums in this order)."""
        return [p for p in self.model.parameters() if p.requires_grad]


def resume(
    job: Job, checkpoint: Path, planner: StepPlanner, saved_config: TrainConfig, log: Callable[[str], None]
) -> RunState:
    """Restore a checkpoint's optimizer state, RNGs, data position and counters (its weights are in)."""
    saved = load_training_state(checkpoint, model=job.model, optimizer=job.optimizer, dist=job.dist,
                                sharded=job.config.fsdp, optim=job.config.optim)  # fmt: skip
    state = RunState.from_trainer_state(saved, planner.steps_of_epoch, where=str(checkpoint))
    if job.dist.main:
        truncate_metrics(job.out_dir / METRICS_FILE, state.step)
    changed = changed_flags(saved_config, job.config, saved, job.dist.world)
    log(f"resumed from {checkpoint} (step {state.step}){changed}")
    return state


def write_run_files(job: Job) -> dict[str, Any]:
    """config.json and run.json (the flags and what they resolved to); the latter also goes in each
    checkpoint, returned for save()."""
    config, dist = job.config, job.dist
    resolved = resolved_settings(config, job.model, job.device, dist.world, job.schedule, job.fingerprint)
    resolved["packing"] = dict(job.packing)
    if dist.main:
        config.save(job.out_dir / "config.json")
        write_run_info(job.out_dir / RUN_FILE, resolved)
    return resolved
