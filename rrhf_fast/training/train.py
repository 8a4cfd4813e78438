"""`rrhf-fast train`: the RRHF training loop, one file, top to bottom.

setup -> data (tokenise once, a seeded order per epoch, steps planned by token budget) -> model and
optimizer -> resume -> loop: for each micro-batch of the step, packed forward + rrhf_loss + backward
(losses are sums divided by the step's query count, so micro-batch gradients simply add up to the
gradient of the step's mean) -> finite-loss guard -> clip -> optimizer step -> metrics, held-out
evaluation, atomic checkpoint -> curves.png.

Under torchrun (`torchrun --nproc_per_node N -m rrhf_fast.cli train ...`) the same loop runs on
every rank: each takes its share of every step's micro-batches, DDP (or FSDP2 with --fsdp) sums
the gradients, metrics are summed over ranks, and rank 0 alone logs and draws (distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import (
    PackedBatch,
    TokenizedExample,
    pack_tokenized,
    plan_microbatches,
    tokenize_example,
)
from rrhf_fast.data.records import load_examples_with_stats
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import load_model, load_tokenizer
from rrhf_fast.models.logprobs import check_logit_parity, prepare_model
from rrhf_fast.objectives import Metrics, Objective, build_objective
from rrhf_fast.training import distributed
from rrhf_fast.training.checkpoint import (
    CONFIG_FILE,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_partial_saves,
    save_checkpoint,
)
from rrhf_fast.training.evaluate import evaluate
from rrhf_fast.training.optim import build_optimizer, default_warmup, lr_at, set_lr
from rrhf_fast.training.plot import METRICS_FILE, plot_run
from rrhf_fast.training.provenance import RUN_FILE, resolved_settings, write_run_info
from rrhf_fast.training.resume import (
    changed_flags,
    check_same_data,
    choose_schedule,
    data_fingerprint,
    truncate_metrics,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_module.add_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    try:
        train(TrainConfig.from_args(args))
    finally:
        distributed.shutdown()
    return 0


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics row
    model: Any = None


class NonFiniteTraining(UserError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


def train(config: TrainConfig) -> TrainResult:
    # ---------------------------------------------------------------------------------------------
    # setup
    config.validate()
    here, device = distributed.init(config.device, config.fsdp)  # torchrun: this rank; else rank 0 of 1
    say = tqdm.write if here.main else _quiet
    out_dir = _prepare_output_dir(config, here)
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if config.resume and checkpoint is None:
        say(f"no checkpoint in {out_dir}, starting from step 0")
    _check_device_flags(config, device)
    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    _seed_everything(config.seed)  # the same on every rank: LoRA adapters start equal on each
    objective = build_objective(config)

    # ---------------------------------------------------------------------------------------------
    # data: tokenised once; each epoch a seeded permutation, cut into steps of micro-batches
    tokenizer = load_tokenizer(config.model)
    items, where = _tokenize(config.data, tokenizer, config, objective)
    evals = _tokenize(config.eval_data, tokenizer, config, objective) if config.eval_data else None
    eval_items = evals[0] if evals else None
    lengths = [it.packed_len for it in items]
    data_id = data_fingerprint(items)

    def steps_of_epoch(epoch: int, done: int = 0) -> list[list[list[int]]]:
        """The epoch's steps after its first `done` queries (greedy planning: the same steps as the
        whole epoch's from that point on, whenever `done` ends a step of the same flags)."""
        return plan_steps(lengths, epoch_order(len(items), config.seed, epoch)[done:], config)

    total_steps = config.max_steps or sum(len(steps_of_epoch(e)) for e in range(config.epochs))
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup(total_steps)
    schedule = dict(lr=config.lr, total_steps=total_steps, warmup_steps=warmup, min_lr=config.min_lr)
    if checkpoint is not None:  # refuse other data, settle the schedule, before loading any weights
        saved_state, saved_config = read_trainer_state(checkpoint), TrainConfig.load(checkpoint / CONFIG_FILE)
        check_same_data(saved_state, data_id, config.data, checkpoint)
        schedule, note = choose_schedule(schedule, saved_state, saved_config, config)
        total_steps = schedule["total_steps"]
        if note:
            say(note)

    # ---------------------------------------------------------------------------------------------
    # model and optimizer; a resumed run's weights go in before DDP / FSDP2 wrap the model, its
    # optimizer state once the optimizer holds the wrapped parameters (checkpoint.load_checkpoint)
    model = prepare_model(load_model(config, device))
    _check_vocabulary(model, [(items, where), evals] if evals else [(items, where)])
    with autocast:  # packed log-probs must equal the model's own: refuse what packing cannot mirror
        check_logit_parity(model, attn=config.attn, impl=config.loss_impl)
    # Dropout masks differ across ranks; the data order has its own generators (epoch_order).
    torch.manual_seed(config.seed + here.rank)
    built: dict[str, Any] = {}

    def wrap_and_build() -> torch.optim.Optimizer:
        built["runner"] = distributed.wrap(model, here, config.fsdp)  # what the forward goes through
        built["optimizer"] = build_optimizer(
            model.named_parameters(),
            config.optim,
            lr=config.lr,
            weight_decay=config.weight_decay,
            sharded=config.fsdp,
        )
        return built["optimizer"]

    # ---------------------------------------------------------------------------------------------
    # resume: weights, optimizer, RNGs, data position and counters of the last complete checkpoint.
    # The position is the number of the epoch's queries already trained, so a resume with another
    # --queries-per-step / --grad-accum / --micro-batch-tokens plans the rest of the epoch anew
    # rather than skip or repeat queries.
    step, epoch, done, skipped, bad_in_row, tokens_seen = 0, 0, 0, 0, 0, 0
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint, model=model, optimizer=wrap_and_build, here=here, sharded=config.fsdp
        )
        step, epoch, done = state["step"], state["epoch"], _queries_done(state, steps_of_epoch)
        skipped, bad_in_row, tokens_seen = state["skipped_steps"], state["bad_in_row"], state["tokens_seen"]
        if here.main:
            truncate_metrics(out_dir / METRICS_FILE, step)
        say(
            f"resumed from {checkpoint} (step {step})"
            + changed_flags(saved_config, config, state, here.world)
        )
    else:
        wrap_and_build()
    runner, optimizer = built["runner"], built["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    resolved = resolved_settings(config, model, device, here.world, schedule, data_id)
    if here.main:
        config.save(out_dir / "config.json")
        write_run_info(out_dir / RUN_FILE, resolved)
    plan, position = steps_of_epoch(epoch, done), 0
    if plan and max(map(len, plan)) < here.world:
        say(_idle_ranks_message(max(map(len, plan)), here.world))

    def save() -> Path:
        state = dict(epoch=epoch, queries_done=done, data_seed=config.seed, skipped_steps=skipped,
                     bad_in_row=bad_in_row, tokens_seen=tokens_seen, schedule=schedule,
                     data=data_id)  # fmt: skip
        return save_checkpoint(out_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                               trainer_state=state, config=config, keep=config.keep_checkpoints, here=here,
                               sharded=config.fsdp, run_info=resolved)  # fmt: skip

    # ---------------------------------------------------------------------------------------------
    # the loop
    metrics_file = open(out_dir / METRICS_FILE, "a", encoding="utf-8") if here.main else None  # noqa: SIM115
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if here.main else True)  # fmt: skip
    row: dict[str, Any] = {}
    try:
        if eval_items is not None and step == 0:
            scores = evaluate(runner, eval_items, config, objective=objective, autocast=autocast)
            _log(metrics_file, {"step": 0, **scores})
        while step < total_steps:
            if position >= len(plan):  # next epoch
                epoch, done, position = epoch + 1, 0, 0
                plan = steps_of_epoch(epoch)
            groups, real = distributed.my_microbatches(plan[position], here)
            batches = [pack_tokenized([items[i] for i in group]) for group in groups]
            queries = sum(len(group) for group in plan[position])  # the whole step's, on every rank
            position, done = position + 1, done + queries
            lr = lr_at(step, **schedule)
            set_lr(optimizer, lr)

            if on_cuda:  # mem_mib is this step's peak
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            metrics = forward_backward(runner, objective, batches, autocast, queries=queries, own=real,
                                       world=here.world)  # fmt: skip
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            grad_norm = float(distributed.local_value(norm))
            tokens = sum(b.num_tokens for b in batches[:real])
            metrics, tokens = _sum_over_ranks(metrics, tokens, device, here.world)
            finite = math.isfinite(metrics.loss) and math.isfinite(grad_norm)
            if finite:  # a non-finite step leaves weights and optimizer state as they were
                optimizer.step()
                bad_in_row = 0
            else:
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
            optimizer.zero_grad(set_to_none=True)
            if on_cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            tokens_seen += tokens

            row = {"step": step, "epoch": epoch, **metrics.summary(), "lr": lr, "grad_norm": grad_norm,
                   "queries": metrics.counts.queries, "tokens": tokens, "tokens_per_s": tokens / dt,
                   "mem_mib": _peak_memory_mib(device), "skipped": not finite,
                   "skipped_steps": skipped}  # fmt: skip
            if bad_in_row >= config.max_bad_steps:
                _log(metrics_file, row)
                raise NonFiniteTraining(_diverged_message(step, bad_in_row, latest_checkpoint(out_dir)))
            if eval_items is not None and (step == total_steps or _every(step, config.eval_every)):
                row.update(evaluate(runner, eval_items, config, objective=objective, autocast=autocast))
            _log(metrics_file, row)
            if here.main:
                _show(bar, row, config)

            if step == total_steps or _every(step, config.save_every):
                checkpoint = save()
    except KeyboardInterrupt:
        last = latest_checkpoint(out_dir)
        say(f"interrupted at step {step}; last complete checkpoint: {last} (continue with --resume)")
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    # ---------------------------------------------------------------------------------------------
    # the end
    if here.main and config.plot and (out_dir / METRICS_FILE).stat().st_size:
        try:
            plot_run(out_dir)
        except Exception as err:  # a plotting problem must not fail a finished run
            say(f"could not draw curves.png ({type(err).__name__}: {err})")
    say(f"done: step {step}, model in {checkpoint}")
    return TrainResult(step=step, checkpoint=checkpoint, last=row, model=model)


