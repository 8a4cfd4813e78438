"""--offload-optimizer: the host step equals the ordinary one on the CPU, bitwise (fp32: the same
AdamW arithmetic per tensor, the same clipping), gradients leave the device in the backward, and a
resumed run with offloaded states is exact."""

import dataclasses

import pytest
import torch
from test_ops import launches_unseen  # noqa: F401 (fixture)
from training_runs import config, write_data

import rrhf_fast.objectives.base as objective_base
from rrhf_fast.checkpointing.checkpoint import latest_checkpoint
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.optimizers.offload import OffloadOptimizer
from rrhf_fast.optimizers.optim import build_optimizer
from rrhf_fast.training.train import train

TORCH_THREADS = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kw", [dict(), dict(grad_accum=2, micro_batch_tokens=64)], ids=["one", "accum-2"])
def test_offloaded_step_is_the_ordinary_one_bitwise(tmp_path, model_dir, kw):
    data = write_data(tmp_path / "d.jsonl")
    base = config(tmp_path, model_dir, data, max_steps=3, lr=1e-3, max_grad_norm=0.5, **kw)
    plain = train(base)
    offloaded = train(dataclasses.replace(base, output_dir=str(tmp_path / "off"), offload_optimizer=True))
    assert (
        plain.last["loss"] == offloaded.last["loss"]
        and plain.last["grad_norm"] == offloaded.last["grad_norm"]
    )
    a, b = weights(plain.model), weights(offloaded.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradients_leave_the_device_in_backward():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-2, offload=True)
    assert isinstance(opt, OffloadOptimizer)
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(model[1].weight.grad))  # after layer 1's hook
    model(torch.randn(4, 8)).sum().backward()
    assert seen == [None]  # layer 1's gradient had already left when layer 0's was computed
    assert all(p.grad is None for p in model.parameters())
    assert all(h.grad is not None and h.grad.dtype == torch.float32 for h in opt.host_tensors())


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_resume_with_offloaded_states_is_exact(tmp_path, model_dir, dtype, monkeypatch):
    """Four steps straight vs stopped (Ctrl-C) in step 3 after the step-2 checkpoint, then --resume;
    bf16 weights: the fp32 masters are in the checkpoint, so the resumed run continues from them,
    not from their bf16 rounding."""
    data = write_data(tmp_path / "d.jsonl")
    base = config(tmp_path, model_dir, data, max_steps=4, lr=1e-3, offload_optimizer=True, dtype=dtype,
                  save_every=2, queries_per_step=2)  # fmt: skip
    straight = train(base)
    cut = dataclasses.replace(base, output_dir=str(tmp_path / "cut"))
    real, calls = objective_base.packed_logprobs, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(objective_base, "packed_logprobs", forward)
        with pytest.raises(KeyboardInterrupt):
            train(cut)
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    resumed = train(dataclasses.replace(cut, resume=True))
    a, b = weights(straight.model), weights(resumed.model)
    assert resumed.step == 4 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(), id="fp32"),
        pytest.param(
            dict(dtype="bfloat16", gradient_checkpointing=True), id="bf16-ckpt", marks=pytest.mark.slow
        ),
    ],
)
def test_planned_gpu_and_host_peaks_are_the_real_steps(launches_unseen, kw):  # noqa: F811
    """Plan (fake tensors, 2 and 4 layers extrapolated to 6) vs the live bytes of a real CPU step,
    the device's and the host's counted apart: both within 5%; the host holds an fp32 master and an
    fp32 gradient of every weight (4 + 4 bytes) and AdamW's two fp32 moments (8)."""
    from rrhf_fast.config import TrainConfig
    from rrhf_fast.models.tiny import tiny_config
    from rrhf_fast.planning.simulate import batch_shape, plan_step, simulate

    hf = tiny_config("llama", num_layers=6, hidden_size=128, num_heads=4, num_kv_heads=2)
    config = TrainConfig(model="-", data="-", output_dir="-", optim="adamw", attn="dense", kernels="triton",
                         offload_optimizer=True, **kw)  # fmt: skip
    shape = batch_shape(64)
    real = simulate(hf, config, shape, fake=False, cuda=False)
    planned = plan_step(hf, config, shape, cuda=False)
    n = real.trainable_params
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    assert planned.host_peak_bytes == pytest.approx(real.host_peak_bytes, rel=0.05)
    assert real.host_by_category["weights"] == real.host_by_category["gradients"] == 4 * n
    assert 8 * n <= real.host_by_category["optimizer"] < 9 * n
    assert real.by_category["optimizer"] == 0  # nothing of the optimizer on the device
    assert real.by_category["gradients"] < 0.2 * real.by_category["weights"]  # one tensor's at a time


def test_offloaded_adamw8bit_is_the_ordinary_one_bitwise():
    """bitsandbytes' 8-bit AdamW on the host copies: the same blockwise arithmetic per tensor as one
    optimizer over all of them (a small MLP, three steps with clipping)."""
    pytest.importorskip("bitsandbytes")

    def run(offload):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
        opt = build_optimizer(model.named_parameters(), "adamw8bit", lr=1e-2, offload=offload)
        for step in range(3):
            x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            if offload:
                opt.clip_grad_norm_(0.5)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return weights(model)

    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)
