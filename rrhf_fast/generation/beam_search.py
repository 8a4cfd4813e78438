"""Diverse (group) beam search, and the positions, cache and last logits of left-padded batches it and
the labelers share (left padding itself: rrhf_fast.models.tokenizer).

Transformers 5 moved group beam search out of `generate` to a Hub repository that needs network and
`trust_remote_code`, so it is implemented here: Vijayakumar et al. 2016, "Diverse Beam Search",
with the Hamming diversity penalty and the candidate and stopping rules of transformers 4.x
`group_beam_search`, on a plain forward with a KV cache. Rows are left padded by hand, with
position ids counted from each row's first real token, so a row's result does not depend on what
else is in its batch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch


@torch.no_grad()
def diverse_beam_search(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    num_beam_groups: int,
    diversity_penalty: float,
    max_new_tokens: int,
    eos_token_ids: set[int],
    length_penalty: float = 1.0,
) -> list[list[list[int]]]:
    """Group beam search with Hamming diversity; per prompt, `num_beams` new-token lists, best first.

    The beams form `num_beam_groups` groups of equal size, each an ordinary beam search; at every
    step group g's log-probabilities lose `diversity_penalty` for each beam of groups < g that
    chose the same token at this step. Hypotheses are ranked by their (penalised) sum of
    log-probabilities / generated length ** length_penalty, pooled over the groups. EOS is not in
    the returned tokens; a beam that reaches `max_new_tokens` is returned unfinished. With one
    group this is plain beam search, as `generate(num_beams=...)` does it.
    """
    if num_beams < 1 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beam_groups ({num_beam_groups}) must divide num_beams ({num_beams})")
    n, nb, device = input_ids.shape[0], num_beams, input_ids.device
    gs = nb // num_beam_groups
    mask = attention_mask.repeat_interleave(nb, 0)
    step_ids, step_pos = input_ids.repeat_interleave(nb, 0), positions(mask)
    # The beams of a group start as identical copies: only the first may expand at step 0.
    scores = torch.full((n, nb), -1e9, device=device)
    scores[:, ::gs] = 0.0
    groups = [[_Group(gs) for _ in range(num_beam_groups)] for _ in range(n)]
    generated = torch.empty(n * nb, 0, dtype=torch.long, device=device)
    cache = new_cache(model)
    for _ in range(max_new_tokens):
        logits = last_logits(model, step_ids, mask, step_pos, cache)
        logp = logits.float().log_softmax(-1).view(n, nb, -1)
        src, tokens, scores = _step(
            logp, scores, groups, generated, diversity_penalty, eos_token_ids, length_penalty
        )
        src = torch.tensor(src, device=device)
        generated = torch.cat([generated[src], torch.tensor(tokens, device=device)[:, None]], dim=1)
        cache.reorder_cache(src)
        mask = torch.cat([mask, mask.new_ones(n * nb, 1)], dim=1)
        step_ids, step_pos = generated[:, -1:], step_pos[:, -1:] + 1
        if all(g.done for row in groups for g in row):
            break
    return _finalize(groups, scores, generated, length_penalty)


def _finalize(groups, scores, generated, length_penalty) -> list[list[list[int]]]:
    """Per prompt, the best hypotheses pooled over its groups; a group still running at the length
    limit contributes its running beams."""
    nb = scores.shape[1]
    gs = nb // len(groups[0])
    results = []
    for i, row in enumerate(groups):
        for gi, g in enumerate(row):
            if not g.done:
                for b in range(gi * gs, (gi + 1) * gs):
                    score = scores[i, b].item() / generated.shape[1] ** length_penalty
                    g.add(score, generated[i * nb + b].tolist())
        hyps = sorted((h for g in row for h in g.hyps), key=lambda h: -h[0])
        results.append([tokens for _, tokens in hyps[:nb]])
    return results


@dataclass
class _Group:
    """The finished hypotheses of one beam group of one prompt (the best `size` are kept)."""

    size: int
    hyps: list[tuple[float, list[int]]] = field(default_factory=list)
    done: bool = False

    def add(self, score: float, tokens: list[int]) -> None:
        self.hyps.append((score, tokens))
        self.hyps.sort(key=lambda h: -h[0])
        del self.hyps[self.size :]

    def worst(self) -> float:
        return self.hyps[-1][0] if len(self.hyps) >= self.size else -math.inf


def _step(logp, scores, groups, generated, penalty, eos_ids, length_penalty):
    """Every group's next beams, group by group: (source row, token) per row and the new scores."""
    n, nb, vocab = logp.shape
    num_groups = len(groups[0])
    gs = nb // num_groups
    gen_len = generated.shape[1] + 1
    src, tokens, new_scores = [0] * (n * nb), [0] * (n * nb), scores.clone()
    counts = torch.zeros(n, vocab, device=logp.device)  # tokens chosen at this step by earlier groups
    for gi in range(num_groups):
        lo = gi * gs
        lp = logp[:, lo : lo + gs]
        if gi and penalty:
            lp = lp - penalty * counts[:, None, :]
        cand = (lp + scores[:, lo : lo + gs, None]).view(n, -1)
        # Enough candidates that `gs` of them continue even if every EOS id ranks on top.
        top_s, top_i = (t.tolist() for t in cand.topk((len(eos_ids) + 1) * gs, dim=-1))
        chosen_rows, chosen_tokens = [], []
        for i in range(n):
            g, base = groups[i][gi], i * nb + lo
            picks = _pick(g, top_s[i], top_i[i], vocab, eos_ids, generated, base, gen_len, length_penalty)
            for b, (beam, token, score) in enumerate(picks):
                src[base + b], tokens[base + b] = base + beam, token
                if score is not None:  # None: a finished group, whose filler tokens penalise nobody
                    new_scores[i, lo + b] = score
                    chosen_rows.append(i)
                    chosen_tokens.append(token)
        index = (torch.tensor(chosen_rows, dtype=torch.long), torch.tensor(chosen_tokens, dtype=torch.long))
        counts.index_put_(
            tuple(t.to(logp.device) for t in index), counts.new_ones(len(chosen_rows)), accumulate=True
        )
    return src, tokens, new_scores


