"""Shared-prompt attention for Hugging Face models, registered as "rrhf_shared_prompt".

Rule (docs/DESIGN.md §3): token q attends token kv iff kv <= q, both belong to the same query,
and kv is a prompt token or in q's own response; with a sliding window, also
`pos[q] - pos[kv] < window` on the logical positions (transformers' `sliding_window_overlay`).

The packing metadata travels as one private kwarg, `sp_meta` (a `SharedPromptMeta` built once per
batch), from `model.model(..., sp_meta=meta)` down to every attention call. Without it the
function is plain causal attention, so a prepared model still generates and evaluates. Shared-
prompt position ids restart inside a row, which transformers would read as independent packed
sequences; so during a packed forward the registered mask function returns None and no [T, T] mask
is built, while `generate()` (left padding) still gets transformers' own SDPA mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rrhf_fast.config import ATTN_BACKENDS
from rrhf_fast.data.packing import PackedBatch
from rrhf_fast.errors import ModelError
from rrhf_fast.models import segment_attention as segments

NAME = "rrhf_shared_prompt"
# One SDPA over the whole row with the [T, T] mask: T^2 work and memory, kept as the tests' and the
# benchmarks' reference for `dense` (reachable as attn="dense-full", not a CLI choice).
DENSE_FULL = "dense-full"
_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("rrhf_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward() -> Iterator[None]:
    """While active, transformers builds no attention mask for models using NAME."""
    token = _PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _PACKED_FORWARD.reset(token)


def resolve_backend(attn: str, device: torch.device, softcap: bool = False) -> str:
    """`auto`: varlen on CUDA without attention soft-capping, flex on CUDA with it, else dense."""
    if attn == DENSE_FULL:
        return attn
    if attn not in ATTN_BACKENDS:
        raise ModelError(f"attn must be one of {ATTN_BACKENDS}, got {attn!r}")
    if attn != "auto":
        return attn
    if torch.device(device).type != "cuda":
        return "dense"
    if _has_flash_attn() or (_has_torch_varlen() and not softcap):  # flash-attn soft-caps, torch's cannot
        return "varlen"
    return "flex"


@dataclass(eq=False)
class SharedPromptMeta:
    """What every layer's attention needs about one packed batch; masks are cached per window."""

    backend: str
    seq_group: torch.Tensor  # [T]
    seq_segment: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] logical positions
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    prompt_len: torch.Tensor | None = None  # [G], [R], [R]: the segments (the layout, built on first use)
    response_len: torch.Tensor | None = None
    response_query: torch.Tensor | None = None
    fallback: str | None = None  # used when varlen cannot take the dtype (attn="auto" only)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_batch(cls, batch: PackedBatch, backend: str, fallback: str | None = None) -> SharedPromptMeta:
        return cls(
            backend=backend,
            seq_group=batch.seq_group,
            seq_segment=batch.seq_segment,
            positions=batch.position_ids[0],
            cu_seqlens_q=batch.cu_seqlens_q,
            cu_seqlens_k=batch.cu_seqlens_k,
            kv_index=batch.kv_index,
            max_seqlen_q=batch.max_seqlen_q,
            max_seqlen_k=batch.max_seqlen_k,
            prompt_len=batch.prompt_len,
            response_len=batch.response_len,
            response_query=batch.response_query,
            fallback=fallback,
        )

    def window(self, sliding_window: int | None) -> int | None:
        """The window, or None where it masks nothing (positions in a group span < max_seqlen_k)."""
        return None if sliding_window is None or sliding_window >= self.max_seqlen_k else int(sliding_window)

    def allowed(self, q: torch.Tensor, kv: torch.Tensor, window: int | None) -> torch.Tensor:
        """The attention rule on index tensors (broadcasting; also a FlexAttention mask_mod body)."""
        g, s, p = self.seq_group, self.seq_segment, self.positions
        ok = (kv <= q) & (g[q] == g[kv]) & ((s[kv] == 0) | (s[q] == s[kv]))
        if window is not None:
            ok = ok & (p[q] - p[kv] < window)
        return ok

    def layout(self) -> segments.SegmentLayout:
        """The per-segment index tensors (segment_attention.py), from host integers, once per batch."""
        if "layout" not in self._cache:
            segs = segments.segments_of(
                self.prompt_len.tolist(), self.response_len.tolist(), self.response_query.tolist()
            )
            T, device = self.seq_group.numel(), self.seq_group.device
            self._cache["layout"] = segments.SegmentLayout(segs, T, device)
        return self._cache["layout"]

    def dense_mask(self, window: int | None) -> torch.Tensor:
        """The [1, 1, T, T] mask of the whole row: only `dense-full`, the reference, builds it."""
        key = ("dense", window)
        if key not in self._cache:
            idx = torch.arange(self.seq_group.numel(), device=self.seq_group.device)
            self._cache[key] = self.allowed(idx[:, None], idx[None, :], window)[None, None]
        return self._cache[key]

    def block_mask(self, window: int | None) -> Any:
        """FlexAttention's BlockMask of the rule, from the segments (no T x T evaluation)."""
        key = ("flex", window)
        if key not in self._cache:

            def mask_mod(b, h, q_idx, kv_idx):
                return self.allowed(q_idx, kv_idx, window)

            self._cache[key] = segments.block_mask(self.layout(), window, mask_mod)
        return self._cache[key]


