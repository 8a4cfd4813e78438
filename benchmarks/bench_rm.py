"""One reward-model training step (forward, backward, AdamW): shared-prompt packing vs padded sequences.

`python benchmarks/bench_rm.py [--cpu-smoke] [--providers a,b] [--profile] [--out-dir DIR]`
appends to results/rm_step.csv (GPU: a Llama-3.2-1B-like random-init reward model in bf16) or
rm_step_cpu_smoke.csv (the tiny Llama) and regenerates rm_step.md.

Every provider trains the same Bradley-Terry loss (every pair of a query's responses with different
scores) on the same G random queries per step (k responses of R tokens after a P-token prompt),
from the same weights (`AutoModelForSequenceClassification`, one label; a fresh copy per provider):
- `rrhf-fast/packed`: as `rrhf-fast train-rm` runs it: queries packed into micro-batches of at most
  `--max-tokens` tokens, each prompt once, the rewards read from the packed row
  (rrhf_fast.models.reward.packed_rewards), the loss of rrhf_fast.objectives.reward;
- `padded/pairs`: the pairwise recipe (TRL's RewardTrainer and most reward-model scripts): each
  ordered pair (better, worse) is two right-padded sequences prompt + response, every pair of the
  step in one padded batch through transformers' own forward and pooling; k(k-1)/2 pairs per query;
- `padded/responses`: each response once, prompt + response right-padded, one batch per step, the
  pairs formed from the k rewards (what packing saves beyond that is the k-1 prompt copies).
tokens/s counts the useful tokens (each prompt once plus the responses) for every provider; the
FLOP count is the same formula for all (useful tokens only, rm_flops).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from itertools import combinations

import common
import torch
import torch.nn.functional as F
import workload

from rrhf_fast.data.packing import TokenizedExample, pack_tokenized, plan_microbatches
from rrhf_fast.models.reward import packed_rewards
from rrhf_fast.objectives.reward import reward_loss

PROVIDERS = ("rrhf-fast/packed", "padded/pairs", "padded/responses")
HEADLINE = (4, 512)  # (k, prompt length)
GPU_CONFIGS = [(k, p) for p in (128, 512, 2048) for k in (2, 4, 8)]
RESPONSE_LEN = 128
SMOKE_HEADLINE, SMOKE_CONFIGS, SMOKE_RESPONSE_LEN = (2, 32), [(4, 32), (4, 64)], 8
SETUP = "{dtype} weights, torch AdamW, Bradley-Terry over every pair"
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def build_reward_model(size: str, device: torch.device, dtype: torch.dtype):
    """workload.build_llama's model as a one-label sequence-classification model (same backbone)."""
    from transformers import AutoModelForSequenceClassification

    lm = workload.build_llama(size, device, dtype)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    torch.manual_seed(1)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.model.load_state_dict(lm.model.state_dict())
    return model.train()


def queries(num: int, k: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list:
    """Random ids below the special tokens (so no pad id inside the text) and distinct scores."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab - 3, (n,), generator=gen).tolist()

    def scores() -> list[float]:
        return torch.randperm(k, generator=gen).float().tolist()

    return [
        TokenizedExample(ids(prompt_len), [ids(response_len) for _ in range(k)], scores()) for _ in range(num)
    ]


def packed_step(model, optimizer, items, max_tokens: int, device) -> Callable[[], float]:
    """The step's loss, its gradients, and an optimizer step (none with optimizer None)."""
    plan = plan_microbatches([it.packed_len for it in items], max_tokens)

    def step() -> float:
        total = 0.0
        for group in plan:
            batch = pack_tokenized([items[i] for i in group]).to(device)
            rewards = packed_rewards(model, batch, attn="auto")
            out = reward_loss(
                rewards, batch.scores, batch.response_query, batch.num_queries, normalizer=len(items)
            )
            out.loss.backward()
            total += out.loss.item()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total

    return step


def padded_step(model, optimizer, items, pairs: bool, device) -> Callable[[], float]:
    pad_id = model.config.pad_token_id

    def step() -> float:
        seqs, index = [], []  # index: per query, its (better, worse) row pairs
        for q in items:
            base = len(seqs)
            order = [
                (i, j) for i, j in combinations(range(len(q.response_ids)), 2) if q.scores[i] != q.scores[j]
            ]
            order = [(i, j) if q.scores[i] > q.scores[j] else (j, i) for i, j in order]
            if pairs:
                for i, j in order:
                    index.append((len(seqs), len(seqs) + 1))
                    seqs += [q.prompt_ids + q.response_ids[i], q.prompt_ids + q.response_ids[j]]
            else:
                index += [(base + i, base + j) for i, j in order]
                seqs += [q.prompt_ids + r for r in q.response_ids]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
        better, worse = (torch.tensor(x, device=device) for x in zip(*index, strict=True))
        # The mean over a query's pairs, then over queries: the same loss as the packed provider.
        per_pair = -F.logsigmoid(rewards[better] - rewards[worse])
        counts = [sum(1 for i, j in combinations(range(len(q.response_ids)), 2) if q.scores[i] != q.scores[j])
                  for q in items]  # fmt: skip
        weights = torch.cat([torch.full((c,), 1.0 / c) for c in counts]).to(device)
        loss = (per_pair * weights).sum() / len(items)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def rm_flops(model, items) -> float:
    """Useful forward + backward FLOPs: 6 per decoder linear parameter per useful token, plus the
    attention pairs the task needs (workload.model_flops without the lm_head; the head is 1 x D)."""
    linear = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pairs = 0
    for it in items:
        p = len(it.prompt_ids)
        pairs += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2 for r in it.response_ids)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * pairs
    return 6.0 * linear * workload.useful_tokens(items) + attention


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens-per-step", type=int, default=16384, help="useful tokens per optimizer step")
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch budget of rrhf-fast/packed")
    args = p.parse_args(argv)
    device, smoke = common.resolve_device(args)
    dtype = torch.float32 if smoke else torch.bfloat16
    headline, configs, response_len = (
        (SMOKE_HEADLINE, SMOKE_CONFIGS, SMOKE_RESPONSE_LEN)
        if smoke
        else (HEADLINE, GPU_CONFIGS, RESPONSE_LEN)
    )
    rec = common.Recorder("rm_step", args.out_dir, device, smoke)
    for pass_configs in ([headline], [c for c in configs if c != headline]):
        for provider in common.selected(PROVIDERS, args.providers):
            print(provider, flush=True)
            model = build_reward_model("tiny" if smoke else "1b", device, dtype)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
            for k, prompt_len in pass_configs:
                g = 4 if smoke else max(2, args.tokens_per_step // (prompt_len + k * response_len))
                items = queries(
                    g, k, prompt_len, response_len, model.config.vocab_size, seed=k * 7919 + prompt_len
                )
                if provider == "rrhf-fast/packed":
                    step = packed_step(model, optimizer, items, args.max_tokens, device)
                else:
                    step = padded_step(model, optimizer, items, provider == "padded/pairs", device)
                config = f"k={k} P={prompt_len} R={response_len}"
                sweep = f"P={prompt_len} R={response_len}; " + SETUP.format(dtype=SHORT[dtype])
                rec.measure("rm_step", sweep, provider, config, k, dtype, step, flops=rm_flops(model, items),
                            tokens=workload.useful_tokens(items), rep_ms=500.0)  # fmt: skip
                if args.profile and (k, prompt_len) == headline:
                    rec.profile(f"{provider} {config} (G={len(items)} queries)", step)
                optimizer.zero_grad(set_to_none=True)
            del model, optimizer
            common.free_memory(device)
    print(rec.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
