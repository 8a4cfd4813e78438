"""--optim-in-backward (optimizers.in_backward, optimizers.paramwise): the same weights as the ordinary step,
with and without clipping, exact resume, the non-finite guard, the refusals."""

import dataclasses
import logging
import math
import types

import pytest
import torch
from training_runs import config, metrics, write_data

import rrhf_fast.objectives.base as objective_base
from rrhf_fast.checkpointing.checkpoint import latest_checkpoint
from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.optimizers.in_backward import InBackwardOptimizer, backward_step, check_one_microbatch
from rrhf_fast.optimizers.optim import build_optimizer
from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer
from rrhf_fast.pipelines.demo import save_tiny_model
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -------------------------------------------------------------------------------------------------
# the trainer: in backward == the ordinary step (CPU, fp32, one micro-batch per step)


@pytest.mark.parametrize(
    "max_grad_norm, more",
    [
        pytest.param(0.0, {}, id="no-clip"),
        pytest.param(0.05, {}, id="clip"),
        pytest.param(0.05, dict(gradient_checkpointing=True), id="clip-checkpointing"),
    ],
)
def test_in_backward_gives_the_weights_of_the_ordinary_step(tmp_path, model_dir, max_grad_norm, more):
    data = write_data(tmp_path / "d.jsonl", 12)
    kw = dict(max_steps=4, queries_per_step=3, micro_batch_tokens=4096, max_grad_norm=max_grad_norm,
              weight_decay=0.1, warmup_steps=2, **more)  # fmt: skip
    plain = train(config(tmp_path, model_dir, data, "plain", **kw))
    inside = train(config(tmp_path, model_dir, data, "inside", optim_in_backward=True, **kw))
    a, b = weights(plain.model), weights(inside.model)
    # Bit for bit: on CPU torch's AdamW runs tensor by tensor anyway (no foreach kernels), and the
    # norm and clip coefficient are clip_grad_norm_'s own arithmetic in its order.
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [metrics(tmp_path / "plain"), metrics(tmp_path / "inside")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    norms = [[r["grad_norm"] for r in run] for run in rows]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    if max_grad_norm:
        assert min(norms[0]) > max_grad_norm  # every step was clipped


def _interrupt_at_forward(monkeypatch, n):
    real, calls = objective_base.packed_logprobs, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_base, "packed_logprobs", forward)


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_in_backward_resume_is_bitwise(tmp_path, model_dir, monkeypatch, optim):
    data = write_data(tmp_path / "d.jsonl", 10)
    kw = dict(max_steps=5, queries_per_step=4, micro_batch_tokens=4096, optim=optim, warmup_steps=2,
              optim_in_backward=True, max_grad_norm=0.05)  # fmt: skip
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))
    cfg = config(tmp_path, model_dir, data, "killed", save_every=2, **kw)
    with monkeypatch.context() as patch:
        _interrupt_at_forward(patch, 6)  # two passes a step: the second pass of step 3
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint-2"
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    a, b = weights(whole.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(whole.checkpoint / "optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed.checkpoint / "optimizer.pt", weights_only=True)
    assert str(opt_a) == str(opt_b)


def test_a_checkpoint_of_the_ordinary_optimizer_resumes_in_backward(tmp_path, model_dir, monkeypatch):
    """The saved state has one entry per parameter in build_optimizer's order either way."""
    data = write_data(tmp_path / "d.jsonl", 8)
    kw = dict(max_steps=4, queries_per_step=4, micro_batch_tokens=4096, max_grad_norm=0.05)
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))
    cfg = config(tmp_path, model_dir, data, "switched", save_every=2, **kw)
    with monkeypatch.context() as patch:
        _interrupt_at_forward(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True, "optim_in_backward": True}))
    assert max_diff(weights(whole.model), weights(resumed.model)) <= 1e-7


# -------------------------------------------------------------------------------------------------
# the optimizer alone: bitsandbytes, the non-finite guard


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 72))