# ----------------------------------------------------------------------------------------------
# The registered attention function


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sp_meta: SharedPromptMeta | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point; returns ([B, T, H, D], None) as transformers expects."""
    if sp_meta is None:
        return _causal_attention(
            module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs
        )
    if query.shape[0] != 1 or query.shape[2] != sp_meta.seq_group.numel():
        raise ValueError(
            f"shared-prompt attention expects one packed row of {sp_meta.seq_group.numel()} tokens"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = sp_meta.window(sliding_window)
    backend = sp_meta.backend
    if backend == "varlen" and query.dtype not in (torch.float16, torch.bfloat16) and query.is_cuda:
        if sp_meta.fallback is None:
            raise ModelError(f"attn='varlen' needs fp16/bf16 on CUDA, got {query.dtype}; use attn='flex'")
        backend = sp_meta.fallback
    if dropout and backend not in ("dense", DENSE_FULL):
        raise ModelError(f"attn={backend!r} has no attention dropout; set config.attention_dropout = 0")
    if backend == "dense":
        layout = sp_meta.layout()
        out = segments.dense_segments(query, key, value, layout, window, scaling, softcap, dropout, _math)
        return out, None
    if backend == DENSE_FULL:
        out = _dense_full(query, key, value, sp_meta.dense_mask(window), scaling, softcap, dropout)
    elif backend == "flex" and not query.is_cuda:
        return _flex_per_query(query, key, value, sp_meta, window, scaling, softcap), None
    elif backend == "flex":
        out = _flex(query, key, value, sp_meta.block_mask(window), scaling, softcap)
    elif backend == "varlen":
        return _varlen(query, key, value, sp_meta, scaling, window, softcap), None
    else:
        raise ValueError(f"unknown shared-prompt attention backend {backend!r}")
    return out.transpose(1, 2).contiguous(), None


def _causal_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs):
    """Ordinary attention (generation, evaluation): transformers' SDPA, or math when soft-capped."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:  # causal, aligned at the bottom right (a cache holds the past)
        q_idx = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        attention_mask = q_idx >= torch.arange(kv_len, device=query.device)[None, :]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _math(query, key, value, attention_mask, scaling, softcap, dropout)
    return out.transpose(1, 2).contiguous(), None


