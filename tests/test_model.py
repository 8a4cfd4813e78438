"""rrhf_fast.models.logprobs: one packed shared-prompt batch == each (prompt, response) run alone.

The flash-linear-attention varlen test, for the tiny llama / qwen2 / mistral / gemma2 models: log-
probs and parameter gradients from ONE packed batch equal those of every `prompt + response` run
alone through an unpatched copy of the model (standard forward, logits, log_softmax, gather).
"""

import copy

import pytest
import torch

from rrhf_fast.data.packing import pack, tokenize_example
from rrhf_fast.data.records import Example
from rrhf_fast.errors import ModelError
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.models import attention
from rrhf_fast.models.logprobs import _LOGIT_FACTORS, check_logit_parity, packed_logprobs, prepare_model
from rrhf_fast.models.tiny import ARCHS, SCALED_LOGIT_ARCHS, build_tiny_model, build_tokenizer

TOK = build_tokenizer()
# Three queries with different prompt lengths and k = 3 or 4 ragged responses.
EXAMPLES = [
    Example("Name a colour.", ["red", "a deep shade of blue", "green!", "?"], [1.0, 3.0, 2.0, 0.0]),
    Example("2+2=", ["4", "four, I think", "5"], [1.0, 0.5, -1.0]),
    Example("Translate 'chat' into English, please", ["cat", "It means cat.", "chat"], [2.0, 1.0, 0.0]),
]


def reference_logprobs(model, examples, **tokenize_kwargs):
    """Per response: prompt + response alone through the plain model -> log-probs of the response."""
    device, out = model.device, []
    for ex in examples:
        t = tokenize_example(ex, TOK, **tokenize_kwargs)
        for resp in t.response_ids:
            ids = torch.tensor([t.prompt_ids + resp], device=device)
            logits = model(input_ids=ids).logits[0, len(t.prompt_ids) - 1 : -1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(resp, device=device)[:, None])[:, 0])
    return torch.cat(out)


def weighted_loss(logp):
    """Non-uniform per-token weights, so that a gradient routed to the wrong token shows."""
    return (logp * torch.linspace(-1.0, 2.0, logp.numel())).sum()


