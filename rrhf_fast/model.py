"""The model path: a Hugging Face causal LM on a PackedBatch -> per-token log-probs [M] fp32.

The decoder runs without its lm_head; the final hidden states [T, D] and the lm_head weight go to
`rrhf_fast.kernels.token_logprobs`, which never materialises the [M, V] logits (DESIGN.md section 2).
"""

from __future__ import annotations

from typing import Any

import torch

from . import attention
from .kernels import token_logprobs
from .packing import PackedBatch


def prepare_model(model: Any) -> Any:
    """Switch the model's attention to "rrhf_shared_prompt", once and for good (idempotent).

    The function stays installed: with non-reentrant gradient checkpointing the layers are
    recomputed during backward and look their attention function up again. Without packing
    metadata it is ordinary causal attention, so the model still generates and evaluates.
    """
    base = _unwrap(model)
    if base.config._attn_implementation != attention.NAME:
        base.set_attn_implementation(attention.NAME)
    if base.config._attn_implementation != attention.NAME:
        raise RuntimeError(
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
    base = _unwrap(model)
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
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return token_logprobs(hidden, head.weight, batch.rows, batch.targets, softcap=softcap, impl=impl)


class PackedLogprobs(torch.nn.Module):
    """`packed_logprobs` as a module's forward: the unit DDP and FSDP2 wrap (rrhf_fast.distributed).

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


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_head(base: Any) -> torch.nn.Module:
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no lm_head; pass a causal LM (AutoModelForCausalLM)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the lm_head has a bias, which the fused token_logprobs does not take")
    weight = getattr(head, "weight", None)
    if type(head).__module__.startswith(("peft", "bitsandbytes")) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"the lm_head is a {type(head).__name__}, not a plain linear layer; "
            "leave lm_head out of LoRA target modules and quantisation"
        )
    if not weight.is_floating_point():
        raise ValueError(f"the lm_head weight is {weight.dtype}; keep lm_head unquantised")
    return head
