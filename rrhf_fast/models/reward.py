"""The reward-model path: a sequence-classification model on a PackedBatch -> one reward per response.

The model is `AutoModelForSequenceClassification` with `num_labels=1` (a causal-LM backbone and a
bias-free linear `score` head, as transformers builds it from a causal-LM checkpoint: the backbone's
weights load, the lm_head is dropped, the head starts from the config's initializer). The backbone
runs once on the packed row through the shared-prompt attention, so each response sees its prompt
and itself with positions continuing from the prompt, exactly as when [prompt; response] runs
alone. The reward of a response is the head on the hidden state that transformers' own forward
pools: the rightmost token of [prompt; response] whose id is not the config's pad id
(`GenericForSequenceClassification.forward` in transformers/modeling_layers.py), which is the
response's last token (its EOS) unless the pad id is the EOS id, as it is in many tokenizers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rrhf_fast.data.packing import PackedBatch, TokenizedExample, pack_tokenized
from rrhf_fast.errors import ModelError
from rrhf_fast.models import attention
from rrhf_fast.models.loading import load_model
from rrhf_fast.models.logprobs import prepare_model
from rrhf_fast.models.wrapping import unwrap


def load_reward_model(
    config: Any,
    device: torch.device,
    tokenizer: Any,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Any:
    """The reward model `rrhf-fast train-rm` trains: `config.model` (a causal-LM checkpoint, or a
    reward model to train further) as a one-label sequence-classification model on `device`, with the
    run's dtype, quantisation, LoRA (peft task SEQ_CLS: the score head trains whole) and gradient
    checkpointing; prepared for packing and checked against its own forward (check_reward_parity)
    under the run's `autocast`."""
    model = load_model(config, device, task_type="SEQ_CLS")
    base = unwrap(model)
    if base.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        # Saved with the checkpoint: transformers' forward needs a pad id for batches of several.
        base.config.pad_token_id = tokenizer.pad_token_id
    prepare_model(model)
    with autocast or contextlib.nullcontext():  # the run's numerics: autocast on CUDA
        check_reward_parity(model, attn=config.attn)
    return model


def pooled_rows(batch: PackedBatch, pad_id: int | None) -> torch.Tensor:
    """[R] long: the row of the packed input whose hidden state gives each response's reward.

    transformers pools the rightmost non-pad token of the sequence (index 0 when every token is a
    pad, from its argmax of index * mask); the sequence of response j is its prompt's rows, then its
    own. Without a pad id it takes the last token.
    """
    ids = batch.input_ids[0].cpu()
    segment, group = batch.seq_segment.cpu(), batch.seq_group.cpu()
    rows = torch.arange(ids.numel())
    keep = torch.ones_like(ids, dtype=torch.bool) if pad_id is None else ids != pad_id
    is_resp = segment > 0
    # token_response follows the response tokens in row order (PackedBatch's packed order).
    resp_of_row = torch.full_like(ids, -1)
    resp_of_row[is_resp] = batch.token_response.cpu()
    R, G = batch.num_responses, batch.num_queries
    take = is_resp & keep
    last = torch.full((R,), -1, dtype=torch.long).scatter_reduce(0, resp_of_row[take], rows[take], "amax")
    prompt = ~is_resp
    prompt_keep = prompt & keep
    prompt_last = torch.full((G,), -1, dtype=torch.long).scatter_reduce(
        0, group[prompt_keep], rows[prompt_keep], "amax"
    )
    prompt_first = torch.full((G,), ids.numel(), dtype=torch.long).scatter_reduce(
        0, group[prompt], rows[prompt], "amin"
    )
    query = batch.response_query.cpu()
    fallback = torch.where(prompt_last[query] >= 0, prompt_last[query], prompt_first[query])
    return torch.where(last >= 0, last, fallback)


