"""One full RRHF training step (forward, backward, optimizer): rrhf-fast vs the official-style reference.

`python benchmarks/bench_step.py [--cpu-smoke] [--providers a,b] [--profile] [--out-dir DIR]`
appends to results/step.csv (GPU: a Llama-3.2-1B-like random-init model in bf16) or
step_cpu_smoke.csv (a tiny Llama) and regenerates step.md.

Providers, all on the same G random queries per step (k responses of R tokens after a P-token
prompt), the same model weights (a fresh copy per provider, same seed) and the same AdamW:
- `reference`: benchmarks/reference_step.py, one query per forward as the authors' scripts run it
  (k padded copies, full [k, L, V] logits, fp32 log_softmax), gradients accumulated over the step;
- `rrhf-fast`: pack + packed_logprobs + rrhf_loss with the same micro-batching (one query per
  forward), so time and memory compare like for like;
- `rrhf-fast/packed`: as the trainer runs it, queries packed into micro-batches of at most
  `--max-tokens` tokens.
tokens/s counts the useful tokens (each prompt once plus the responses) for every provider; MFU is
the same useful-FLOP count (workload.model_flops) over time and the GPU's dense bf16 peak.

Every provider's timed step starts from the tokenised queries on the host, as the trainer's does:
rrhf-fast packs its micro-batches (`pack_tokenized`) and the reference collates its padded copies
(`reference_step.collate`) inside the step, and both copy them to the GPU there.

Not the trainer's numerics: on the GPU the weights are bf16 and torch AdamW keeps its states in
bf16 too, for every provider (the trainer's default is fp32 master weights under bf16 autocast
with 8-bit AdamW); the report's section heading says so (SETUP).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import common
import torch
import workload
from reference_step import reference_step

from rrhf_fast.data.packing import pack_tokenized, plan_microbatches
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.models.logprobs import packed_logprobs

PROVIDERS = ("rrhf-fast", "rrhf-fast/packed", "reference")
RESPONSE_LEN = 128
HEADLINE = (6, 512)  # the step target's shape: k = 6, prompt 512, responses 128
GPU_CONFIGS = [(k, p) for p in (128, 512, 2048) for k in (2, 4, 8)]  # (k, prompt length)
# do_bench's timed window (ms) at the headline: a step of ~16k tokens of a 1B model takes a few
# hundred ms, so 500 ms timed it once or twice; 1.5 s times it several times.
HEADLINE_REP_MS = 1500.0
SMOKE_HEADLINE, SMOKE_CONFIGS, SMOKE_RESPONSE_LEN = (2, 8), [(3, 8), (3, 16)], 4
# What every provider runs, in the report's section heading (the sweep label).
SETUP = "{dtype} weights, torch AdamW ({dtype} states), packing in the step"
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def ours_step(model, optimizer, items, plan, device, attn: str, impl: str) -> Callable[[], None]:
    num_queries = sum(len(group) for group in plan)

    def step():
        for group in plan:  # packed and copied in the step, as the reference collates in its own
            batch = pack_tokenized([items[i] for i in group]).to(device)
            logp = packed_logprobs(model, batch, attn=attn, impl=impl)
            out = rrhf_loss(
                logp,
                batch.token_response,
                batch.response_query,
                batch.ranks,
                prompt_len=batch.prompt_len,
                normalizer=num_queries,  # the mean over every query of the step
                k_max=batch.max_responses,
                impl=impl,
            )
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_step(provider: str, model, optimizer, items, device, args) -> Callable[[], None]:
    if provider == "reference":
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        return lambda: reference_step(model, optimizer, items, pad_id=pad_id)
    if provider == "rrhf-fast":
        plan = [[i] for i in range(len(items))]
    else:
        plan = plan_microbatches([it.packed_len for it in items], args.max_tokens)
    return ours_step(model, optimizer, items, plan, device, args.attn, args.impl)


def prepare(provider, model, optimizer, k, prompt_len, response_len, device, smoke, args):
    """The step function of one provider and config, and its queries."""
    g = 2 if smoke else queries_per_step(k, prompt_len, response_len, args.tokens_per_step)
    vocab = model.config.vocab_size
    items = workload.random_queries(g, k, prompt_len, response_len, vocab, seed=k * 7919 + prompt_len)
    return make_step(provider, model, optimizer, items, device, args), items


def queries_per_step(k: int, prompt_len: int, response_len: int, tokens_per_step: int) -> int:
    return max(2, tokens_per_step // (prompt_len + k * response_len))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens-per-step", type=int, default=16384, help="useful tokens per optimizer step")
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch budget of rrhf-fast/packed")
    p.add_argument("--attn", default="auto", help="rrhf-fast attention backend: auto|varlen|flex|dense")
    p.add_argument("--impl", default="auto", help="rrhf-fast kernel implementation: auto|triton|torch")
    p.add_argument(
        "--micro-batch-tokens",
        default="",
        help="comma-separated micro-batch budgets: rrhf-fast/packed at the headline config with each, "
        "in steps of the largest (where the memory saved turns into throughput); a sweep",
    )
    args = p.parse_args(argv)
    device, smoke = common.resolve_device(args)
    dtype = torch.float32 if smoke else torch.bfloat16
    headline, configs, response_len = (
        (SMOKE_HEADLINE, SMOKE_CONFIGS, SMOKE_RESPONSE_LEN)
        if smoke
        else (HEADLINE, GPU_CONFIGS, RESPONSE_LEN)
    )
    rec = common.Recorder("step", args.out_dir, device, smoke)
    providers = common.selected(PROVIDERS, args.providers)
    # The headline config first for every provider (a run cut short by its time limit still
    # compares them there), then the micro-batch budgets, then the (k, prompt length) sweep.
    budgets = [int(b) for b in args.micro_batch_tokens.split(",") if b.strip()]
    if not args.sweep_only:
        measure_pass(rec, providers, [headline], args, device, dtype, smoke, response_len, headline)
    if budgets and not args.headline_only:
        micro_batch_pass(rec, budgets, args, device, dtype, smoke, response_len, headline)
    if not args.headline_only:
        measure_pass(rec, providers, configs, args, device, dtype, smoke, response_len, headline)
    print(rec.finish())
    return 0


def measure_pass(rec, providers, pass_configs, args, device, dtype, smoke, response_len, headline) -> None:
    """Every provider on every config of the pass, a fresh model and optimizer per provider."""
    for provider in providers:
        print(provider, flush=True)
        model = workload.build_llama("tiny" if smoke else "1b", device, dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        for k, prompt_len in pass_configs:
            step, items = prepare(
                provider, model, optimizer, k, prompt_len, response_len, device, smoke, args
            )
            config = f"k={k} P={prompt_len} R={response_len}"
            rec.measure(
                "rrhf_step",
                f"P={prompt_len} R={response_len}; " + SETUP.format(dtype=SHORT[dtype]),
                provider,
                config,
                k,
                dtype,
                step,
                flops=workload.model_flops(model, items),
                tokens=workload.useful_tokens(items),
                rep_ms=HEADLINE_REP_MS if (k, prompt_len) == headline else 500.0,
            )
            if args.profile and (k, prompt_len) == headline:
                rec.profile(f"{provider} {config} (G={len(items)} queries)", step)
            optimizer.zero_grad(set_to_none=True)  # a step that failed half-way leaves gradients
        del model, optimizer
        common.free_memory(device)


def micro_batch_pass(rec, budgets, args, device, dtype, smoke, response_len, headline) -> None:
    """rrhf-fast/packed at the headline config, one step of the largest budget's tokens, packed into
    micro-batches of each budget: the reference (one query per forward) has no such knob."""
    k, prompt_len = headline
    model = workload.build_llama("tiny" if smoke else "1b", device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    config = f"k={k} P={prompt_len} R={response_len}"
    for budget in budgets:
        run_args = argparse.Namespace(**{**vars(args), "max_tokens": budget, "tokens_per_step": max(budgets)})
        step, items = prepare(
            "rrhf-fast/packed", model, optimizer, k, prompt_len, response_len, device, smoke, run_args
        )
        rec.measure(
            "rrhf_step",
            f"micro-batch tokens, {config}; " + SETUP.format(dtype=SHORT[dtype]),
            "rrhf-fast/packed",
            f"{config} micro-batch={budget}",
            budget,
            dtype,
            step,
            flops=workload.model_flops(model, items),
            tokens=workload.useful_tokens(items),
            rep_ms=500.0,
        )
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer
    common.free_memory(device)


if __name__ == "__main__":
    sys.exit(main())
