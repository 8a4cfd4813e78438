"""`rrhf-fast train`: the training loop, top to bottom.

setup (setup.py: run directory, data tokenised once, schedule, model, optimizer, resume) -> loop:
each step's queries (steps.py: a seeded order per epoch, steps planned by token budget) ->
train_step: forward_backward (for each micro-batch, the objective's forward and loss, then backward;
losses are sums divided by the step's query count, so micro-batch gradients simply add up to the
gradient of the step's mean) -> clip -> finite-loss guard -> optimizer step -> metrics row,
held-out evaluation, atomic checkpoint -> curves.png. The objective (--loss) is objectives/'s.

Under torchrun (`torchrun --nproc_per_node N -m rrhf_fast.cli train ...`) the same loop runs on
every rank: each takes its share of every step's micro-batches, DDP (or FSDP2 with --fsdp) sums
the gradients, metrics are summed over ranks, and rank 0 alone logs and draws (distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rrhf_fast import config as config_module
from rrhf_fast.checkpointing.checkpoint import (
    check_finite_weights,
    complete_checkpoints,
    latest_checkpoint,
    load_weights,
    read_trainer_state,
    save_checkpoint,
)
from rrhf_fast.checkpointing.run_state import RunState
from rrhf_fast.checkpointing.rundir import claim_output_dir
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import TokenizedExample
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import load_tokenizer
from rrhf_fast.objectives import Metrics, build_objective
from rrhf_fast.optimizers.in_backward import backward_step, check_one_microbatch
from rrhf_fast.optimizers.optim import lr_at, set_lr
from rrhf_fast.parallel import distributed
from rrhf_fast.planning.fit_check import check_fit
from rrhf_fast.reporting import tracking
from rrhf_fast.reporting.model_card import model_card
from rrhf_fast.reporting.plot import METRICS_FILE, plot_run
from rrhf_fast.step.backward import forward_backward
from rrhf_fast.step.steps import RankStep, Step, StepPlanner, plan_summary, rank_share
from rrhf_fast.training.evaluate import evaluate
from rrhf_fast.training.setup import (
    Job,
    autocast_for,
    build_model,
    check_device_flags,
    checkpoint_to_resume,
    load_data,
    make_optimizer,
    plan_schedule,
    resume,
    seed_everything,
    write_run_files,
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


DIVERGED_SUFFIX = ".diverged"  # a checkpoint whose weights gave a non-finite loss: never resumed from


def train(config: TrainConfig) -> TrainResult:
    config.validate()
    tracking.report_to(config.report_to)  # a tracker that is not installed: one sentence, before anything
    dist, device = distributed.init(config.device, config.fsdp)  # torchrun: this rank; else rank 0 of 1
    run_dir = claim_output_dir(config.output_dir, config.resume, dist)  # locked, before the model loads
    try:
        with deterministic_on_cpu(device):
            return _train(config, dist, device, run_dir.path)
    finally:
        run_dir.release()


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """On a CPU, torch's deterministic algorithms for the run (restored after): the same flags, seed
    and thread count give the same weights bit for bit. The known culprit, an indexing backward that
    accumulates repeated rows in a thread-dependent order, is already written as index_select; this
    keeps any other such op deterministic too (warn_only: an op without a deterministic CPU version
    warns instead of failing). torch.empty is not filled with NaN (that costs time and changes no
    result). On CUDA nothing changes: deterministic kernels there cost speed, and bitwise
    reproducibility is only promised on the CPU."""
    if device.type != "cpu":
        yield
        return
    import torch.utils.deterministic

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)  # fmt: skip
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def _train(config: TrainConfig, dist: distributed.Dist, device: torch.device, out_dir: Path) -> TrainResult:
    # ---------------------------------------------------------------------------------------------
    # setup
    log = tqdm.write if dist.main else _quiet
    checkpoint = checkpoint_to_resume(config, out_dir, log)
    resumed_from = checkpoint
    unread = config.unread_loss_flags()
    if unread:
        log(f"note: --loss {config.loss} does not read {', '.join(unread)}; they have no effect")
    check_device_flags(config, device)
    autocast = autocast_for(device)
    seed_everything(config.seed)  # the same on every rank: LoRA adapters start equal on each
    objective = build_objective(config)

    # ---------------------------------------------------------------------------------------------
    # data: tokenised once; each epoch a seeded permutation, cut into steps of micro-batches
    tokenizer = load_tokenizer(config.model)
    data = load_data(config, tokenizer, objective, log)
    planner = StepPlanner([it.packed_len for it in data.items], config)
    schedule, saved_config = plan_schedule(config, planner, data.fingerprint, checkpoint, log)
    if config.optim_in_backward:  # each step must be one micro-batch per rank
        check_one_microbatch(config, planner.steps_of_epoch, schedule["total_steps"], dist.world)
    if config.offload_optimizer and dist.world > 1:
        raise UserError("--offload-optimizer is for one GPU: under torchrun the gradients would leave "
                        "each GPU before DDP averages them; drop it or use --fsdp")  # fmt: skip
    # on CUDA: will the step fit? `rrhf-fast plan` on these flags (seconds), before any weights load
    check_fit(config, device, max(it.packed_len for it in data.items), log)

    # ---------------------------------------------------------------------------------------------
    # model and optimizer; a resumed run's weights go in before DDP / FSDP2 wrap the model (FSDP2
    # shards the weights it holds), its optimizer state once the optimizer holds the wrapped ones
    model = build_model(config, device, data, autocast, objective, tokenizer)
    torch.manual_seed(config.seed + dist.rank)  # dropout masks differ across ranks (not the data order)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    module = distributed.wrap(model, dist, config.fsdp, unit=objective.packed_module)  # runs the forward
    optimizer = make_optimizer(model, config)
    job = Job(config=config, dist=dist, device=device, autocast=autocast, objective=objective,
              tokenizer=tokenizer, model=model, module=module, optimizer=optimizer, out_dir=out_dir,
              schedule=schedule, fingerprint=data.fingerprint, packing=data.packing)  # fmt: skip
    state = RunState() if checkpoint is None else resume(job, checkpoint, planner, saved_config, log)
    run_info = write_run_files(job)
    report = _open_reporter(job, checkpoint, state.step, plan_summary(planner, schedule), run_info)

    # ---------------------------------------------------------------------------------------------
    # the loop
    total_steps, remaining = schedule["total_steps"], planner.steps_of_epoch(state.epoch, state.queries_done)
    _check_idle_ranks(remaining, dist, log)
    metrics_file = open(out_dir / METRICS_FILE, "a", encoding="utf-8") if dist.main else None  # noqa: SIM115
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if dist.main else True)  # fmt: skip
    row: dict[str, Any] = {}
    card = Card(job, run_info, report)  # the model card of each checkpoint: the metrics so far
    failed = True
    try:
        if data.eval_items is not None and state.step == 0:
            _log(metrics_file, card.seen({"step": 0, **held_out(job, data.eval_items)}), report)
        while state.step < total_steps:
            if not remaining:  # the epoch is over
                state.start_epoch()
                remaining = planner.steps_of_epoch(state.epoch)
            work = rank_share(remaining.pop(0), data.items, dist, objective)
            lr = lr_at(state.step, **schedule)
            set_lr(job.optimizer, lr)
            result = train_step(job, work)
            state.end_step(work.queries, result.tokens, result.finite)
            row = _metrics_row(state, result, lr)
            if state.bad_in_row >= config.max_bad_steps or (state.bad_in_row and state.step == total_steps):
                _log(metrics_file, row, report)
                raise NonFiniteTraining(_diverged(state, out_dir, dist, resumed_from))
            if data.eval_items is not None and _due(state.step, config.eval_every, total_steps):
                row.update(held_out(job, data.eval_items))
            _log(metrics_file, card.seen(row), report)
            if dist.main:
                _show(bar, row, config)
            if _due(state.step, config.save_every, total_steps) and not state.bad_in_row:
                checkpoint = save(job, state, run_info, card)  # never during a run of skipped steps
        failed = False
    except KeyboardInterrupt:
        log(f"interrupted at step {state.step}; last complete checkpoint: {latest_checkpoint(out_dir)} "
            "(continue with --resume)")  # fmt: skip
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if report is not None:
            report.close(failed)

    # ---------------------------------------------------------------------------------------------
    # the end
    _draw_curves(config, dist, out_dir, log)
    skipped = f"; {state.skipped_steps} of {state.step} steps skipped (non-finite loss or gradient norm)"
    log(f"done: step {state.step}, model in {checkpoint}" + (skipped if state.skipped_steps else ""))
    return TrainResult(step=state.step, checkpoint=checkpoint, last=row, model=model)


# -------------------------------------------------------------------------------------------------
# one step: every micro-batch forward + backward (gradients accumulate in .grad), then the update


@dataclass
class StepResult:
    metrics: Metrics  # summed over every rank
    grad_norm: float
    tokens: int  # over every rank
    finite: bool  # the loss and the gradient norm; else the step was skipped
    seconds: float
    mem_mib: float


def train_step(job: Job, work: RankStep) -> StepResult:
    """forward_backward, clip, then the optimizer step unless the loss or the gradient norm is not
    finite (a skipped step leaves weights and optimizer state as they were)."""
    on_cuda = job.device.type == "cuda"
    if on_cuda:  # mem_mib is this step's peak
        torch.cuda.reset_peak_memory_stats(job.device)
    t0 = time.perf_counter()
    run = functools.partial(forward_backward, job.module, job.objective, work.batches, job.autocast,
                            queries=work.normalizer, own=work.own, world=job.dist.world)  # fmt: skip
    # --optim-in-backward: the update happens in backward_step (then step() finds no gradient)
    metrics, grad_norm = backward_step(job.optimizer, run, job.params, job.config.max_grad_norm)
    metrics, tokens = _sum_over_ranks(metrics, work.tokens, job.device, job.dist.world)
    finite = math.isfinite(metrics.loss) and math.isfinite(grad_norm)
    if finite:
        job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    if on_cuda:
        torch.cuda.synchronize(job.device)
    seconds = time.perf_counter() - t0
    return StepResult(metrics, grad_norm, tokens, finite, seconds, _peak_memory_mib(job.device))


def _sum_over_ranks(metrics: Metrics, tokens: int, device: torch.device, world: int) -> tuple[Metrics, int]:
    """A step's metrics and tokens summed over every rank (unchanged in one process)."""
    if world == 1:
        return metrics, tokens
    total = distributed.sum_over_ranks([*metrics.to_list(), tokens], device)
    return Metrics.from_list(metrics.names, total[:-1]), int(total[-1])


