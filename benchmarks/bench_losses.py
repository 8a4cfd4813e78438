"""One optimizer step of a ranking loss over k responses: the packed path vs padded pair copies.

`python benchmarks/bench_losses.py [--cpu-smoke] [--providers a,b] [--profile] [--out-dir DIR]`
appends to results/loss_step.csv (GPU: a Llama-3.2-1B-like random-init model in bf16) or
loss_step_cpu_smoke.csv (the tiny Llama, fp32; with `--cpu-rows` loss_step_cpu.csv, committed) and
regenerates the markdown report beside it.

The loss is SimPO generalised to k responses (`rrhf-fast train --loss simpo`, objectives/pairwise.py):
per query the mean over its pairs of different scores of -log sigmoid(beta (r_w - r_l) - gamma),
r the mean token log-prob. Every provider trains it on the same G random queries per step (k
responses of R tokens after a P-token prompt, P : R = 4 : 1, distinct scores), from the same
weights (a fresh copy per provider, same seed), with torch AdamW:
- `rrhf-fast/packed`: as `train --loss simpo` runs it: queries packed into micro-batches of at most
  `--max-tokens` tokens, each prompt once and each response once, token log-probs through the fused
  kernel (no [T, V] logits), the loss on the [G, k] layout (objectives/ranking.py);
- `padded/all-pairs`: how pairwise trainers (TRL's CPOTrainer, DPOTrainer) consume a ranked list:
  each of the k(k-1)/2 ordered pairs becomes a chosen and a rejected row, prompt + response
  right-padded, all rows of the step in one batch through the model's own forward (full logits,
  fp32 log_softmax, gather); the same loss value as the packed provider;
- `padded/best-pairs`: the cheaper k-1 pairs (best vs each other response), the same padded recipe;
  its loss is `--pairs best`, a different average, shown for its cost.
Peak memory: on CUDA `torch.cuda.max_memory_allocated` during the step; on the CPU the tensor bytes
alive at the step's peak as rrhf_fast.planning.memtrack counts them (weights, optimizer states,
gradients, activations; not the process RSS).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import permutations

import common
import torch
import torch.nn.functional as F
import workload

from rrhf_fast.data.packing import TokenizedExample, pack_tokenized, plan_microbatches
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.objectives.pairwise import simpo_loss
from rrhf_fast.objectives.ranking import list_inputs, lists_of

PROVIDERS = ("rrhf-fast/packed", "padded/all-pairs", "padded/best-pairs")
KS = (2, 4, 8)
GPU_SHAPE, SMOKE_SHAPE = (512, 128), (32, 8)  # (prompt, response): 4 : 1
BETA, GAMMA = 2.0, 0.5  # the SimPO defaults of --simpo-beta / --simpo-gamma
SETUP = "{dtype} weights, torch AdamW, SimPO over the pairs of k responses"
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def queries(num: int, k: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list:
    """Random ids, distinct scores (every pair of a query is a pair of the loss)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def scores() -> list[float]:
        return torch.randperm(k, generator=gen).float().tolist()

    return [
        TokenizedExample(ids(prompt_len), [ids(response_len) for _ in range(k)], scores()) for _ in range(num)
    ]


def packed_step(model, optimizer, items, max_tokens: int, device, impl: str = "auto") -> Callable[[], float]:
    """The step's loss, its gradients, and an optimizer step (none with optimizer None)."""
    plan = plan_microbatches([it.packed_len for it in items], max_tokens)

    def step() -> float:
        total = 0.0
        for group in plan:
            batch = pack_tokenized([items[i] for i in group])
            gpu = batch.to(device)
            logp = packed_logprobs(model, gpu, attn="auto", impl=impl)
            sums = logp.new_zeros(batch.num_responses).index_add(0, gpu.token_response, logp)
            lists = lists_of(batch.response_query, batch.num_queries, batch.max_responses)
            x = list_inputs(sums, batch.response_len, batch.ranks, batch.scores, lists)
            out = simpo_loss(x, beta=BETA, gamma=GAMMA, normalizer=len(items))
            out.loss.backward()
            total += out.loss.item()
        _update(optimizer)
        return total

    return step


def pair_rows(items, best_only: bool) -> tuple[list[list[int]], list[int], list[tuple[int, int, int]]]:
    """Rows (prompt + response), each row's prompt length, and per pair (query, chosen row, rejected row)."""
    rows, prompt_lens, pairs = [], [], []
    for q, it in enumerate(items):
        best = max(range(len(it.scores)), key=lambda i: (it.scores[i], -i))
        for i, j in permutations(range(len(it.response_ids)), 2):
            if it.scores[i] > it.scores[j] and (not best_only or i == best):
                pairs.append((q, len(rows), len(rows) + 1))
                rows += [it.prompt_ids + it.response_ids[i], it.prompt_ids + it.response_ids[j]]
                prompt_lens += [len(it.prompt_ids)] * 2
    return rows, prompt_lens, pairs


