"""The model path: a Hugging Face causal LM on a PackedBatch -> per-token log-probs [M] fp32.

The decoder runs without its lm_head; the final hidden states [T, D] and the lm_head weight go to
`rrhf_fast.kernels.token_logprobs`, which never materialises the [M, V] logits (docs/DESIGN.md §1, §6).
"""

from __future__ import annotations

from typing import Any

import torch

from rrhf_fast.data.packing import PackedBatch, TokenizedExample, pack_tokenized
from rrhf_fast.errors import ModelError
from rrhf_fast.kernels import token_logprobs
from rrhf_fast.models import attention
from rrhf_fast.models.wrapping import eval_mode, unwrap

# Architectures whose causal-LM head multiplies the logits by a constant from the config. The
# fused kernel applies the factor to the hidden states (logits are linear in them). The same
# field name means opposite things across families (Granite divides by `logits_scaling`,
# HyperCLOVA X multiplies), hence a table by model_type rather than by field.
_LOGIT_FACTORS = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda c: c.logit_scale),
    **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa"),
        lambda c: 1.0 / c.logits_scaling,
    ),
    "minicpm3": lambda c: 1.0 / c.logits_scaling,
    "hyperclovax": lambda c: c.logits_scaling,
    "falcon_h1": lambda c: c.lm_head_multiplier,
}


def prepare_model(model: Any) -> Any:
    """Switch the model's attention to "rrhf_shared_prompt", once and for good (idempotent).

    The function stays installed: with non-reentrant gradient checkpointing the layers are
    recomputed during backward and look their attention function up again. Without packing
    metadata it is ordinary causal attention, so the model still generates and evaluates.
    """
    base = unwrap(model)
    if base.config._attn_implementation != attention.NAME:
        base.set_attn_implementation(attention.NAME)
    if base.config._attn_implementation != attention.NAME:
        raise ModelError(
            f"{type(base).__name__} does not take a custom attention function "
            f"(its attention is {base.config._attn_implementation!r}); rrhf-fast cannot pack it"
        )
    return model


def packed_logprobs(
    model: Any, batch: PackedBatch, *, attn: str = "auto", impl: str = "auto"
) -> torch.Tensor:
    """log pi(target | prefix) of every response token of `batch`, in packed order: [M] fp32.

    `model` is a causal LM (or a peft model around one), or a `PackedLogprobs` (as DDP or FSDP2
    wrap it), whose forward this then goes through; `attn` picks the attention backend
    (auto | varlen | flex | dense), `impl` the token_logprobs kernel (auto | triton | torch).
    """
    if isinstance(model, PackedLogprobs) or isinstance(getattr(model, "module", None), PackedLogprobs):
        return model(batch, attn=attn, impl=impl)
    base = unwrap(model)
    prepare_model(base)
    head = _output_head(base)
    device = base.get_input_embeddings().weight.device
    batch = batch.to(device, non_blocking=True) if batch.input_ids.device != device else batch
    config = base.config.get_text_config()
    softcapped = getattr(config, "attn_logit_softcapping", None) is not None
    backend = attention.resolve_backend(attn, device, softcapped)
    meta = attention.SharedPromptMeta.from_batch(batch, backend, fallback="flex" if attn == "auto" else None)
    with attention.packed_forward():
        out = base.get_decoder()(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, sp_meta=meta
        )
    hidden = out.last_hidden_state[0]
    factor = logit_factor(config)
    if factor != 1.0:
        hidden = hidden * factor
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return token_logprobs(hidden, head.weight, batch.rows, batch.targets, softcap=softcap, impl=impl)


def logit_factor(config: Any) -> float:
    """The constant the architecture's head multiplies its logits by (1.0 for most)."""
    get = _LOGIT_FACTORS.get(getattr(config, "model_type", None))
    return 1.0 if get is None else float(get(config))