# -------------------------------------------------------------------------------------------------
# after each step: the metrics row, held-out evaluation, the checkpoint


def _metrics_row(state: RunState, result: StepResult, lr: float) -> dict[str, Any]:
    """A metrics.jsonl line: the objective's loss terms and ranking metrics, then the step's numbers."""
    out, tokens = result.metrics, result.tokens
    return {"step": state.step, "epoch": state.epoch, **out.summary(), "lr": lr,
            "grad_norm": result.grad_norm, "queries": out.counts.queries, "tokens": tokens,
            "tokens_per_s": tokens / result.seconds, "mem_mib": result.mem_mib, "skipped": not result.finite,
            "skipped_steps": state.skipped_steps}  # fmt: skip


def held_out(job: Job, items: list[TokenizedExample]) -> dict[str, float | None]:
    return evaluate(job.module, items, job.config, objective=job.objective, autocast=job.autocast)


def save(job: Job, state: RunState, run_info: dict[str, Any], card: Card | None = None) -> Path:
    """checkpoint-STEP, atomically (checkpointing/checkpoint.py), with its model card; every rank calls it."""
    config = job.config
    # Never called after a skipped step (the loop raises _diverged when the last steps were skipped).
    check_finite_weights(job.model, state.step, job.device, latest_checkpoint(job.out_dir))
    trainer_state = state.to_trainer_state(data_seed=config.seed, schedule=job.schedule, data=job.fingerprint)
    if card is not None and card.report is not None:
        trainer_state["tracking"] = card.report.state()  # a resumed run continues the same tracked runs
    return save_checkpoint(job.out_dir, state.step, model=job.model, tokenizer=job.tokenizer,
                           optimizer=job.optimizer, trainer_state=trainer_state, config=config,
                           keep=config.keep_checkpoints, dist=job.dist, sharded=config.fsdp,
                           run_info=run_info, card=card.text(state.step) if card else None)  # fmt: skip