# -------------------------------------------------------------------------------------------------
# one step: every micro-batch forward + backward, gradients accumulate in .grad


def forward_backward(
    model: Any,
    objective: Objective,
    batches: list[PackedBatch],
    autocast: contextlib.AbstractContextManager,
    *,
    queries: int | None = None,
    own: int | None = None,
    world: int = 1,
) -> Metrics:
    """Backward of the step's mean loss over all its queries; returns the summed metrics of the batches.

    Under torchrun, `queries` is the step's query count over every rank, the batches after the
    first `own` only keep this rank in step with the others (they train with weight 0), and the
    loss is multiplied by `world`, since DDP and FSDP2 average the ranks' gradients.
    """
    queries = float(sum(b.num_queries for b in batches) if queries is None else queries)
    own = len(batches) if own is None else own
    metrics = None
    for i, batch in enumerate(batches):
        weight = world if i < own else 0
        with distributed.gradient_sync(model, enabled=i == len(batches) - 1):
            out = objective(model, batch, normalizer=queries, autocast=autocast)
            (out.loss if weight == 1 else out.loss * weight).backward()
        if i < own:
            metrics = out.metrics if metrics is None else metrics.__iadd__(out.metrics)
    return metrics if metrics is not None else objective.zero_metrics()


def _sum_over_ranks(metrics: Metrics, tokens: int, device: torch.device, world: int) -> tuple[Metrics, int]:
    """A step's metrics and tokens summed over every rank (unchanged in one process)."""
    if world == 1:
        return metrics, tokens
    total = distributed.sum_over_ranks([*metrics.to_list(), tokens], device)
    return Metrics.from_list(metrics.names, total[:-1]), int(total[-1])