def _math(q, k, v, mask, scaling, softcap, dropout=0.0):
    """Explicit attention, as transformers' eager path computes it (softmax in fp32)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., : k.shape[-2]]
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)


def _dense_full(q, k, v, mask, scaling, softcap, dropout):
    if softcap is not None:
        return _math(q, k, v, mask, scaling, softcap, dropout)
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, dropout_p=dropout, scale=scaling
    )


def _flex(q, k, v, block_mask, scaling, softcap):
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

    return _compiled_flex()(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _flex_per_query(q, k, v, meta: SharedPromptMeta, window, scaling, softcap) -> torch.Tensor:
    """Uncompiled flex (the CPU's, forward only) computes the scores of every (q, kv) pair it is
    given: it is given one query's rows at a time, never the [T, T] of the whole row."""
    starts = [s.q_start for s in meta.layout().segments if s.is_prompt] + [q.shape[2]]
    outs = []
    for r0, r1 in zip(starts[:-1], starts[1:], strict=False):

        def score_mod(score, b, h, q_idx, kv_idx, r0=r0):
            if softcap is not None:
                score = torch.tanh(score / softcap) * softcap
            return torch.where(meta.allowed(q_idx + r0, kv_idx + r0, window), score, -float("inf"))

        part = (x[:, :, r0:r1] for x in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        outs.append(_eager_flex()(*part, score_mod=score_mod, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex():
    # Uncompiled flex materialises the [T, T] scores; compiled it is a fused block-sparse kernel.
    return torch.compile(_eager_flex(), dynamic=True)


# ----------------------------------------------------------------------------------------------
# varlen: each prompt and each response is a contiguous run of queries; keys are gathered once
# per response as [prompt; response], causal at the bottom right.


def _varlen(q, k, v, meta: SharedPromptMeta, scaling, window, softcap) -> torch.Tensor:
    q = q[0].transpose(0, 1).contiguous()  # [T, H, D]
    k = k[0].transpose(0, 1)[meta.kv_index]  # [sum of key lengths, Hkv, D], contiguous
    v = v[0].transpose(0, 1)[meta.kv_index]
    args = (q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    if not q.is_cuda:
        out = varlen_reference(*args, scale=scaling, window=window, softcap=softcap)
    elif _has_flash_attn():
        from flash_attn import flash_attn_varlen_func

        left = -1 if window is None else window - 1
        out = flash_attn_varlen_func(
            *args, softmax_scale=scaling, causal=True, window_size=(left, 0), softcap=softcap or 0.0
        )
    else:
        out = _torch_varlen(*args, scale=scaling, window=window, softcap=softcap)
    return out[None]


@functools.cache
def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise ModelError(
            "attn='varlen' needs flash-attn or torch >= 2.10 (torch.nn.attention.varlen); use attn='flex'"
        ) from None
    if softcap is not None:
        raise ModelError("torch varlen attention has no logit soft-capping (Gemma 2); use attn='flex'")
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"scale": scale}
    if "window_size" in params:  # torch >= 2.12: (left, right); (-1, 0) is causal
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    elif window is not None:
        raise ModelError("this torch's varlen attention has no sliding window; use attn='flex'")
    else:  # torch 2.10 / 2.11
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_reference(q, k, v, cu_q, cu_k, max_q=None, max_k=None, *, scale, window=None, softcap=None):
    """The varlen call in plain torch, one segment at a time: q [Tq, H, D], k/v [Tk, Hkv, D]."""
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s] : cq[s + 1]].transpose(0, 1)[None]
        ks, vs = (x[ck[s] : ck[s + 1]].transpose(0, 1)[None] for x in (k, v))
        q_len, k_len = qs.shape[2], ks.shape[2]
        last = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)  # bottom-right causal
        kv_idx = torch.arange(k_len, device=q.device)[None, :]
        mask = kv_idx <= last
        if window is not None:
            mask = mask & (last - kv_idx < window)
        out[cq[s] : cq[s + 1]] = _math(qs, ks, vs, mask, scale, softcap)[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Registration (at import: a model prepared once keeps finding the function, also when gradient
# checkpointing recomputes layers during backward).


def _mask_or_none(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    return None if _PACKED_FORWARD.get() else sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, shared_prompt_attention)
AttentionMaskInterface.register(NAME, _mask_or_none)
