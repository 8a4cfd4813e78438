"""LoRA / QLoRA through peft: only adapter weights train, the base stays bitwise, the lm_head stays a
plain weight for the fused kernel, checkpoints hold the adapter and resume bit for bit.

bitsandbytes 0.50 quantises to 4 and 8 bits on a CPU too, so the quantised paths run here on tiny
models (where its CPU backend is missing they skip); the CUDA flavour (bf16 autocast) is marked gpu.
"""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from training_runs import config as train_config
from training_runs import write_data

import rrhf_fast.objectives.base as objective_base
from rrhf_fast.checkpointing.checkpoint import latest_checkpoint
from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import finish_model, load_model
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "d.jsonl")


def config(tmp_path, model_dir, data, name="run", **overrides):
    lora = dict(lora_r=4, lora_alpha=8.0, queries_per_step=4, max_steps=4)
    return train_config(tmp_path, model_dir, data, name, **{**lora, **overrides})


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_weights(model):
    """The frozen base model's weights, by their transformers names."""
    base = model.get_base_model()
    return {n: p.detach().clone() for n, p in base.named_parameters() if "lora_" not in n}


def bnb_cpu(bits):
    """Skip only where this bitsandbytes has no CPU backend (older releases: no
    `bitsandbytes.backends.cpu`); where it has one, quantising to `bits` on a CPU must work, and any
    failure of it fails the test."""
    bnb = pytest.importorskip("bitsandbytes")
    if importlib.util.find_spec("bitsandbytes.backends.cpu") is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU backend")
    layer = (
        bnb.nn.Linear4bit(64, 64) if bits == 4 else bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    ).to("cpu")
    layer(torch.randn(2, 64, dtype=torch.bfloat16 if bits == 4 else torch.float16))


# -------------------------------------------------------------------------------------------------
# training: adapters only


@pytest.mark.parametrize("bits", [pytest.param(None, id="lora-fp32"), pytest.param(4, id="qlora-nf4"),
                                  pytest.param(8, id="lora-int8")])  # fmt: skip
def test_only_the_adapter_trains_and_the_loss_falls(tmp_path, model_dir, data, bits):
    if bits:
        bnb_cpu(bits)
    quant = {4: dict(load_in_4bit=True), 8: dict(load_in_8bit=True)}.get(bits, {})
    cfg = config(tmp_path, model_dir, data, queries_per_step=8, max_steps=6, **quant)
    before = base_weights(load_model(cfg, torch.device("cpu")))
    result = train(cfg)

    after = base_weights(result.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B on q, k, v, o, gate, up, down of both layers: all-linear
    head = result.model.get_base_model().lm_head
    assert type(head) is torch.nn.Linear and head.weight.is_floating_point()
    if bits:
        q_proj = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert type(q_proj).__module__.startswith("bitsandbytes") and not q_proj.weight.is_floating_point()

    saved = result.checkpoint
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    adapter = load_file(saved / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter) and any(
        v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k
    )
    curve = losses(tmp_path / "run")  # the same 8 queries every step
    assert curve[-1] < curve[0] - 0.05, curve


def test_lora_resume_is_bitwise(tmp_path, model_dir, data, monkeypatch):
    """Killed in the middle of step 4, resumed from checkpoint-3: the adapter and the optimizer
    equal the uninterrupted run's exactly (dropout on, so the restored RNGs matter)."""
    kw = dict(max_steps=6, queries_per_step=3, lora_dropout=0.1, optim="adamw8bit", warmup_steps=2)
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))
    cfg = config(tmp_path, model_dir, data, "killed", save_every=3, **kw)
    real, calls = objective_base.packed_logprobs, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(objective_base, "packed_logprobs", forward)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint-3"
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))

    a, b = (load_file(r.checkpoint / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (torch.load(r.checkpoint / "optimizer.pt", weights_only=True) for r in (whole, resumed))
    assert str(opt_a) == str(opt_b)
    assert losses(tmp_path / "whole") == losses(tmp_path / "killed")


def test_resuming_a_lora_run_without_lora_is_a_user_error(tmp_path, model_dir, data):
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    train(cfg)
    with pytest.raises(UserError, match="holds a LoRA adapter but this run trains the full model"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True, "max_steps": 2, "lora_r": 0}))