@dataclass
class Card:
    """What a checkpoint's model card says (model_card.py): the run, and its last train and eval rows."""

    job: Job
    run_info: dict[str, Any]
    report: tracking.Reporter | None
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def seen(self, row: dict[str, Any]) -> dict[str, Any]:
        evals = {k: v for k, v in row.items() if k.startswith("eval_")}
        self.eval = {"step": row["step"], **evals} if evals else self.eval
        if "loss" in row:
            self.train = {k: v for k, v in row.items() if not k.startswith("eval_")}
        return row

    def text(self, step: int) -> str | None:
        if not self.job.dist.main:
            return None
        return model_card(self.job.config, self.run_info, train=self.train, eval=self.eval, step=step,
                          adapter=hasattr(self.job.model, "peft_config"))  # fmt: skip


def _open_reporter(
    job: Job, checkpoint: Path | None, step: int, plan: dict[str, Any], run_info: dict[str, Any]
) -> tracking.Reporter | None:
    """Rank 0's trackers (--report-to), continuing the checkpoint's tracked runs, with the run logged."""
    if not job.dist.main:
        return None
    saved = read_trainer_state(checkpoint).get("tracking") if checkpoint is not None else None
    report = tracking.open_reporter(job.config, job.out_dir, saved, step)
    if report is not None:
        report.log_run(job.config.to_dict(), run_info, plan)
    return report