def padded_step(model, optimizer, items, best_only: bool, device, pad_id: int = 0) -> Callable[[], float]:
    def step() -> float:
        rows, prompt_lens, pairs = pair_rows(items, best_only)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (s, p) in enumerate(zip(rows, prompt_lens, strict=True)):
            ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
            labels[r, p : len(s)] = torch.tensor(s[p:])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        logp = logits.float().log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        keep = target != -100
        r = (logp * keep).sum(1) / keep.sum(1)
        q, w, lo = (torch.tensor(c, device=device) for c in zip(*pairs, strict=True))
        per_pair = -F.logsigmoid(BETA * (r[w] - r[lo]) - GAMMA)
        counts = torch.zeros(len(items), device=device).index_add(0, q, torch.ones_like(per_pair))
        loss = (per_pair / counts[q]).sum() / len(items)  # per query the mean over its pairs
        loss.backward()
        _update(optimizer)
        return loss.item()

    return step


def _update(optimizer) -> None:
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def cpu_peak(model, optimizer) -> Callable[[Callable[[], object]], tuple[float, float]]:
    """On the CPU: (peak tensor GiB of one call, that minus what was alive before it), by memtrack."""

    def measure(fn: Callable[[], object]) -> tuple[float, float]:
        from rrhf_fast.kernels import ops
        from rrhf_fast.planning.memtrack import MemoryTracker

        tracker = MemoryTracker(inline=ops.BODIES)
        for p in model.parameters():
            tracker.track(p, "weights")
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker.track(v, "optimizer")
        before = tracker.total
        with tracker:
            fn()
        return tracker.peak / common.GIB, (tracker.peak - before) / common.GIB

    return measure


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--tokens-per-step", type=int, default=16384, help="useful tokens per optimizer step (GPU)"
    )
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch budget of rrhf-fast/packed")
    p.add_argument("--cpu-rows", action="store_true", help="on the CPU: write results/loss_step_cpu.* (kept)")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="responses per query to measure (2,4,8)")
    args = p.parse_args(argv)
    device, smoke = common.resolve_device(args)
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len, response_len = SMOKE_SHAPE if smoke else GPU_SHAPE
    # --cpu-rows: the smoke shapes, kept as results (loss_step_cpu.csv / .md), since the issue that asked
    # for this comparison wants CPU rows beside the GPU ones; plain smoke runs stay uncommitted.
    cpu_rows = args.cpu_rows and device.type == "cpu"
    rec = common.Recorder(
        "loss_step_cpu" if cpu_rows else "loss_step", args.out_dir, device, smoke and not cpu_rows
    )
    for provider in common.selected(PROVIDERS, args.providers):
        print(provider, flush=True)
        model = workload.build_llama("tiny" if smoke else "1b", device, dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        for k in [int(v) for v in args.ks.split(",")]:
            g = 4 if smoke else max(2, args.tokens_per_step // (prompt_len + k * response_len))
            items = queries(g, k, prompt_len, response_len, model.config.vocab_size, seed=k)
            if provider == "rrhf-fast/packed":
                step = packed_step(model, optimizer, items, args.max_tokens, device)
            else:
                step = padded_step(model, optimizer, items, provider == "padded/best-pairs", device)
            copies = {
                "rrhf-fast/packed": 1,
                "padded/all-pairs": k * (k - 1),
                "padded/best-pairs": 2 * (k - 1),
            }
            config = f"k={k} P={prompt_len} R={response_len} G={g}"
            sweep = f"P={prompt_len} R={response_len}; " + SETUP.format(dtype=SHORT[dtype])
            peak = cpu_peak(model, optimizer) if device.type == "cpu" else None
            rec.measure("loss_step", sweep, provider, config, k, dtype, step,
                        tokens=workload.useful_tokens(items), rep_ms=500.0, peak_fn=peak,
                        note=f"{copies[provider]} prompt copies per query" if provider != PROVIDERS[0]
                        else "1 prompt copy per query")  # fmt: skip
            if args.profile and k == 4:
                rec.profile(f"{provider} {config}", step)
            optimizer.zero_grad(set_to_none=True)
        del model, optimizer
        common.free_memory(device)
    print(rec.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