@torch.no_grad()
def check_logit_parity(model: Any, *, attn: str = "auto", impl: str = "auto") -> float:
    """Check that packed log-probs equal the model's own forward; return the largest gap (nats).

    Two probes go through `packed_logprobs` and, response by response, through the plain forward
    (logits, log_softmax, gather): a query with one response, which catches a logit transform the
    head applies and rrhf-fast does not (bound: 1e-3 nats in fp32, 0.25 in half precision, where
    two correct paths differ by rounding), and the same response placed after a longer one, which
    catches layers that carry state along the row (Mamba / SSM / convolution hybrids): there the
    response's gap must stay at the rounding level the first probe measured (plus a slack: the
    probes' rows have different lengths, so a deep model's matmuls round differently; SmolLM2-135M's
    30 layers in fp32 on one CPU thread: 0 alone, 1.5e-5 after). Under autocast (as the trainer runs
    it on CUDA) the half-precision bound applies.
    """
    base = unwrap(model)
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = [(7 * i + 3) % vocab for i in range(24)]
    prompt, first, probe = ids[:6], ids[6:18], ids[18:24]
    with eval_mode(base), torch.no_grad():
        alone = _probe_gap(base, prompt, [probe], attn, impl)
        after = _probe_gap(base, prompt, [first, probe], attn, impl)
    weight = base.get_output_embeddings().weight
    fp32 = weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)
    bound, slack = (1e-3, 1e-4) if fp32 else (0.25, 0.05)
    name = f"{type(base).__name__} ({base.config.model_type})"
    if not alone <= bound:
        raise ModelError(
            f"{name}: packed log-probs differ from the model's own forward by {alone:.3g} nats (bound "
            f"{bound}): its head transforms the logits in a way rrhf-fast does not reproduce"
        )
    if not after <= 4 * alone + slack:
        raise ModelError(
            f"{name}: a response's log-probs change by {after:.3g} nats when another response precedes "
            "it in the packed row: its layers carry state along the sequence (recurrent or convolution "
            "layers), which shared-prompt packing cannot isolate"
        )
    return max(alone, after)


def _probe_gap(base: Any, prompt: list[int], responses: list[list[int]], attn: str, impl: str) -> float:
    """Largest |packed - plain| log-prob over the LAST response's tokens."""
    item = TokenizedExample(prompt_ids=prompt, response_ids=responses, scores=[0.0] * len(responses))
    packed = packed_logprobs(base, pack_tokenized([item]), attn=attn, impl=impl).float()
    row = torch.tensor([prompt + responses[-1]], device=base.get_input_embeddings().weight.device)
    logits = base(input_ids=row, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
    plain = logits.log_softmax(-1).gather(-1, row[0, len(prompt) :, None]).squeeze(-1)
    return (packed[-len(responses[-1]) :] - plain).abs().max().item()


class PackedLogprobs(torch.nn.Module):
    """`packed_logprobs` as a module's forward: the unit DDP and FSDP2 wrap (rrhf_fast.parallel.distributed).

    Both act only when the forward runs through the wrapped module, and packed_logprobs reads the
    lm_head weight outside of any module's forward; wrapped whole, FSDP2 holds the root parameters
    (embeddings, final norm, lm_head) unsharded for the duration, and DDP sees every gradient.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, attn: str = "auto", impl: str = "auto") -> torch.Tensor:
        logp = packed_logprobs(self.model, batch, attn=attn, impl=impl)
        # FSDP2 hooks the backward on this output, which an in-place op on a view would lose.
        return logp.clone() if logp._is_view() else logp


def _output_head(base: Any) -> torch.nn.Module:
    head = base.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(base).__name__} has no lm_head; pass a causal LM (AutoModelForCausalLM)")
    if getattr(head, "bias", None) is not None:
        raise ModelError("the lm_head has a bias, which the fused token_logprobs does not take")
    weight = getattr(head, "weight", None)
    if type(head).__module__.startswith(("peft", "bitsandbytes")) or not isinstance(weight, torch.Tensor):
        raise ModelError(
            f"the lm_head is a {type(head).__name__}, not a plain linear layer; "
            "leave lm_head out of LoRA target modules and quantisation"
        )
    if not weight.is_floating_point():
        raise ModelError(f"the lm_head weight is {weight.dtype}; keep lm_head unquantised")
    return head