# -------------------------------------------------------------------------------------------------
# bookkeeping


def _log(file, row: dict[str, Any], report: tracking.Reporter | None = None) -> None:
    if file is None:  # not rank 0
        return
    file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
    file.flush()
    if report is not None:
        report.log(row)


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


def _diverged(
    state: RunState, out_dir: Path, dist: distributed.Dist, resumed_from: Path | None = None
) -> str:
    """The divergence error. The loss stopped being finite at step `first`, so the update of step
    first - 1 left weights that give a non-finite loss (a finite step can overflow the model: --lr 1e30
    leaves finite weights near 1e30): a checkpoint saved after it is renamed CHECKPOINT.diverged,
    so that --resume continues from the one before it, the checkpoint the message names.

    A checkpoint that holds NaN or inf never gets here: its weights and optimizer state are checked
    finite when it is loaded (checkpoint.load_weights, state_check.py), and refused as damaged. So
    a run that stops being finite at the first step after its resume says that the checkpoint's
    state was finite: what diverged is the run that wrote it (its weights overflow the loss)."""
    step, count = state.step, state.bad_in_row
    first = step - count + 1
    broken = [c for c in complete_checkpoints(out_dir) if int(c.name.rpartition("-")[2]) >= first - 1]
    if dist.main:
        for ckpt in broken:
            ckpt.rename(ckpt.with_name(ckpt.name + DIVERGED_SUFFIX))
    distributed.barrier()
    names = ", ".join(c.name for c in broken)
    moved = f"; {names} (saved after it) renamed *{DIVERGED_SUFFIX}" if broken else ""
    if resumed_from is not None and int(resumed_from.name.rpartition("-")[2]) == first - 1:
        moved += (" (the checkpoint this run resumed from: its weights and optimizer state were finite "
                  "when loaded, but its weights give a non-finite loss)")  # fmt: skip
    good = latest_checkpoint(out_dir)
    where = (f"lower --lr (or check the data) and --resume from {good}, saved before it" if good else
             "no checkpoint was saved before it: lower --lr (or check the data) and start again")  # fmt: skip
    return (
        f"the loss or gradient norm stopped being finite at step {first} (steps {first}-{step} skipped, "
        f"{count} in a row){moved}; {where}"
    )


def _check_idle_ranks(steps: list[Step], dist: distributed.Dist, log: Callable[[str], None]) -> None:
    """A step is the same whatever the number of GPUs (its micro-batches are shared out), so the
    flags of a one-GPU run would leave most ranks only running zero-weight fillers: say so."""
    most = max(map(len, steps), default=dist.world)
    if most >= dist.world:
        return
    world = dist.world
    log(
        f"note: a step has at most {most} micro-batch(es) for {world} ranks, so {world - most} rank(s) "
        f"only keep in step; give --grad-accum {world} (or a multiple) or a larger --queries-per-step"
    )


def _draw_curves(
    config: TrainConfig, dist: distributed.Dist, out_dir: Path, log: Callable[[str], None]
) -> None:
    if dist.main and config.plot and (out_dir / METRICS_FILE).stat().st_size:
        try:
            plot_run(out_dir)
        except Exception as err:  # a plotting problem must not fail a finished run
            log(f"could not draw curves.png ({type(err).__name__}: {err})")


def _quiet(*args: Any, **kwargs: Any) -> None:
    """What ranks other than 0 print."""


def _due(step: int, interval: int, last: int) -> bool:
    """Every `interval` steps (0: never) and at the `last` step."""
    return step == last or (interval > 0 and step % interval == 0)