# -------------------------------------------------------------------------------------------------
# the lm_head must stay a plain, unquantised weight


def test_lora_on_lm_head_is_refused_by_the_flags():
    with pytest.raises(UserError, match="fused log-prob kernel .* would miss its adapter"):
        TrainConfig(
            model="m", data="d", output_dir="o", lora_r=4, lora_target_modules="q_proj,lm_head"
        ).validate()


def test_lora_on_lm_head_is_refused_after_loading():
    """Whatever the flags, a peft layer in place of the lm_head is caught once the adapters are in."""
    from rrhf_fast.models.tiny import build_tiny_model

    flags = SimpleNamespace(model="tiny", lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                            lora_target_modules="lm_head", gradient_checkpointing=False)  # fmt: skip
    with pytest.raises(UserError, match="puts an adapter on the lm_head"):
        finish_model(build_tiny_model("llama"), flags)


def test_quantised_lm_head_is_refused(model_dir):
    bnb_cpu(4)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # An explicit skip list replaces transformers' default one, which protects the lm_head.
    quant = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["nothing"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"})
    assert not model.lm_head.weight.is_floating_point()
    flags = SimpleNamespace(model=str(model_dir), lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                            lora_target_modules="all-linear", gradient_checkpointing=False)  # fmt: skip
    with pytest.raises(UserError, match="needs it unquantised"):
        finish_model(model, flags)


@pytest.mark.parametrize(
    "flags, problem",
    [
        pytest.param(dict(load_in_8bit=True), "--load-in-8bit trains adapters", id="8bit-without-lora"),
        pytest.param(
            dict(lora_r=4, load_in_4bit=True, load_in_8bit=True), "exclude each other", id="4-and-8"
        ),
        pytest.param(dict(lora_r=4, lora_dropout=1.0), "--lora-dropout must be in", id="dropout-1"),
        pytest.param(dict(lora_r=4, lora_alpha=0.0), "--lora-alpha must be positive", id="alpha-0"),
        pytest.param(dict(lora_r=4, lora_target_modules="q_proj,,v_proj"), "empty name", id="empty-target"),
        pytest.param(dict(lora_r=4, load_in_4bit=True, fsdp=True), "train QLoRA with DDP", id="fsdp-4bit"),
    ],
)
def test_flag_combinations(flags, problem):
    with pytest.raises(UserError, match=problem):
        TrainConfig(model="m", data="d", output_dir="o", **flags).validate()


def test_unknown_target_module_is_a_user_error(tmp_path, model_dir, data):
    with pytest.raises(UserError, match="--lora-target-modules no_such_proj"):
        train(config(tmp_path, model_dir, data, lora_target_modules="no_such_proj"))


# -------------------------------------------------------------------------------------------------
# CUDA: the QLoRA recipe as it runs on a GPU (bf16 compute under autocast)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [dict(load_in_4bit=True), dict(load_in_8bit=True)], ids=["nf4", "int8"])
def test_quantised_lora_on_cuda(tmp_path, model_dir, data, quant):
    pytest.importorskip("bitsandbytes")  # absent on the GPU machine unless its wheel is carried
    cfg = config(tmp_path, model_dir, data, device="cuda", queries_per_step=8, max_steps=6,
                 gradient_checkpointing=True, **quant)  # fmt: skip
    before = base_weights(load_model(cfg, torch.device("cuda")))
    result = train(cfg)
    after = base_weights(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if "load_in_4bit" in quant else "Linear8bitLt")
    if "load_in_4bit" in quant:
        assert layer.weight.quant_state.quant_type == "nf4" and layer.compute_dtype == torch.bfloat16
        assert layer.weight.quant_state.nested  # double quantisation
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.05, curve
