"""The models of the memory-fit study (memory_fit.py), built from published dimensions, no downloads.

Each is constructed on the meta device (no memory), then its weights are materialised directly on
the GPU with random values; for QLoRA each decoder linear is quantised to NF4 as it is materialised,
so no full-precision copy of the model ever exists. The trainer's own `finish_model` then applies
the method (k-bit preparation, gradient checkpointing, LoRA adapters).
"""

from __future__ import annotations

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.models.loading import finish_model, import_bitsandbytes
from rrhf_fast.models.logprobs import prepare_model

LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
              bos_token_id=128000, eos_token_id=128001)  # fmt: skip
SHAPES = {  # (architecture, the model's config.json dimensions)
    "Llama-3.2-1B": ("llama", dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    "Llama-3.2-3B": ("llama", dict(LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)),
    "Llama-3.1-8B": ("llama", dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "Qwen2.5-7B": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
                                 max_position_embeddings=32768, use_sliding_window=False,
                                 bos_token_id=151643, eos_token_id=151643)),
}  # fmt: skip
ADAPTER = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.0)
METHODS = {
    "full": dict(dtype="bfloat16"),
    "lora": dict(dtype="bfloat16", **ADAPTER),
    "qlora": dict(load_in_4bit=True, **ADAPTER),
    "reference": dict(dtype="bfloat16"),
}

# ---------------------------------------------------------------------------------------------
# Construction


def method_flags(shape: str, method: str) -> TrainConfig:
    """The trainer's flags for a method: what finish_model and forward_backward read."""
    return TrainConfig(model=shape, data="-", output_dir="-", optim="adamw8bit", gradient_checkpointing=True,
                       **METHODS[method])  # fmt: skip


def model_config(shape: str, smoke: bool):
    from transformers import LlamaConfig, Qwen2Config

    from rrhf_fast.models.tiny import tiny_config

    if smoke:
        return tiny_config("llama")
    arch, dims = SHAPES[shape]
    return (LlamaConfig if arch == "llama" else Qwen2Config)(**dims)


def build(shape: str, method: str, device: torch.device, smoke: bool) -> tuple[torch.nn.Module, TrainConfig]:
    """Random-weight model of `shape` on `device`, prepared for `method` as the trainer prepares it."""
    from transformers import AutoModelForCausalLM

    flags = method_flags(shape, method)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, smoke), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")  # fmt: skip
    if flags.load_in_4bit:
        quantize_linears(model, device)
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader marks
    materialize(model, device)
    model = finish_model(model, flags)
    if method != "reference":  # the reference runs the plain HF forward with logits
        prepare_model(model)
    return model, flags


def quantize_linears(model: torch.nn.Module, device: torch.device) -> None:
    """Every decoder linear as a bitsandbytes NF4 layer (double quantisation, bf16 compute), one layer's
    bf16 weight at a time on the device; the lm_head stays as it is (as transformers leaves it)."""
    bnb = import_bitsandbytes("--load-in-4bit")
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, layer in list(module.named_children()):
            if type(layer) is not torch.nn.Linear or layer is head:
                continue
            weight = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16, device=device)
            quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, layer.bias is not None,
                                          torch.bfloat16, quant_type="nf4", device="meta")  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(weight.normal_(0.0, 0.02), compress_statistics=True,
                                                 quant_type="nf4").to(device)  # fmt: skip
            if layer.bias is not None:
                quantized.bias = torch.nn.Parameter(
                    torch.zeros(layer.out_features, dtype=torch.bfloat16, device=device)
                )
            setattr(module, name, quantized)


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Meta parameters become random weights on `device` (tied ones stay tied); rotary tables are
    computed afresh (they are buffers computed in __init__, empty on the meta device)."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if id(p) not in made:
                fresh = torch.empty_like(p, device=device)
                fresh.normal_(0.0, 0.02) if p.dim() >= 2 else fresh.fill_(1.0 if "weight" in name else 0.0)
                made[id(p)] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)
            setattr(module, name, made[id(p)])
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if hasattr(child, "inv_freq"):
                with torch.device(device):
                    setattr(module, name, type(child)(config=child.config))
