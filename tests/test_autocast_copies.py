"""bf16 autocast without its weight cache (setup.training_autocast): the same numbers, bitwise, as
torch's default autocast on the CPU, and each layer's bf16 weight copies freed after the layer
(made again in the checkpoint recompute) instead of held until the forward ends."""

import dataclasses

import pytest
import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.models.tiny import tiny_config
from rrhf_fast.planning import simulate as simulate_module
from rrhf_fast.planning.simulate import batch_shape, build_model, plan_step, simulate
from rrhf_fast.training.setup import training_autocast

TORCH_THREADS = 1


def flags(**kw):
    base = dict(model="-", data="-", output_dir="-", optim="adamw", attn="dense", kernels="torch")
    return TrainConfig(**{**base, **kw})


def grads_and_loss(model, ids, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_uncached_autocast_is_bitwise_torchs(checkpointing):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = tiny_config("llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=101)
    model = AutoModelForCausalLM.from_config(hf)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 101, (2, 37))
    cached = grads_and_loss(model, ids, torch.autocast("cpu", dtype=torch.bfloat16))
    uncached = grads_and_loss(model, ids, training_autocast("cpu"))
    assert torch.equal(cached[0], uncached[0])
    for name, grad in cached[1].items():
        assert torch.equal(grad, uncached[1][name]), name


def _copies_of(hf, config, cache):
    """A real CPU step's weight_copies bytes (largest over the step), autocast cached or not."""

    def autocast(device_type):
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulate_module, "training_autocast", autocast)
        return simulate(hf, config, batch_shape(64), fake=False, cuda=False).by_category["weight_copies"]


def test_copies_are_one_layers_under_checkpointing():
    """Measured on a real CPU step (4 layers, fp32 weights, checkpointing): torch's cache holds the
    bf16 copy of every decoder linear; without it at most about one layer's copies are alive."""
    hf = tiny_config("llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=64)
    config = flags(gradient_checkpointing=True, optim_in_backward=True, max_grad_norm=0.0)
    layer = sum(m.weight.numel() for m in build_model(hf, config).base_model.layers[0].modules()
                if isinstance(m, torch.nn.Linear))  # fmt: skip
    cached, uncached = _copies_of(hf, config, True), _copies_of(hf, config, False)
    head = 2 * 64 * 128  # the lm_head's bf16 copy on the torch log-prob path (vocabulary 64)
    assert 4 * 2 * layer <= cached <= 4 * 2 * layer + head
    assert 2 * layer * 0.2 < uncached <= 2 * layer + head
    planned = plan_step(hf, dataclasses.replace(config, attn="auto", kernels="auto"), batch_shape(64))
    assert planned.by_category["weight_copies"] == pytest.approx(uncached, rel=0.01)
    plain = dataclasses.replace(config, gradient_checkpointing=False)  # autograd keeps them for backward
    assert _copies_of(hf, plain, False) == pytest.approx(cached, rel=0.01)
