"""Shared-prompt attention per segment: what the rule costs, on the CPU and in FlexAttention's mask.

A packed row is G + R contiguous segments (docs/DESIGN.md §3): each prompt, which attends causally
to itself, and each response, which attends to [its prompt; itself], causally aligned at the bottom
right. Per query that is P^2/2 + sum_i R_i (P + R_i) score entries, where one attention over the
whole row with a [T, T] mask costs T^2: 26 queries of ~940-token prompts and 4 responses packed into
~8k-token micro-batches took 78.7 s and 1705 MiB peak RSS on a 2-core CPU, one query per
micro-batch 31.1 s and 487 MiB (issue 31).

`SegmentLayout` is built once per batch from host integers (the packing's lengths), never per layer:
- `buckets`: segments of similar shape grouped so that one padded SDPA call runs many at once
  (few calls per layer, padding bounded by `PAD_SLACK`); `dense_segments` gathers each bucket's
  queries and [prompt; response] keys, runs SDPA (or the explicit soft-capped math) with a
  [n, 1, Lq, Lk] mask and puts every output row back in its place;
- `block_mask`: FlexAttention's BlockMask computed from the segments' row intervals in
  O(T + blocks^2), where torch's `create_block_mask` evaluates the mask on the full T x T grid
  (torch 2.13 `create_mask`: a vmap over every (q, kv) pair; compiled on CUDA, the same T^2
  evaluations plus a compilation per new length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

# A bucket's padded cost n * Lq * Lk stays within PAD_SLACK of its segments' own sum q * k, plus
# CALL_ENTRIES: score entries that cost less than one more SDPA call's overhead (tens of
# microseconds), so that many short segments share a call.
PAD_SLACK = 1.25
CALL_ENTRIES = 1 << 14


@dataclass(frozen=True)
class Segment:
    """Queries rows[q_start : q_start + q_len]; keys run A then run B (rows), k_len = a_len + b_len."""

    q_start: int
    q_len: int
    a_start: int
    a_len: int
    b_start: int = 0
    b_len: int = 0

    @property
    def k_len(self) -> int:
        return self.a_len + self.b_len


@dataclass
class Bucket:
    q_rows: torch.Tensor  # [n * Lq] rows of T (padding: row 0)
    k_rows: torch.Tensor  # [n * Lk] rows of T (padding: row 0)
    last: torch.Tensor  # [n, Lq] the last key each query sees (index in its key list)
    n: int
    q_len: int
    k_len: int
    prompts_only: bool  # q_len == k_len for each segment: top-left causal is exact


def segments_of(prompt_len: list[int], response_len: list[int], response_query: list[int]) -> list[Segment]:
    """The packing's segments, in row order (pack_tokenized's layout)."""
    out: list[Segment] = []
    row, r = 0, 0
    for g, plen in enumerate(prompt_len):
        prompt = row
        out.append(Segment(row, plen, row, plen))
        row += plen
        while r < len(response_query) and response_query[r] == g:
            n = response_len[r]
            out.append(Segment(row, n, prompt, plen, row, n))
            row, r = row + n, r + 1
    return out


def plan_buckets(segments: list[Segment], slack: float = PAD_SLACK) -> list[list[Segment]]:
    """Greedy over segments sorted by (prompt or not, q_len, k_len) descending: a segment joins the
    open bucket while the padded cost stays within `slack` of the segments' own + CALL_ENTRIES."""
    order = sorted(segments, key=lambda s: (s.b_len == 0, s.q_len, s.k_len), reverse=True)
    buckets: list[list[Segment]] = []
    own = lq = lk = 0
    for s in order:
        if buckets and (buckets[-1][0].b_len == 0) == (s.b_len == 0):
            n, q, k, c = len(buckets[-1]) + 1, max(lq, s.q_len), max(lk, s.k_len), own + s.q_len * s.k_len
            if n * q * k <= slack * c + CALL_ENTRIES:
                buckets[-1].append(s)
                own, lq, lk = c, q, k
                continue
        buckets.append([s])
        own, lq, lk = s.q_len * s.k_len, s.q_len, s.k_len
    return buckets


class SegmentLayout:
    """Index tensors for the per-segment attention of one packed batch (built once, on `device`)."""

    def __init__(self, segments: list[Segment], num_tokens: int, device: torch.device):
        self.segments, self.num_tokens, self.device = segments, num_tokens, device
        self.buckets: list[Bucket] = []
        out_pos = [0] * num_tokens
        offset = 0
        for group in plan_buckets(segments):
            lq, lk = max(s.q_len for s in group), max(s.k_len for s in group)
            q_rows, k_rows, last = [], [], []
            for slot, s in enumerate(group):
                q_rows += [*range(s.q_start, s.q_start + s.q_len), *[0] * (lq - s.q_len)]
                k_rows += [*range(s.a_start, s.a_start + s.a_len), *range(s.b_start, s.b_start + s.b_len)]
                k_rows += [0] * (lk - s.k_len)
                last += [*range(s.k_len - s.q_len, s.k_len), *[0] * (lq - s.q_len)]  # pad rows see key 0
                base = offset + slot * lq
                out_pos[s.q_start : s.q_start + s.q_len] = range(base, base + s.q_len)
            offset += len(group) * lq
            self.buckets.append(
                Bucket(
                    q_rows=torch.tensor(q_rows, device=device),
                    k_rows=torch.tensor(k_rows, device=device),
                    last=torch.tensor(last, device=device).view(len(group), lq),
                    n=len(group),
                    q_len=lq,
                    k_len=lk,
                    prompts_only=all(s.b_len == 0 for s in group),
                )
            )
        self.out_pos = torch.tensor(out_pos, device=device)  # row t's place in the buckets' outputs
        self._masks: dict[int | None, list[torch.Tensor]] = {}

    def masks(self, window: int | None) -> list[torch.Tensor]:
        """[n, 1, Lq, Lk] boolean masks per bucket: key i <= last, and last - i < window."""
        if window not in self._masks:
            masks = []
            for b in self.buckets:
                i = torch.arange(b.k_len, device=self.device)
                last = b.last[:, None, :, None]
                ok = i <= last
                if window is not None:
                    ok = ok & (last - i < window)
                masks.append(ok)
            self._masks[window] = masks
        return self._masks[window]

    def padded_cost(self) -> int:
        """Score entries the buckets compute (prompts counted whole): what the tests bound."""
        return sum(b.n * b.q_len * b.k_len for b in self.buckets)