def _pick(g: _Group, top_s, top_i, vocab, eos_ids, generated, base, gen_len, length_penalty):
    """One group's continuations, best first: (source beam, token, score) for each of its beams."""
    if g.done:  # keep the beams in place; their filler tokens are never read
        return [(b, 0, None) for b in range(g.size)]
    picks = []
    for rank, (score, flat) in enumerate(zip(top_s, top_i, strict=True)):
        beam, token = divmod(flat, vocab)
        if token in eos_ids:
            # Only an EOS among the group's top `size` candidates finishes a hypothesis (as HF does).
            if rank < g.size:
                g.add(score / gen_len**length_penalty, generated[base + beam].tolist())
            continue
        picks.append((beam, token, score))
        if len(picks) == g.size:
            break
    # Done when no running beam can beat the worst kept hypothesis (HF's early_stopping=False rule).
    g.done = g.worst() >= picks[0][2] / gen_len**length_penalty
    return picks


# ----------------------------------------------------------------------------------------------
# Left-padded batches: positions, cache, last logits


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (left padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def last_logits(model: Any, input_ids, attention_mask, position_ids, cache: Any = None) -> torch.Tensor:
    """Logits at the last position of every (left-padded) row: [rows, vocab]."""
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    )
    params = inspect.signature(model.forward).parameters
    if cache is not None:
        # transformers 5.25 renamed past_key_values to cache (the old name warns, and goes in 5.40);
        # a model whose forward predates the rename names only the old one.
        old = "past_key_values" in params and "cache" not in params
        kwargs.update({"past_key_values" if old else "cache": cache, "use_cache": True})
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # [rows, 1, vocab] instead of [rows, T, vocab]
    return model(**kwargs).logits[:, -1, :]
