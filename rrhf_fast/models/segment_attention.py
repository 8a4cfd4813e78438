"""Shared-prompt attention per segment: what the rule costs, on the CPU and in FlexAttention's mask.

A packed row is G + R contiguous segments (docs/DESIGN.md §3): each prompt, which attends causally
to itself, and each response, which attends to [its prompt; itself], causally aligned at the bottom
right. Per query that is P^2/2 + sum_i R_i (P + R_i) score entries, where one attention over the
whole row with a [T, T] mask costs T^2: 26 queries of ~940-token prompts and 4 responses packed into
~8k-token micro-batches took 78.7 s and 1705 MiB peak RSS on a 2-core CPU, one query per
micro-batch 31.1 s and 487 MiB (issue 31).

`SegmentLayout` is built once per batch from host integers (the packing's lengths), never per layer:
- `segments`: each prompt; then its responses, either together against one [prompt; responses]
  key run (the prompt's keys gathered once, `GROUP_SLACK`) or each against [prompt; response];
- `buckets`: segments of similar shape grouped so that one padded SDPA call runs many at once
  (few calls per layer, padding bounded by `PAD_SLACK` and `CALL_ENTRIES`); `dense_segments`
  gathers each bucket's queries and keys, runs SDPA (or the explicit soft-capped math) with a
  [n, 1, Lq, Lk] mask and puts every output row back in its place;
- `block_mask`: FlexAttention's BlockMask computed from the segments' row intervals in
  O(T + blocks^2), where torch's `create_block_mask` evaluates the mask on the full T x T grid
  (torch 2.13 `create_mask`: a vmap over every (q, kv) pair; compiled on CUDA, the same T^2
  evaluations plus a compilation per new length).
"""

from __future__ import annotations

import inspect
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


# All k responses of a query share one [prompt; responses] key run (one call, the prompt's keys once)
# when that costs at most GROUP_SLACK of the responses' own P + R_i each: long prompts, short
# responses (the common case). Otherwise each response has its own [prompt; response] keys.
GROUP_SLACK = 1.25


@dataclass
class Segment:
    """Query rows q_start .. q_start + q_len against a key list of k_len rows (key_runs, in order).

    Per query row, in key-list indices: the prompt part [0, a_hi) and its own part [b_lo, b_hi)
    (causal: b_hi - 1 is the row itself); `pos` is its logical position, so that key-list index i
    of the prompt part has position i and of its own part pos - (b_hi - 1 - i)."""

    q_start: int
    q_len: int
    key_runs: list[tuple[int, int]]  # (first row, rows)
    pos: list[int]
    a_hi: list[int]
    b_lo: list[int]
    b_hi: list[int]
    is_prompt: bool = False

    @property
    def k_len(self) -> int:
        return sum(n for _, n in self.key_runs)

    def key_rows(self) -> list[int]:
        return [r for start, n in self.key_runs for r in range(start, start + n)]


def segments_of(prompt_len: list[int], response_len: list[int], response_query: list[int]) -> list[Segment]:
    """The packing's rows (pack_tokenized's layout) as segments: each prompt, then its responses
    together or one segment each (GROUP_SLACK)."""
    out: list[Segment] = []
    row, r = 0, 0
    for g, P in enumerate(prompt_len):
        prompt = row
        out.append(Segment(row, P, [(row, P)], list(range(P)), [0] * P, [0] * P, list(range(1, P + 1)), True))
        row += P
        lens = []
        while r < len(response_query) and response_query[r] == g:
            lens.append(response_len[r])
            r += 1
        total = sum(lens)
        if total * (P + total) <= GROUP_SLACK * sum(n * (P + n) for n in lens):
            pos, b_lo, b_hi, off = [], [], [], P
            for n in lens:
                pos += range(P, P + n)
                b_lo += [off] * n
                b_hi += range(off + 1, off + n + 1)
                off += n
            out.append(Segment(row, total, [(prompt, P + total)], pos, [P] * total, b_lo, b_hi))
            row += total
        else:
            for n in lens:
                out.append(Segment(row, n, [(prompt, P), (row, n)], list(range(P, P + n)), [P] * n, [P] * n,
                                   list(range(P + 1, P + n + 1))))  # fmt: skip
                row += n
    return out


def plan_buckets(segments: list[Segment], slack: float = PAD_SLACK) -> list[list[Segment]]:
    """Greedy over segments sorted by (prompt or not, q_len, k_len) descending: a segment joins the
    open bucket while the padded cost stays within `slack` of the segments' own + CALL_ENTRIES."""
    order = sorted(segments, key=lambda s: (s.is_prompt, s.q_len, s.k_len), reverse=True)
    buckets: list[list[Segment]] = []
    own = lq = lk = 0
    for s in order:
        if buckets and buckets[-1][0].is_prompt == s.is_prompt:
            n, q, k, c = len(buckets[-1]) + 1, max(lq, s.q_len), max(lk, s.k_len), own + s.q_len * s.k_len
            if n * q * k <= slack * c + CALL_ENTRIES:
                buckets[-1].append(s)
                own, lq, lk = c, q, k
                continue
        buckets.append([s])
        own, lq, lk = s.q_len * s.k_len, s.q_len, s.k_len
    return buckets


