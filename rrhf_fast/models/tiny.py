"""Tiny, random-initialised causal LMs and a byte-level tokenizer built locally.

Tests, the embedded demo and the CPU benchmarks use these: nothing is downloaded. The tokenizer is a
byte-level BPE without merges (every UTF-8 byte is a token), so any text round-trips.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHS = ("llama", "qwen2", "mistral", "gemma2")
# Architectures whose head scales the logits (rrhf_fast.models.logprobs applies the factor): tested too.
SCALED_LOGIT_ARCHS = ("cohere", "granite")

# ChatML (Qwen's, OpenHermes'): each turn "<|im_start|>ROLE\nCONTENT<|im_end|>\n"; the end-of-turn
# token <|im_end|> is also the EOS, as in Qwen2-Instruct.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A few merges, so that tokens cross word boundaries as real BPEs' do: " yes" -> "Ġy" "es".
MERGES = [("Ġ", "y"), ("e", "s"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s")]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens, then <s> (BOS), </s> (EOS), <pad>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_bpe_tokenizer(chatml: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE with MERGES (GPT-2 / Llama 3 style), BOS added; with `chatml`, ChatML's
    special tokens and template (<|im_end|> the EOS). Vocabulary: len(tokenizer)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    specials = ["<s>", "</s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    for special in specials:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if not chatml:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>" if chatml else "</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"] if chatml else None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE if chatml else CHAT_TEMPLATE
    return tokenizer


def build_metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Llama 2, Mistral): a Metaspace pre-tokenizer ("▁" for spaces, one
    prepended to the text), BPE over printable ASCII with a few word merges, <s> added, <unk>."""
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in chars:
        vocab[ch] = len(vocab)
    merges = [("▁", "y"), ("e", "s"), ("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁y", "es")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: str,
    vocab_size: int = 259,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    **overrides,
) -> PretrainedConfig:
    """A small config of one of ARCHS; GQA by default (num_kv_heads < num_heads)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=vocab_size - 3 if vocab_size == 259 else 1,
        eos_token_id=vocab_size - 2 if vocab_size == 259 else 2,
        pad_token_id=vocab_size - 1 if vocab_size == 259 else 0,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    elif arch == "mistral":
        # A sliding window longer than any test sequence: the window path runs, masks nothing.
        cfg = MistralConfig(**common, sliding_window=4096)
    elif arch == "gemma2":
        cfg = Gemma2Config(
            **common,
            head_dim=hidden_size // num_heads,
            query_pre_attn_scalar=hidden_size // num_heads,
            sliding_window=4096,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
    elif arch == "cohere":
        cfg = CohereConfig(**common, logit_scale=0.0625)
    elif arch == "granite":
        cfg = GraniteConfig(**common, logits_scaling=8.0)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS + SCALED_LOGIT_ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> PreTrainedModel:
    """A random-initialised causal LM of `arch`, deterministic in `seed`, in eval mode."""
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny_model(path: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A random-initialised tiny llama and the byte-level tokenizer, saved with save_pretrained."""
    from rrhf_fast.models.loading import quiet_progress_bars

    model = build_tiny_model("llama", seed=seed, hidden_size=hidden_size, num_layers=layers)
    path = Path(path)
    with quiet_progress_bars():
        model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def save_tiny_gguf(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 1,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    source_repo: str | None = None,
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random llama and the ChatML byte-level BPE tokenizer written as one GGUF file with the
    `gguf` package's writer, tensors in `dtype` (float32 or float16: no quantisation, so a loader must
    give back these weights exactly), licence apache-2.0 and, given `source_repo`, the Hub repository
    it says it was converted from; returns (file, the model, the tokenizer) for comparison."""
    tokenizer = build_bpe_tokenizer(chatml=True)
    model = build_tiny_model(
        "llama", seed=seed, vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=layers,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if dtype != torch.float32:
        model = model.to(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_llama_gguf(path, model, tokenizer, source_repo)
    return path, model, tokenizer


def _write_llama_gguf(
    path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, source_repo: str | None = None
) -> None:
    """llama.cpp's layout (convert_hf_to_gguf.py's LlamaModel): its metadata keys, tensor names, and
    q/k rows permuted to its rotary order, which transformers' GGUF reader permutes back."""
    import json

    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("rrhf-fast tiny llama")
    writer.add_license("apache-2.0")
    if source_repo:
        writer.add_source_repo_url(f"https://huggingface.co/{source_repo}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    f16 = model.dtype == torch.float16
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    # the tokenizer as llama.cpp stores a byte-level BPE ("gpt2"): tokens in id order, their types
    # (CONTROL for the special ones, which transformers adds back as special tokens), merges "a b"
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    kinds = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_types(kinds)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head is token_embd itself: the file has no output.weight
        module, suffix = name.rsplit(".", 1)
        array = tensor.detach().cpu().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _llama_cpp_rows(array, heads if "q_proj" in name else kv_heads)
        if array.ndim == 1 and f16:  # llama.cpp keeps norms in float32
            array = array.astype("float32")
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", array.copy(order="C"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_rows(weight, heads: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from halves to interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
