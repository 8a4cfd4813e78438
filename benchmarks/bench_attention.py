"""Attention ablation: shared-prompt packing vs k padded copies, per attention backend.

`python benchmarks/bench_attention.py [--cpu-smoke] [--providers a,b] [--profile] [--out-dir DIR]`
appends to results/attention.csv (or attention_cpu_smoke.csv) and regenerates attention.md.

Same model (the bench_step one), same G queries, same token_logprobs kernel and the same per-token
upstream gradient; what differs is the layout and the attention backend:
- `shared-prompt/<dense|flex|varlen>`: rrhf_fast.models.logprobs.packed_logprobs, each prompt once in one
  unpadded row, the rrhf_shared_prompt attention with that backend;
- `padded/<sdpa|flex_attention|flash_attention_2>`: the k copies of prompt + response of every query
  as rows of one right-padded batch [G*k, L], transformers' own attention of that name.
G queries per forward, G = max(1, --padded-tokens // (k * (P + R))): the same G for every provider.
Timed: the decoder forward, the log-probs of the response tokens, and the backward into the
weights (no optimizer). tokens/s and MFU count the useful tokens and FLOPs (workload.model_flops).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import common
import torch
import workload
from reference_step import IGNORE, collate

from rrhf_fast.data.packing import pack_tokenized
from rrhf_fast.kernels import token_logprobs
from rrhf_fast.models.logprobs import packed_logprobs

# provider -> (layout, backend); shared-prompt backends are rrhf-fast's, padded ones transformers'.
PROVIDERS = {
    "shared-prompt/dense": ("shared", "dense"),
    "shared-prompt/flex": ("shared", "flex"),
    "shared-prompt/varlen": ("shared", "varlen"),
    "padded/sdpa": ("padded", "sdpa"),
    "padded/flex_attention": ("padded", "flex_attention"),
    "padded/flash_attention_2": ("padded", "flash_attention_2"),
}
CPU_PROVIDERS = ("shared-prompt/dense", "padded/sdpa")
RESPONSE_LEN = 128
HEADLINE = (6, 512)
GPU_CONFIGS = [
    HEADLINE,
    (2, 512),
    (4, 512),
    (8, 512),
    (6, 128),
    (6, 2048),
]  # (k, prompt length), headline first
SMOKE_CONFIGS, SMOKE_RESPONSE_LEN = [(2, 8), (3, 8)], 4


def shared_call(model, items, grad, backend: str, impl: str, device) -> Callable[[], None]:
    batch = pack_tokenized(items).to(device)

    def call():
        model.zero_grad(set_to_none=True)
        packed_logprobs(model, batch, attn=backend, impl=impl).backward(grad)

    return call


def padded_call(model, items, grad, backend: str, impl: str, device) -> Callable[[], None]:
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    input_ids, mask, labels = collate(items, pad_id, device)
    # the hidden row at position t predicts the label at t + 1; row-major = the packed target order
    valid = labels[:, 1:] != IGNORE
    width = labels.shape[1]
    rows = (
        torch.arange(labels.shape[0], device=device)[:, None] * width + torch.arange(width - 1, device=device)
    )[valid]
    targets = labels[:, 1:][valid]
    model.set_attn_implementation(backend)
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def call():
        model.zero_grad(set_to_none=True)
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        token_logprobs(hidden.flatten(0, 1), head.weight, rows, targets, impl=impl).backward(grad)

    return call


def unavailable(provider: str, device: torch.device, smoke: bool) -> str | None:
    if smoke and provider not in CPU_PROVIDERS:
        return "CUDA only (CPU smoke runs dense / sdpa)"
    if provider == "padded/flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--padded-tokens",
        type=int,
        default=16384,
        help="G = max(1, this // (k * (P + R))) queries per forward",
    )
    p.add_argument("--impl", default="auto", help="token_logprobs implementation: auto|triton|torch")
    args = p.parse_args(argv)
    device, smoke = common.resolve_device(args)
    dtype = torch.float32 if smoke else torch.bfloat16
    configs, response_len = (SMOKE_CONFIGS, SMOKE_RESPONSE_LEN) if smoke else (GPU_CONFIGS, RESPONSE_LEN)
    headline = configs[0] if smoke else HEADLINE
    if args.headline_only or args.sweep_only:
        configs = [c for c in configs if (c == headline) == args.headline_only]
    rec = common.Recorder("attention", args.out_dir, device, smoke)
    model = workload.build_llama("tiny" if smoke else "1b", device, dtype)
    providers = common.selected(PROVIDERS, args.providers)
    for k, prompt_len in configs:
        config = f"k={k} P={prompt_len} R={response_len}"
        sweep = f"P={prompt_len} R={response_len}" if prompt_len == headline[1] else f"k={k} R={response_len}"
        x = k if prompt_len == headline[1] else prompt_len
        g = 2 if smoke else max(1, args.padded_tokens // (k * (prompt_len + response_len)))
        items = workload.random_queries(g, k, prompt_len, response_len, model.config.vocab_size)
        tokens, flops = workload.useful_tokens(items), workload.model_flops(model, items)
        responses = sum(len(r) for it in items for r in it.response_ids)
        grad = torch.rand(responses, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 0.5
        print(config, flush=True)
        for provider in providers:
            reason = unavailable(provider, device, smoke)
            if reason:
                rec.skip("attention_fwd_bwd", sweep, provider, config, x, dtype, reason)
                continue
            layout, backend = PROVIDERS[provider]
            make = shared_call if layout == "shared" else padded_call
            try:
                call = make(model, items, grad, backend, args.impl, device)
            except Exception as exc:  # e.g. an attention implementation this transformers lacks
                rec.skip("attention_fwd_bwd", sweep, provider, config, x, dtype, common.describe(exc))
                continue
            rec.measure(
                "attention_fwd_bwd",
                sweep,
                provider,
                config,
                x,
                dtype,
                call,
                flops=flops,
                tokens=tokens,
                rep_ms=500.0,
            )
            if args.profile and (k, prompt_len) == headline:
                rec.profile(f"{provider} {config} (G={g} queries)", call)
        model.zero_grad(set_to_none=True)
    print(rec.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