@dataclass
class Bucket:
    q_rows: torch.Tensor  # [n * Lq] rows of T (padding: row 0)
    k_rows: torch.Tensor  # [n * Lk] rows of T (padding: row 0)
    rule: torch.Tensor  # [4, n, Lq, 1]: pos, a_hi, b_lo, b_hi per query row (padding: sees key 0)
    n: int
    q_len: int
    k_len: int
    prompts_only: bool  # each query row sees keys 0..row: top-left causal is exact


class SegmentLayout:
    """Index tensors for the per-segment attention of one packed batch (built once, on `device`)."""

    def __init__(self, segments: list[Segment], num_tokens: int, device: torch.device):
        self.segments, self.num_tokens, self.device = segments, num_tokens, device
        self.buckets: list[Bucket] = []
        out_pos = [0] * num_tokens
        offset = 0
        for group in plan_buckets(segments):
            lq, lk = max(s.q_len for s in group), max(s.k_len for s in group)
            q_rows, k_rows, rule = [], [], [[], [], [], []]
            for slot, s in enumerate(group):
                pad = lq - s.q_len
                q_rows += [*range(s.q_start, s.q_start + s.q_len), *[0] * pad]
                k_rows += [*s.key_rows(), *[0] * (lk - s.k_len)]
                for dst, src, fill in zip(rule, (s.pos, s.a_hi, s.b_lo, s.b_hi), (0, 1, 0, 0), strict=True):
                    dst += [*src, *[fill] * pad]
                base = offset + slot * lq
                out_pos[s.q_start : s.q_start + s.q_len] = range(base, base + s.q_len)
            offset += len(group) * lq
            self.buckets.append(
                Bucket(
                    q_rows=torch.tensor(q_rows, device=device),
                    k_rows=torch.tensor(k_rows, device=device),
                    rule=torch.tensor(rule, device=device).view(4, len(group), lq, 1),
                    n=len(group),
                    q_len=lq,
                    k_len=lk,
                    prompts_only=all(s.is_prompt for s in group),
                )
            )
        self.out_pos = torch.tensor(out_pos, device=device)  # row t's place in the buckets' outputs
        self._masks: dict[int | None, list[torch.Tensor]] = {}

    def masks(self, window: int | None) -> list[torch.Tensor]:
        """[n, 1, Lq, Lk] boolean masks per bucket: key i in [a_lo, a_hi) or [b_lo', b_hi)."""
        if window not in self._masks:
            masks = []
            for b in self.buckets:
                i = torch.arange(b.k_len, device=self.device)
                lo_a, hi_a, lo_b, hi_b = window_rule(b.rule, window)
                masks.append((((i >= lo_a) & (i < hi_a)) | ((i >= lo_b) & (i < hi_b)))[:, None])
            self._masks[window] = masks
        return self._masks[window]

    def padded_cost(self) -> int:
        """Score entries the buckets compute (prompts counted whole): what the tests bound."""
        return sum(b.n * b.q_len * b.k_len for b in self.buckets)


def window_rule(rule: torch.Tensor, window: int | None) -> tuple[torch.Tensor, ...]:
    """(a_lo, a_hi, b_lo, b_hi) in key-list indices: the prompt part keeps positions > pos - window,
    the own part its last `window` keys."""
    pos, a_hi, b_lo, b_hi = rule
    if window is None:
        return torch.zeros_like(pos), a_hi, b_lo, b_hi
    return (pos - window + 1).clamp(min=0), a_hi, torch.maximum(b_lo, b_hi - window), b_hi


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
    """[T, 2, 2] the key rows each query row sees, as two half-open row intervals."""
    T = layout.num_tokens
    rule = torch.zeros(4, T, dtype=torch.long)
    a_base, b_base = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
    for s in layout.segments:
        rows = slice(s.q_start, s.q_start + s.q_len)
        rule[:, rows] = torch.tensor([s.pos, s.a_hi, s.b_lo, s.b_hi])
        a_base[rows] = s.key_runs[0][0]  # the prompt part lies in the first run, the own part in the last
        last_start, last_len = s.key_runs[-1]
        b_base[rows] = last_start - (s.k_len - last_len)
    lo_a, hi_a, lo_b, hi_b = window_rule(rule, window)
    a = torch.stack([a_base + lo_a, a_base + hi_a], -1) * (hi_a > lo_a)[:, None]
    b = torch.stack([b_base + lo_b, b_base + hi_b], -1) * (hi_b > lo_b)[:, None]
    joined = (a[:, 1] == b[:, 0]) & (hi_a > lo_a)  # adjacent: one interval
    a = torch.where(joined[:, None], torch.stack([a[:, 0], b[:, 1]], -1), a)
    b = torch.where(joined[:, None], torch.zeros_like(b), b)
    return torch.stack([a, b], 1)


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
    args = [x.to(layout.device) for x in (*_ordered(partial), *_ordered(full))]
    lengths = (
        {"seq_lengths": (T, T)}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
        else {}
    )
    return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=block, mask_mod=mask_mod, **lengths)


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