# -------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, epoch, lengths, flags), so a resumed run replays it exactly


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _queries_done(state: dict[str, Any], steps_of_epoch: Any) -> int:
    """How many of its epoch's queries a checkpoint had trained (one written before `queries_done`
    was kept counts the queries of its first `position` steps, planned with the same flags)."""
    if "queries_done" in state:
        return state["queries_done"]
    steps = steps_of_epoch(state["epoch"])[: state["position"]]
    return sum(len(group) for step in steps for group in step)


def plan_steps(lengths: list[int], order: list[int], config: TrainConfig) -> list[list[list[int]]]:
    """Steps -> micro-batches -> query indices.

    --queries-per-step N: each step takes the next N queries, split by the token budget (the
    update does not depend on the budget). Otherwise each step is --grad-accum micro-batches, each
    filled up to the budget (as fairseq's --max-tokens / --update-freq).
    """

    def split(indices: list[int]) -> list[list[int]]:
        groups = plan_microbatches([lengths[i] for i in indices], config.micro_batch_tokens)
        return [[indices[j] for j in group] for group in groups]

    if config.queries_per_step:
        n = config.queries_per_step
        return [split(order[s : s + n]) for s in range(0, len(order), n)]
    micro = split(order)
    return [micro[s : s + config.grad_accum] for s in range(0, len(micro), config.grad_accum)]


