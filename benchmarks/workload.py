"""The workload of the step and attention benchmarks: the model, the queries and their useful FLOPs."""

from __future__ import annotations

import torch

from rrhf_fast.models.wrapping import unwrap

# Llama-3.2-1B-like (random init): tied embeddings, GQA 32/8 heads of 64, SwiGLU 8192.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    pad_token_id=128004,
)


def build_llama(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-initialised Llama causal LM: "1b" (LLAMA_1B) or "tiny" (models.tiny), in train mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rrhf_fast.models.tiny import tiny_config

    config = LlamaConfig(**LLAMA_1B) if size == "1b" else tiny_config("llama")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def random_queries(num_queries: int, k: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """Tokenised queries (rrhf_fast.data.packing.TokenizedExample) of random ids and distinct scores."""
    from rrhf_fast.data.packing import TokenizedExample

    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    return [
        TokenizedExample(
            ids(prompt_len), [ids(response_len) for _ in range(k)], torch.randn(k, generator=gen).tolist()
        )
        for _ in range(num_queries)
    ]


def useful_tokens(items) -> int:
    """The tokens the data holds: each prompt once plus every response. Both providers are credited
    with this count; the reference's k prompt copies and its padding are overhead, not work."""
    return sum(it.packed_len for it in items)


def model_flops(model, items) -> float:
    """Useful forward + backward FLOPs of a causal LM on `items`, the same formula for every provider.

    - Decoder matmuls: 6 FLOPs per linear-layer parameter per useful token (2 forward, 4 backward).
    - lm_head: 6 * V * D per response token only: a prompt token's logits are never used.
    - Attention: QK^T and PV are 4 * head_dim * heads FLOPs per attended (query, key) pair forward,
      x3 with backward, for the pairs the task needs: causal within the prompt, and every response
      token attends to the whole prompt and causally to its own response.
    Embedding lookups, norms, activations and the optimizer are not counted (as usual for MFU).
    """
    base = unwrap(model)
    decoder = base.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    head = base.get_output_embeddings().weight.numel()
    cfg = base.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pairs = 0
    for it in items:
        p = len(it.prompt_ids)
        pairs += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2 for r in it.response_ids)
    responses = sum(len(r) for it in items for r in it.response_ids)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * pairs
    return 6.0 * (linear * useful_tokens(items) + head * responses) + attention