def dense_segments(
    q: torch.Tensor,  # [1, H, T, D]
    k: torch.Tensor,  # [1, Hkv, T, D]
    v: torch.Tensor,
    layout: SegmentLayout,
    window: int | None,
    scaling: float,
    softcap: float | None,
    dropout: float,
    math: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The rule, bucket by bucket: [1, T, H, D], the same values as one SDPA over the row with the
    [T, T] mask (`_dense_full`, the test reference)."""
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, heads, D]
    heads, hkv, dim = q.shape[1], k.shape[1], q.shape[-1]
    outs = []
    for j, b in enumerate(layout.buckets):
        qb = qt.index_select(0, b.q_rows).view(b.n, b.q_len, heads, dim).transpose(1, 2)
        kb, vb = (x.index_select(0, b.k_rows).view(b.n, b.k_len, hkv, dim).transpose(1, 2) for x in (kt, vt))
        if softcap is not None:
            ob = math(qb, kb, vb, layout.masks(window)[j], scaling, softcap, dropout)
        elif window is None and b.prompts_only:  # top-left causal is exact for prompts, and skips half
            ob = _sdpa(qb, kb, vb, None, scaling, dropout)
        else:
            ob = _sdpa(qb, kb, vb, layout.masks(window)[j], scaling, dropout)
        outs.append(ob.transpose(1, 2).reshape(b.n * b.q_len, heads, dim))
    return torch.cat(outs).index_select(0, layout.out_pos)[None]


def _sdpa(q, k, v, mask, scaling, dropout):
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:  # CPU SDPA takes enable_gqa in its flash kernel; CUDA's may fall back to math
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa
    )


# ----------------------------------------------------------------------------------------------
# FlexAttention's BlockMask from the segments


def token_intervals(layout: SegmentLayout, window: int | None) -> torch.Tensor:
    """[T, 2, 2] the key rows each query row sees, as two half-open row intervals (A part, B part)."""
    rows = []
    for s in layout.segments:
        for j in range(s.q_len):
            last = s.k_len - s.q_len + j
            lo = 0 if window is None else max(0, last - window + 1)
            a = (s.a_start + lo, s.a_start + min(last + 1, s.a_len)) if lo < s.a_len else (0, 0)
            b = (0, 0)
            if last >= s.a_len:
                b = (s.b_start + max(lo, s.a_len) - s.a_len, s.b_start + last + 1 - s.a_len)
            if a[1] == b[0] and a[1] > a[0]:  # adjacent (response 1 after its prompt): one interval
                a, b = (a[0], b[1]), (0, 0)
            rows.append((a, b))
    return torch.tensor(rows, dtype=torch.long).view(-1, 2, 2)


def block_mask(layout: SegmentLayout, window: int | None, mask_mod: Callable, block: int = 128):
    """The BlockMask create_block_mask(mask_mod, ...) returns, without evaluating mask_mod on T x T."""
    from torch.nn.attention.flex_attention import BlockMask

    T = layout.num_tokens
    nb = -(-T // block)
    iv = token_intervals(layout, window)  # [T, 2, 2]
    start, end = iv[..., 0].reshape(-1), iv[..., 1].reshape(-1)  # [2T]
    q_block = (torch.arange(T) // block).repeat_interleave(2)
    nonempty = end > start
    touched = _count_ranges(q_block, start // block, (end - 1) // block, nonempty, nb)
    whole = (T // block) * block  # a block past the last whole one is never "full" (padding)
    lo, hi = -(-start // block), torch.minimum(end, torch.tensor(whole)) // block - 1
    covered = _count_ranges(q_block, lo, hi, nonempty & (hi >= lo), nb)
    rows_in_block = torch.full((nb,), block)
    rows_in_block[-1] = T - (nb - 1) * block
    full = (covered == rows_in_block[:, None]) & (rows_in_block[:, None] == block)
    partial = (touched > 0) & ~full
    args = [*_ordered(partial), *_ordered(full)]
    return BlockMask.from_kv_blocks(
        *(x.to(layout.device) for x in args), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def _count_ranges(q_block, lo, hi, keep, nb) -> torch.Tensor:
    """[nb, nb]: for each q block, how many of its rows' ranges [lo, hi] of kv blocks cover each."""
    diff = torch.zeros(nb, nb + 1, dtype=torch.long)
    flat = diff.view(-1)
    q_block, lo, hi = q_block[keep], lo[keep], hi[keep]
    ones = torch.ones_like(lo)
    flat.index_add_(0, q_block * (nb + 1) + lo, ones)
    flat.index_add_(0, q_block * (nb + 1) + hi + 1, -ones)
    return diff.cumsum(1)[:, :nb]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, nb] booleans -> (num_blocks [1, 1, nb], indices [1, 1, nb, nb]) as BlockMask stores them."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]