def _tokenize(
    path: str, tokenizer: Any, config: TrainConfig, objective: Objective
) -> tuple[list[TokenizedExample], list[str]]:
    """The tokenised examples of `path` and where each one is ("FILE:LINE"), every one checked to fit
    a micro-batch: an error names the record, not its index in a shuffled step."""
    stats = load_examples_with_stats(path)
    if not stats.examples:
        raise UserError(f"{path}: no examples; give a JSONL file with one query per line")
    where = stats.locations()
    items = [
        tokenize_example(ex, tokenizer, max_prompt_len=config.max_prompt_len,
                         max_response_len=config.max_response_len, chat_template=config.chat_template,
                         where=loc)
        for ex, loc in zip(stats.examples, where, strict=True)
    ]  # fmt: skip
    budget = config.micro_batch_tokens
    for item, loc in zip(items, where, strict=True):
        if item.packed_len > budget:
            raise UserError(
                f"{loc}: the query packs to {item.packed_len} tokens (its prompt once plus its "
                f"{len(item.response_ids)} responses), over the micro-batch budget --micro-batch-tokens "
                f"{budget}; raise --micro-batch-tokens, or truncate with --max-prompt-len / "
                "--max-response-len"
            )
    objective.check_data(items, path)
    return items, where


def _check_vocabulary(model: Any, datasets: list[tuple[list[TokenizedExample], list[str]]]) -> None:
    """Every token id must index the embedding and the lm_head: a tokenizer with more tokens than
    the weights otherwise fails deep inside the forward (an IndexError, a CUDA device-side assert)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight.shape[0]
    head = base.get_output_embeddings().weight.shape[0]
    for items, where in datasets:
        for item, loc in zip(items, where, strict=True):
            top = max(max(item.prompt_ids), *(max(r) for r in item.response_ids))
            if top >= min(embedding, head):
                raise UserError(
                    f"{loc}: token id {top} is outside the model's vocabulary ({embedding} embedding rows, "
                    f"{head} lm_head rows): the tokenizer has more tokens than the weights; use the "
                    "model's own tokenizer, or resize its embeddings (resize_token_embeddings) and save it"
                )


# -------------------------------------------------------------------------------------------------
# bookkeeping


def _prepare_output_dir(config: TrainConfig, here: distributed.Dist) -> Path:
    """Checks on every rank (each raises the same error), changes by rank 0 alone."""
    out_dir = Path(config.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {out_dir} is a file; give a directory")
    if here.main and out_dir.is_dir():
        remove_partial_saves(out_dir)  # first: it puts back a checkpoint a crashed re-save had parked
    distributed.barrier()
    found = latest_checkpoint(out_dir)
    if found is not None and not config.resume:
        raise UserError(
            f"--output-dir {out_dir} already holds {found.name}; pass --resume to continue that run "
            "or choose a new --output-dir"
        )
    if here.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if found is None and (out_dir / METRICS_FILE).exists():
            (out_dir / METRICS_FILE).unlink()  # a run that never reached a checkpoint starts again
    distributed.barrier()
    return out_dir


def _check_device_flags(config: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        return
    if config.attn in ("varlen", "flex"):
        raise UserError(f"--attn {config.attn} needs a CUDA GPU; on {device.type} use --attn dense (or auto)")
    if config.loss_impl == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UserError(
            f"--loss-impl triton needs a CUDA GPU; on {device.type} use --loss-impl torch (or auto)"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(file, row: dict[str, Any]) -> None:
    if file is None:  # not rank 0
        return
    file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
    file.flush()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the line parseable
    return value


def _show(bar: Any, row: dict[str, Any], config: TrainConfig) -> None:
    loss, speed, mem = row["loss"], row["tokens_per_s"], row["mem_mib"]
    bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{speed:.0f}", mem=f"{mem:.0f}M", refresh=False)
    bar.update(1)
    if config.log_every and (row["step"] % config.log_every == 0 or "eval_loss" in row):
        shown = {k: v for k, v in row.items() if k not in ("epoch", "skipped") and v is not None}
        tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: the step's peak of allocated memory (reset at each step's start); CPU: the process's
    peak resident memory so far (the OS keeps no per-step peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: peak RSS


def _diverged_message(step: int, count: int, last: Path | None) -> str:
    where = f"the last checkpoint is {last} (--resume continues from it)" if last else "none was saved"
    return (
        f"the loss or gradient norm was not finite for {count} steps in a row "
        f"(steps {step - count + 1}-{step}, all skipped); lower --lr or check the data, "
        f"or raise --max-bad-steps; {where}"
    )


def _idle_ranks_message(most: int, world: int) -> str:
    # A step is the same whatever the number of GPUs (its micro-batches are shared out), so the
    # flags of a one-GPU run would leave most ranks only running zero-weight fillers.
    return (
        f"note: a step has at most {most} micro-batch(es) for {world} ranks, so {world - most} rank(s) "
        f"only keep in step; give --grad-accum {world} (or a multiple) or a larger --queries-per-step"
    )


def _quiet(*args: Any, **kwargs: Any) -> None:
    """What ranks other than 0 print."""


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