def packed_rewards(model: Any, batch: PackedBatch, *, attn: str = "auto") -> torch.Tensor:
    """The reward of every response of `batch`, in packed order: [R] fp32, differentiable.

    `model` is an `AutoModelForSequenceClassification` with one label (or a peft model around one),
    or a `PackedRewards` (as DDP or FSDP2 wrap it), whose forward this then goes through.
    """
    if isinstance(model, PackedRewards) or isinstance(getattr(model, "module", None), PackedRewards):
        return model(batch, attn=attn)
    base = unwrap(model)
    prepare_model(base)
    head = score_head(base)
    device = base.get_input_embeddings().weight.device
    config = base.config.get_text_config()
    rows = pooled_rows(batch, config.pad_token_id).to(device)  # on the host side, before the copy
    batch = batch.to(device, non_blocking=True) if batch.input_ids.device != device else batch
    softcapped = getattr(config, "attn_logit_softcapping", None) is not None
    backend = attention.resolve_backend(attn, device, softcapped)
    meta = attention.SharedPromptMeta.from_batch(batch, backend, fallback="flex" if attn == "auto" else None)
    with attention.packed_forward():
        out = getattr(base, base.base_model_prefix)(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, sp_meta=meta
        )
    # The head on the pooled rows only: a linear map per row, so the same numbers as transformers'
    # head on every row followed by the pooling, without the [T, num_labels] intermediate.
    return head(out.last_hidden_state[0, rows])[:, 0].float()


@torch.no_grad()
def check_reward_parity(model: Any, *, attn: str = "auto") -> float:
    """Check that packed rewards equal the model's own forward; return the largest gap.

    Two probes (as logprobs.check_logit_parity): a query with one response, and the same response
    after a longer one, which catches layers that carry state along the row (recurrent or
    convolution hybrids), which shared-prompt packing cannot isolate. Bounds: 1e-3 in fp32, 0.25
    in half precision or under autocast, relative to the reward's scale when it is above 1.
    """
    base = unwrap(model)
    vocab = base.get_input_embeddings().weight.shape[0]
    pad = base.config.get_text_config().pad_token_id
    ids = [t for t in ((7 * i + 3) % vocab for i in range(40)) if t != pad][:24]
    prompt, first, probe = ids[:6], ids[6:18], ids[18:24]
    was_training = base.training
    base.eval()
    try:
        alone = _probe(base, prompt, [probe], attn)
        after = _probe(base, prompt, [first, probe], attn)
    finally:
        base.train(was_training)
    weight = base.get_input_embeddings().weight
    fp32 = weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)
    (gap, scale), (gap_after, _) = alone, after
    bound = (1e-3 if fp32 else 0.25) * max(1.0, scale)
    name = f"{type(base).__name__} ({base.config.model_type})"
    if not gap <= bound:
        raise ModelError(
            f"{name}: packed rewards differ from the model's own forward by {gap:.3g} (bound {bound:.3g}): "
            "its pooling or head is not the one rrhf-fast reproduces"
        )
    if not gap_after <= 4 * gap + bound / 10:  # slack: rounding of rows of other lengths (logprobs.py)
        raise ModelError(
            f"{name}: a response's reward changes by {gap_after:.3g} when another response precedes it in "
            "the packed row: its layers carry state along the sequence (recurrent or convolution "
            "layers), which shared-prompt packing cannot isolate"
        )
    return max(gap, gap_after)


def _probe(base: Any, prompt: list[int], responses: list[list[int]], attn: str) -> tuple[float, float]:
    """|packed - plain| reward of the LAST response, and |plain|."""
    item = TokenizedExample(prompt_ids=prompt, response_ids=responses, scores=[0.0] * len(responses))
    packed = packed_rewards(base, pack_tokenized([item]), attn=attn)[-1].item()
    row = torch.tensor([prompt + responses[-1]], device=base.get_input_embeddings().weight.device)
    plain = base(input_ids=row, use_cache=False).logits[0, 0].float().item()
    return abs(packed - plain), abs(plain)


class PackedRewards(torch.nn.Module):
    """`packed_rewards` as a module's forward: the unit DDP and FSDP2 wrap (as PackedLogprobs)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, attn: str = "auto", impl: str = "auto") -> torch.Tensor:
        # `impl` (the log-prob kernel) has no meaning here; taken so both runners share a call.
        rewards = packed_rewards(self.model, batch, attn=attn)
        return rewards.clone() if rewards._is_view() else rewards


def score_head(base: Any) -> torch.nn.Module:
    """The model's one-label `score` head (peft wraps it in a ModulesToSaveWrapper: still callable)."""
    head = getattr(base, "score", None)
    labels = getattr(base.config, "num_labels", None)
    if head is None or labels != 1:
        raise ModelError(
            f"{type(base).__name__} is not a one-label sequence-classification model (num_labels "
            f"{labels}); load it with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)"
        )
    return head
