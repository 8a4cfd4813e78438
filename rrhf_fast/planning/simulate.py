"""Two training steps on fake tensors: the memory `rrhf-fast plan` reports, by category and phase.

The model is built from its config alone inside `FakeTensorMode` (no weights, no memory, no
compute) and goes through the trainer's own pieces: `finish_model` (checkpointing, LoRA),
`prepare_model`, `packed_logprobs` (our attention function and the fused kernels, as custom ops
with fake kernels), `loss_of`, backward, gradient clipping and `build_optimizer`'s step; with
--optim-in-backward, in_backward.backward_step's pass(es), each parameter updated inside the
backward (those allocations count as the phase "optimizer in backward"). Two steps, because the
first creates the optimizer state in its update, and from the second on that state lives through
forward and backward too: the peak is the larger of the two. The tensors are fake *CPU* tensors
under CPU bf16 autocast: on a CPU-only torch, autograd on fake `cuda` tensors aborts the process
(no CUDA device guard; measured on torch 2.13), and the sizes are the same. What runs only on CUDA
is given a stand-in that allocates what it allocates there (plan_cuda.py). `cuda=False` keeps the
CPU's own paths instead: the same steps a real CPU run takes, which the tests measure and compare.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import PackedBatch, TokenizedExample, pack_tokenized
from rrhf_fast.kernels import ops
from rrhf_fast.kernels import utils as kernel_utils
from rrhf_fast.models import attention, reward
from rrhf_fast.models.loading import finish_model, weight_dtype
from rrhf_fast.models.logprobs import prepare_model
from rrhf_fast.objectives import Metrics, build_objective
from rrhf_fast.objectives import reward as reward_objective
from rrhf_fast.optimizers import optim
from rrhf_fast.optimizers.in_backward import InBackwardOptimizer, backward_step
from rrhf_fast.optimizers.offload import OffloadOptimizer
from rrhf_fast.optimizers.optim import make_optimizer
from rrhf_fast.planning import plan_cuda
from rrhf_fast.planning.memtrack import CATEGORIES, MemoryReport, MemoryTracker, watch_gradients
from rrhf_fast.step.backward import forward_backward, training_autocast


@dataclass(frozen=True)
class BatchShape:
    prompt_len: int
    response_len: int
    k: int
    queries: int

    @property
    def tokens(self) -> int:
        return self.queries * (self.prompt_len + self.k * self.response_len)

    def describe(self) -> str:
        return (f"{self.queries} quer{'y' if self.queries == 1 else 'ies'} x (prompt {self.prompt_len} + "
                f"{self.k} responses x {self.response_len})")  # fmt: skip


def batch_shape(
    budget: int, prompt_len: int | None = None, response_len: int | None = None, k: int = 4
) -> BatchShape:
    """The packed micro-batch a plan simulates: by default one query filling the budget, its k
    responses a quarter of the prompt's length each; given lengths, as many queries as fit."""
    if prompt_len is None and response_len is None:
        response_len = max(1, budget // (4 + k))
        prompt_len = max(1, budget - k * response_len)
    elif prompt_len is None:
        prompt_len = max(1, 4 * response_len)
    elif response_len is None:
        response_len = max(1, prompt_len // 4)
    per_query = prompt_len + k * response_len
    return BatchShape(prompt_len, response_len, k, max(1, budget // per_query))


def packed_batch(shape: BatchShape, vocab_size: int) -> PackedBatch:
    ids = [1 + i % (vocab_size - 1) for i in range(shape.prompt_len + shape.k * shape.response_len)]
    prompt, rest = ids[: shape.prompt_len], ids[shape.prompt_len :]
    responses = [rest[j * shape.response_len : (j + 1) * shape.response_len] for j in range(shape.k)]
    item = TokenizedExample(prompt, responses, scores=[float(j) for j in range(shape.k)],
                            ref_logps=[0.0] * shape.k)  # fmt: skip
    return pack_tokenized([item] * shape.queries)


# ---------------------------------------------------------------------------------------------
# the step


def simulate(
    hf_config: Any, config: TrainConfig, shape: BatchShape, *, layers: int | None = None,
    fake: bool = True, cuda: bool = True, device: torch.device | str = "cpu",
) -> MemoryReport:  # fmt: skip
    """Memory of one training step of `config` on a model of `hf_config` (with its first `layers`
    decoder layers when given). `fake=False` runs it for real (tests), on `device` (a GPU:
    benchmarks/plan_vs_gpu.py, with `cuda=False` so that its own paths run); `cuda` as module doc."""
    hf_config = with_layers(hf_config, layers)
    device = torch.device("cpu" if fake else device)
    if cuda and config.kernels == "auto":  # what auto picks on CUDA
        config = dataclasses.replace(config, kernels="triton")
    batch = packed_batch(shape, hf_config.get_text_config().vocab_size).to(device)
    tracker = MemoryTracker(inline=ops.BODIES)
    # Built on the meta device, then given fake CPU storage: peft's adapter moves cannot swap
    # parameters created under FakeTensorMode (it keeps weak references to them).
    with torch.device("meta") if fake else device:
        model = build_model(hf_config, config)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with _cuda_paths(cuda), _reward_loss(fake), mode:
        if fake:
            _fake_storage(model)
        stored = {id(m.weight): m.stored_bytes for m in model.modules() if hasattr(m, "stored_bytes")}
        for p in model.parameters():
            tracker.track(p, "weights", stored.get(id(p)))
        for b in model.buffers():
            tracker.track(b, "weights")
        params = [p for p in model.parameters() if p.requires_grad]
        # before the optimizer's: --optim-in-backward's hooks free each gradient they step
        hooks = watch_gradients(tracker, params)
        optimizer = _optimizer(model, config, fake, cuda)
        offloaded = isinstance(optimizer, OffloadOptimizer)
        host = _on_host(tracker, optimizer) if offloaded else contextlib.nullcontext()
        try:
            with tracker, host:  # two steps: from the second on, the optimizer state lives through the
                for _ in range(2):  # forward and backward (the first creates it in its update)
                    _step(model, [batch] * min(config.grad_accum, 2), config, tracker, params, optimizer,
                          device.type)  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
    report = tracker.report()
    report.trainable_params = sum(p.numel() for p in params)
    return report


@contextlib.contextmanager
def _on_host(tracker: MemoryTracker, optimizer: OffloadOptimizer) -> Iterator[None]:
    """--offload-optimizer: its master copies, the gradients it moves and its step are host memory."""
    for t in optimizer.host_tensors():
        tracker.track(t, "host weights")

    def on_host(method: Any, category: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with tracker.on_host(category):
                return method(*args, **kwargs)

        return run

    with (
        mock.patch.object(optimizer, "to_host", on_host(optimizer.to_host, "gradients")),
        mock.patch.object(optimizer, "clip_grad_norm_", on_host(optimizer.clip_grad_norm_, "optimizer")),
        mock.patch.object(optimizer, "step_param", on_host(optimizer.step_param, "optimizer")),
    ):
        yield


def _step(model, batches, config, tracker, params, optimizer, device_type: str = "cpu") -> None:
    """train.py's step on fake tensors: its forward_backward (the objective's forward and backward
    for each micro-batch), clipping, the optimizer step, or with --optim-in-backward its
    backward_step (one or two passes, the updates inside the backward); without the host reads of
    loss values and ranking metrics, which fake tensors do not have."""
    objective = build_objective(config)

    def forward(*args: Any, **kwargs: Any) -> Any:
        tracker.phase = "forward"
        return objective(*args, **kwargs)

    backward = torch.Tensor.backward

    def tracked_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        tracker.phase = "backward"
        backward(self, *args, **kwargs)

    autocast = training_autocast(device_type)
    no_metrics = classmethod(lambda cls, names, *_: cls.zeros(names))
    with (
        mock.patch.object(Metrics, "of_batch", no_metrics),
        mock.patch.object(torch.Tensor, "backward", tracked_backward),
        mock.patch.object(reward, "pooled_rows", _on_the_host(reward.pooled_rows)),
    ):
        if isinstance(optimizer, InBackwardOptimizer):
            with mock.patch.object(optimizer, "step_param", _in_phase(tracker, optimizer.step_param)):
                backward_step(optimizer, lambda: forward_backward(model, forward, batches, autocast),
                              params, config.max_grad_norm)  # fmt: skip
        else:  # backward_step's own, without its read of the norm's value
            forward_backward(model, forward, batches, autocast)
            tracker.phase = "clip"
            if isinstance(optimizer, OffloadOptimizer):
                optimizer.clip_grad_norm_(config.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
    tracker.phase = "optimizer"
    optimizer.step()  # after an update in backward: no gradient is left, nothing happens
    optimizer.zero_grad(set_to_none=True)


def _on_the_host(pooled_rows: Any) -> Any:
    """train-rm's pooling reads the batch's token ids on the host (real tensors, never fake ones)."""

    def rows(*args: Any, **kwargs: Any) -> torch.Tensor:
        with unset_fake_temporarily():
            return pooled_rows(*args, **kwargs)

    return rows


def _in_phase(tracker: MemoryTracker, step_param: Any) -> Any:
    """One parameter's update during the backward, its allocations counted as the optimizer's."""

    def step(slot: Any) -> None:
        phase, tracker.phase = tracker.phase, "optimizer in backward"
        try:
            step_param(slot)
        finally:
            tracker.phase = phase

    return step


def build_model(hf_config: Any, config: TrainConfig) -> torch.nn.Module:
    """The model as `load_model` would return it, from the config alone; for --load-in-4bit/8bit,
    the decoder linears stay in bf16 here but run as bitsandbytes' layers, and their attribute
    `stored_bytes` says what their weight takes as bitsandbytes stores it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quant = config.load_in_4bit or config.load_in_8bit
    dtype = torch.bfloat16 if quant else weight_dtype(config.dtype)
    task = "SEQ_CLS" if config.loss == "rm" else "CAUSAL_LM"
    if task == "SEQ_CLS":  # train-rm's model: the backbone and a one-label score head, no lm_head
        hf_config = copy.deepcopy(hf_config)
        hf_config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if quant:
        _as_quantized(model, config)
        config = dataclasses.replace(config, load_in_4bit=False, load_in_8bit=False)
    return prepare_model(finish_model(model, config, task))


def _fake_storage(model: torch.nn.Module) -> None:
    """Meta parameters and buffers become fake CPU tensors; tied weights stay one tensor (to_empty
    would untie them: it makes a new Parameter per module)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                fresh = torch.empty_like(p, device="cpu")
                made[id(p)] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)
            setattr(module, name, made[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                made.setdefault(id(b), torch.empty_like(b, device="cpu"))
                module._buffers[name] = made[id(b)]


def _as_quantized(model: torch.nn.Module, config: TrainConfig) -> None:
    """What transformers' bitsandbytes loading plus peft's prepare_model_for_kbit_training leave:
    every decoder linear quantised and frozen, everything else (norms, embeddings, lm_head) fp32."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for m in linears:
        out_f, in_f = m.weight.shape
        four = config.load_in_4bit
        m.stored_bytes = plan_cuda.nf4_bytes(out_f * in_f) if four else plan_cuda.int8_bytes(out_f, in_f)
        m.forward = plan_cuda.quantized_linear_forward(m)
    kept = {id(m.weight) for m in linears}
    for p in model.parameters():
        p.requires_grad_(False)
        if id(p) not in kept and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def _optimizer(model, config, fake: bool, cuda: bool) -> torch.optim.Optimizer:
    """make_optimizer's, with bitsandbytes' 8-bit AdamW (CUDA kernels) replaced on fake tensors by
    PlannedAdamW8bit: one over all parameters, or with --optim-in-backward / --bf16-update
    stochastic|kahan one per parameter, as build_optimizer makes them."""
    planned = config.optim in ("adamw8bit", "paged-adamw8bit") and fake
    build = optim._build

    def planned_build(name: str, groups: list[dict[str, Any]], lr: float, *rest: Any) -> Any:
        return plan_cuda.PlannedAdamW8bit(groups, lr=lr) if planned else build(name, groups, lr, *rest)

    with mock.patch.object(optim, "_build", planned_build):
        optimizer = make_optimizer(model, config)
    if isinstance(optimizer, InBackwardOptimizer) and fake:
        optimizer.assume_finite = True  # fake tensors have no values to check
    if cuda and not planned:  # on CUDA tensors torch's AdamW defaults to its foreach path
        for group in optimizer.param_groups:
            if group.get("foreach") is None and not group.get("fused"):
                group["foreach"] = True
    return optimizer


def with_layers(hf_config: Any, layers: int | None) -> Any:
    """A copy of the config with only its first `layers` decoder layers (None: unchanged)."""
    if layers is None:
        return hf_config
    cfg = copy.deepcopy(hf_config)
    text = cfg.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:layers]
    return cfg


@contextlib.contextmanager
def _reward_loss(fake: bool) -> Iterator[None]:
    """train-rm's loss selects pairs with boolean masks, whose sizes fake tensors cannot know: on
    them a Bradley-Terry loss over every pair stands in ([R, R] for the R responses of a micro-batch,
    at most a few MiB: nothing next to the model)."""
    if not fake:
        yield
        return

    def every_pair(rewards: torch.Tensor, *args: Any, **kwargs: Any) -> reward_objective.RewardLossOutput:
        r = rewards.float()
        loss = -torch.nn.functional.logsigmoid(r[:, None] - r[None, :]).mean()
        zero = r.new_zeros(())
        return reward_objective.RewardLossOutput(loss, loss, zero, zero)

    with mock.patch.object(reward_objective, "reward_loss", every_pair):
        yield


@contextlib.contextmanager
def _cuda_paths(cuda: bool) -> Iterator[None]:
    """On CUDA, attention is flash-attn's varlen (auto, varlen; flex: the same memory pattern, out
    and an fp32 LSE) and the kernels are the Triton ones (here their fake kernels: nothing runs)."""
    if not cuda:
        yield
        return

    def backend(attn: str, device: torch.device, softcap: bool = False) -> str:
        return "dense" if attn == "dense" else "varlen"

    with (
        mock.patch.object(attention, "resolve_backend", backend),
        mock.patch.object(attention, "varlen_reference", plan_cuda.flash_varlen),
        mock.patch.object(kernel_utils, "interpreting", lambda: True),
    ):
        yield


# ---------------------------------------------------------------------------------------------
# a few layers, extrapolated


def num_layers(hf_config: Any) -> int:
    return int(hf_config.get_text_config().num_hidden_layers)


def plan_step(
    hf_config: Any, config: TrainConfig, shape: BatchShape, *, sample_layers: int = 2, **how: Any
) -> MemoryReport:
    """The step's memory, from `sample_layers` and 2 * `sample_layers` decoder layers simulated and
    a straight line through them (decoder layers are identical: every per-layer term, weights,
    gradients, states, saved activations, grows linearly); the whole model when it is that small.
    `how`: simulate's fake / cuda."""
    total = num_layers(hf_config)
    if total <= 2 * sample_layers:
        return simulate(hf_config, config, shape, **how)
    a = simulate(hf_config, config, shape, layers=sample_layers, **how)
    b = simulate(hf_config, config, shape, layers=2 * sample_layers, **how)
    scale = (total - 2 * sample_layers) / sample_layers

    def line(x: int, y: int) -> int:
        return int(round(y + (y - x) * scale))

    # Each phase's peak on its own line: phases grow at different rates per layer (the forward
    # keeps autocast's bf16 copy of every fp32 weight, the backward does not), so the phase that
    # peaks with 2 and 4 layers need not be the one that peaks with all of them.
    phases = {ph: line(a.phase_peaks[ph][0], b.phase_peaks[ph][0])
              for ph in a.phase_peaks.keys() & b.phase_peaks.keys()}  # fmt: skip
    phase = max(phases, key=phases.__getitem__)
    return MemoryReport(
        peak_bytes=phases[phase],
        peak_phase=phase,
        by_category={c: line(a.by_category[c], b.by_category[c]) for c in CATEGORIES},
        at_peak={c: line(a.phase_peaks[phase][1][c], b.phase_peaks[phase][1][c]) for c in CATEGORIES},
        phase_peaks={ph: (phases[ph], {}) for ph in phases},
        host_peak_bytes=line(a.host_peak_bytes, b.host_peak_bytes),
        host_by_category={
            c: line(a.host_by_category.get(c, 0), b.host_by_category.get(c, 0))
            for c in a.host_by_category.keys() | b.host_by_category.keys()
        },  # fmt: skip
        trainable_params=line(a.trainable_params, b.trainable_params),
    )