def _run(model, x, poison=None):
    def run():
        hooks = []
        if poison is not None:  # the first layer's gradients alone become non-finite
            hooks = [p.register_hook(lambda g: g * poison) for p in model[0].parameters()]
        loss = model(x).square().mean()
        loss.backward()
        for hook in hooks:
            hook.remove()
        return types.SimpleNamespace(loss=loss.item())  # what the trainer's forward_backward returns

    return run


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_optimizer_in_backward_equals_one_optimizer_step(name, clip):
    a, b = _mlp(), _mlp()
    opt_a = build_optimizer(a.named_parameters(), name, lr=1e-2, weight_decay=0.1)
    opt_b = build_optimizer(b.named_parameters(), name, lr=1e-2, weight_decay=0.1, in_backward=True)
    assert isinstance(opt_b, InBackwardOptimizer)
    for seed in range(4):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
        norm_a = backward_step(opt_a, _run(a, x), list(a.parameters()), clip)[1]
        opt_a.step()
        opt_a.zero_grad()
        norm_b = backward_step(opt_b, _run(b, x), list(b.parameters()), clip)[1]
        assert all(p.grad is None for p in b.parameters())  # freed in the backward
        assert norm_a == pytest.approx(norm_b, rel=1e-6) and norm_a > clip
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_two_pass_guard_leaves_everything_untouched():
    model = _mlp()
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-2, in_backward=True)
    x = torch.randn(8, 64)
    backward_step(opt, _run(model, x), list(model.parameters()), 1.0)  # states exist
    before, state = weights(model), str(opt.state_dict())
    norm = backward_step(opt, _run(model, x, poison=float("nan")), list(model.parameters()), 1.0)[1]
    assert math.isnan(norm)
    assert (
        all(torch.equal(v, weights(model)[k]) for k, v in before.items()) and str(opt.state_dict()) == state
    )


def test_one_pass_guard_stops_at_the_first_non_finite_gradient(caplog):
    model = _mlp()
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-2, in_backward=True)
    before = weights(model)
    with caplog.at_level(logging.WARNING, logger="rrhf_fast.optimizers.in_backward"):
        norm = backward_step(opt, _run(model, torch.randn(8, 64), poison=float("nan")), [], 0.0)[1]
    assert math.isnan(norm)
    after = weights(model)
    # The backward reaches the last layer first: it was stepped, the poisoned first layer was not.
    assert not torch.equal(before["2.weight"], after["2.weight"])
    assert torch.equal(before["0.weight"], after["0.weight"]) and torch.equal(
        before["0.bias"], after["0.bias"]
    )
    assert all(torch.isfinite(v).all() for v in after.values())
    assert "after 2 of 4 parameters had been stepped" in caplog.text