def compare(arch, attn="dense", checkpointing=False, examples=EXAMPLES, **overrides):
    model = build_tiny_model(arch, seed=1, **overrides)
    reference = copy.deepcopy(model)
    prepare_model(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode
    batch = pack(examples, TOK)
    logp = packed_logprobs(model, batch, attn=attn, impl="torch")
    expected = reference_logprobs(reference, examples)
    assert logp.dtype == torch.float32 and logp.shape == expected.shape == (batch.targets.numel(),)
    assert (logp - expected).abs().max().item() <= 1e-5
    weighted_loss(logp).backward()
    weighted_loss(expected).backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    return model


SLOW = pytest.mark.slow
MATRIX = [
    pytest.param(arch, attn, ckpt, id=f"{arch}-{attn}-{'ckpt' if ckpt else 'no-ckpt'}", marks=marks)
    for arch in ARCHS
    for attn, ckpt, marks in [
        ("dense", False, ()),
        ("dense", True, ()),
        ("varlen", False, ()),
        ("varlen", True, SLOW),
    ]
]


@pytest.mark.parametrize("arch, attn, checkpointing", MATRIX)
def test_packed_equals_each_response_alone(arch, attn, checkpointing):
    # attn="varlen" on the CPU runs the pure-torch emulation of the varlen kernels on the gathered
    # [prompt; response] keys: this proves cu_seqlens / kv_index end to end.
    compare(arch, attn, checkpointing)


@pytest.mark.parametrize("arch", SCALED_LOGIT_ARCHS)
def test_architectures_that_scale_their_logits(arch):
    # Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling.
    compare(arch)


@pytest.mark.parametrize("arch", ARCHS + SCALED_LOGIT_ARCHS)
def test_logit_parity_probe_passes_supported_models(arch):
    model = prepare_model(build_tiny_model(arch, seed=4))
    assert check_logit_parity(model) < 1e-5
    assert check_logit_parity(model.to(torch.bfloat16)) < 0.05


def test_logit_parity_probe_catches_an_unknown_logit_transform(monkeypatch):
    model = prepare_model(build_tiny_model("granite", seed=4))
    monkeypatch.delitem(_LOGIT_FACTORS, "granite")  # as if rrhf-fast did not know the architecture
    with pytest.raises(ModelError, match="transforms the logits"):
        check_logit_parity(model)


def test_logit_parity_probe_refuses_recurrent_hybrids():
    # Jamba's Mamba layers carry state along the row: a response would see the one before it.
    from transformers import AutoModelForCausalLM, JambaConfig

    config = JambaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = prepare_model(AutoModelForCausalLM.from_config(config))
    with pytest.raises(ModelError, match="carry state along the sequence"):
        check_logit_parity(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_triton_kernels_inside_the_model_path(arch):
    """The fused Triton token_logprobs (soft-capped for Gemma 2) and rrhf_loss, in the real model
    path, equal the torch references: values and parameter gradients (interpreter on CPU)."""
    model = prepare_model(build_tiny_model(arch, seed=5))
    batch = pack(EXAMPLES, TOK)
    results = []
    for impl in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        logp = packed_logprobs(model, batch, attn="dense", impl=impl)
        out = rrhf_loss(logp, batch.token_response, batch.response_query, batch.ranks,
                        prompt_len=batch.prompt_len, impl=impl)  # fmt: skip
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logp.detach(), out.loss.detach(), grads))
    (logp_t, loss_t, grads_t), (logp_k, loss_k, grads_k) = results
    torch.testing.assert_close(logp_k, logp_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_k, loss_t, rtol=0, atol=1e-6)
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_k[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tied_embeddings():
    model = compare("llama", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_the_sequences(arch):
    # Logical positions, not row indices, decide the window: a response starts at P, not at its row.
    compare(arch, sliding_window=4)


FAST_AND_SLOW = ["llama", "gemma2", pytest.param("qwen2", marks=SLOW), pytest.param("mistral", marks=SLOW)]


@pytest.mark.parametrize("arch", FAST_AND_SLOW)
def test_dense_and_flex_forward_agree_on_cpu(arch):
    model = prepare_model(build_tiny_model(arch, seed=2))
    batch = pack(EXAMPLES, TOK)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        dense = packed_logprobs(model, batch, attn="dense", impl="torch")
        flex = packed_logprobs(model, batch, attn="flex", impl="torch")
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", FAST_AND_SLOW)
def test_prepared_model_still_runs_ordinary_batches(arch):
    """Without packing metadata the attention is causal: left-padded batches and generate() agree."""
    model = build_tiny_model(arch, seed=3)
    reference = copy.deepcopy(model)
    prepare_model(model)
    prepare_model(model)  # idempotent
    tok = build_tokenizer()
    tok.padding_side = "left"
    inputs = tok(["a short one", "a somewhat longer prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, expected = model(**inputs).logits, reference(**inputs).logits
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_no_attention_mask_is_built_for_packed_batches(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a [T, T] mask was requested during a packed forward")

    monkeypatch.setattr(attention, "sdpa_mask", fail)
    model = prepare_model(build_tiny_model("mistral"))
    packed_logprobs(model, pack(EXAMPLES, TOK), attn="varlen", impl="torch")


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = build_tiny_model("llama", seed=4)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    reference = copy.deepcopy(model)
    logp = packed_logprobs(prepare_model(model), pack(EXAMPLES, TOK), attn="dense", impl="torch")
    with torch.no_grad():
        expected = reference_logprobs(reference, EXAMPLES)
    assert (logp - expected).abs().max().item() <= 1e-5
    weighted_loss(logp).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_chat_template_and_truncation_follow_the_packing():
    model = prepare_model(build_tiny_model("qwen2", seed=5))
    kwargs = dict(max_prompt_len=26, max_response_len=4, chat_template=True)  # 23 template tokens
    with torch.no_grad():
        logp = packed_logprobs(model, pack(EXAMPLES, TOK, **kwargs), attn="dense", impl="torch")
        reference = copy.deepcopy(model)
        reference.set_attn_implementation("sdpa")
        expected = reference_logprobs(reference, EXAMPLES, **kwargs)
    assert (logp - expected).abs().max().item() <= 1e-5


def test_lm_head_with_bias_is_refused():
    model = build_tiny_model("llama")
    model.lm_head = torch.nn.Linear(64, 259, bias=True)
    with pytest.raises(ValueError, match="bias"):
        packed_logprobs(model, pack(EXAMPLES[:1], TOK), attn="dense", impl="torch")


# ----------------------------------------------------------------------------------------------
# CUDA backends in bf16: max |packed - ref_fp64| <= 2 max |plain bf16 model - ref_fp64| + small (STYLE.md).


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["varlen", "flex"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_backends(arch, attn):
    if attn == "varlen" and arch == "gemma2" and not attention._has_flash_attn():
        pytest.skip("torch varlen has no soft-capping (attn='auto' picks flex for Gemma 2)")
    with torch.no_grad():
        model64 = build_tiny_model(arch, seed=6).to(torch.float64).cuda()
        expected = reference_logprobs(model64, EXAMPLES).double()
        plain = build_tiny_model(arch, seed=6).to(torch.bfloat16).cuda()
        base_err = (reference_logprobs(plain, EXAMPLES).double() - expected).abs().max().item()
    packed = prepare_model(plain)
    logp = packed_logprobs(packed, pack(EXAMPLES, TOK), attn=attn, impl="torch")
    assert (logp.double() - expected).abs().max().item() <= 2 * base_err + 1e-3
    weighted_loss(logp.cpu()).backward()  # the backward runs and is finite
    assert all(torch.isfinite(p.grad).all() for p in packed.parameters() if p.grad is not None)