def test_hooks_stand_idle_outside_a_step():
    model = _mlp()
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-2, in_backward=True)
    before = weights(model)
    model(torch.randn(2, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items())
    opt.step()  # an ordinary step still works (torch.distributed.checkpoint primes states this way)
    assert all(p.grad is not None for p in model.parameters()) and opt.state


def test_an_ordinary_optimizers_state_loads_paramwise():
    a = _mlp()
    ordinary = build_optimizer(a.named_parameters(), "adamw", lr=1e-2, weight_decay=0.1)
    a(torch.randn(4, 64)).sum().backward()
    ordinary.step()
    paramwise = build_optimizer(
        _mlp().named_parameters(), "adamw", lr=1e-2, weight_decay=0.1, in_backward=True
    )
    paramwise.load_state_dict(ordinary.state_dict())
    assert str(paramwise.state_dict()["state"]) == str(ordinary.state_dict()["state"])
    assert [g["weight_decay"] for g in paramwise.param_groups] == [0.1, 0.1, 0.0, 0.0]  # matrices first
    other = build_optimizer(torch.nn.Linear(3, 3).named_parameters(), "adamw", lr=1, in_backward=True)
    with pytest.raises(ValueError, match="the saved state has 4 parameters, this model trains 2"):
        other.load_state_dict(ordinary.state_dict())


# -------------------------------------------------------------------------------------------------
# refusals: one sentence each


def test_gradient_accumulation_is_refused(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 8)
    with pytest.raises(UserError, match=r"cannot accumulate --grad-accum 4 micro-batches on 1 proc") as err:
        train(config(tmp_path, model_dir, data, optim_in_backward=True, grad_accum=4))
    assert str(err.value).count(". ") == 0


def test_a_queries_per_step_plan_with_several_micro_batches_is_refused(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 8)
    cfg = config(tmp_path, model_dir, data, optim_in_backward=True, queries_per_step=8, micro_batch_tokens=40)
    with pytest.raises(UserError, match=r"step 1 of epoch 1 packs into \d+ micro-batches for 1 process"):
        train(cfg)


def test_one_micro_batch_per_process_passes_and_ddp_is_refused():
    steps = [[[2]], [[0], [1]]]
    qps = TrainConfig(model="m", data="d", output_dir="o", queries_per_step=2, fsdp=True)
    check_one_microbatch(qps, lambda e: steps, 2, world=2)
    check_one_microbatch(qps, lambda e: steps, 1, world=1)  # the step of 2 never runs
    with pytest.raises(UserError, match="step 2 of epoch 1 packs into 2 micro-batches for 1 process"):
        check_one_microbatch(qps, lambda e: steps, 2, world=1)
    with pytest.raises(UserError, match="needs --fsdp"):
        check_one_microbatch(dataclasses.replace(qps, fsdp=False), lambda e: steps, 2, world=2)
    accum = dataclasses.replace(qps, queries_per_step=None, grad_accum=2)
    check_one_microbatch(accum, lambda e: [[[0], [1]]], 1, world=2)  # one micro-batch per rank


@pytest.mark.parametrize(
    "flags, message",
    [
        pytest.param(dict(optim_in_backward=True, fsdp=True, max_grad_norm=0), "needs --max-grad-norm X",
                     id="fsdp-one-pass"),
        pytest.param(dict(bf16_update="stochastic"), "give --dtype bfloat16 without --lora-r", id="fp32"),
        pytest.param(dict(bf16_update="kahan", dtype="bfloat16", lora_r=4), "without --lora-r", id="lora"),
        pytest.param(dict(bf16_update="stochastic", dtype="bfloat16", fsdp=True), "not supported with --fsdp",
                     id="fsdp-bf16"),
    ],
)  # fmt: skip
def test_flag_combinations_refused(flags, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(model="m", data="d", output_dir="o", **flags).validate()


def test_paramwise_without_bf16_weights_is_the_ordinary_optimizer():
    a, b = _mlp(), _mlp()
    opt_a = build_optimizer(a.named_parameters(), "adamw", lr=1e-2)
    opt_b = build_optimizer(b.named_parameters(), "adamw", lr=1e-2, bf16_update="stochastic")
    assert isinstance(opt_b, ParamwiseOptimizer) and not isinstance(opt_b, InBackwardOptimizer)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(0))).sum().backward()
        opt.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["one-pass", "two-pass"])
def test_assume_finite_reads_no_value_and_updates_the_same(clip, monkeypatch):
    """What a memory simulation on fake tensors needs: no float() of a tensor anywhere in the step."""
    a, b = _mlp(), _mlp()
    opt_a = build_optimizer(a.named_parameters(), "adamw", lr=1e-2, in_backward=True)
    opt_b = build_optimizer(b.named_parameters(), "adamw", lr=1e-2, in_backward=True)
    opt_b.assume_finite = True
    x = torch.randn(8, 64)
    backward_step(opt_a, _run(a, x), [], clip)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("read a value"))
        norm = backward_step(opt_b, _run(b, x), [], clip)[1]
    assert math.isnan(norm)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
