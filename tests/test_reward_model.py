"""rrhf_fast.models.reward: packed rewards == AutoModelForSequenceClassification on each sequence alone.

For the tiny llama / qwen2 / mistral / gemma2 models (fp32): the rewards of ONE packed shared-
prompt batch and the parameter gradients of a non-uniformly weighted sum of them equal those of
transformers' own forward on every `prompt + response` alone, pooled by transformers itself.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rrhf_fast.data.packing import pack, tokenize_example
from rrhf_fast.data.records import Example
from rrhf_fast.errors import ModelError
from rrhf_fast.models.reward import packed_rewards, pooled_rows
from rrhf_fast.models.tiny import ARCHS, build_tiny_model, build_tokenizer, tiny_config

TORCH_THREADS = 1
TOK = build_tokenizer()
EXAMPLES = [
    Example("Name a colour.", ["red", "a deep shade of blue", "green!", "?"], [1.0, 3.0, 2.0, 0.0]),
    Example("2+2=", ["4", "four, I think", "5"], [1.0, 0.5, -1.0]),
    Example("Translate 'chat' into English, please", ["cat", "It means cat."], [2.0, 1.0]),
]


def tiny_reward_model(arch: str, seed: int = 1, **overrides):
    config = tiny_config(arch, **overrides)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():  # transformers starts the head at std 0.02: make rewards and gradients big
        model.score.weight.normal_(0, 1.0)
    return model


def alone_rewards(model, examples):
    """transformers' forward on each prompt + response alone (its own pooling)."""
    out = []
    for ex in examples:
        t = tokenize_example(ex, TOK)
        for resp in t.response_ids:
            out.append(model(input_ids=torch.tensor([t.prompt_ids + resp])).logits[0, 0])
    return torch.stack(out)


def weights(n):
    return torch.linspace(-1.0, 2.0, n)


@pytest.mark.parametrize("attn", ["dense", "varlen"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rewards_equal_each_sequence_alone(arch, attn):
    model = tiny_reward_model(arch)
    reference = copy.deepcopy(model)
    batch = pack(EXAMPLES, TOK)
    rewards = packed_rewards(model, batch, attn=attn)
    expected = alone_rewards(reference, EXAMPLES)
    assert rewards.dtype == torch.float32 and rewards.shape == (batch.num_responses,)
    assert expected.abs().max() > 0.1  # a real signal, not zeros compared with zeros
    assert (rewards - expected).abs().max().item() <= 1e-5
    (rewards * weights(rewards.numel())).sum().backward()
    (expected * weights(expected.numel())).sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected_grad = ref_params[name].grad
        # fp32 rounding is relative to the gradient's scale (Gemma's embedding scale makes it ~100).
        scale = max(1.0, expected_grad.abs().max().item())
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_pad_equal_to_eos_pools_the_token_before_it_as_transformers_does():
    # Many tokenizers pad with EOS; transformers then pools the rightmost non-EOS token.
    eos = TOK.eos_token_id
    model = tiny_reward_model("llama", pad_token_id=eos)
    batch = pack(EXAMPLES, TOK)
    rows = pooled_rows(batch, eos)
    assert (batch.input_ids[0, rows] != eos).all()
    rewards = packed_rewards(model, batch, attn="dense")
    torch.testing.assert_close(rewards, alone_rewards(model, EXAMPLES), rtol=0, atol=1e-5)


def test_pooled_rows_are_each_responses_last_token():
    batch = pack(EXAMPLES, TOK)
    ends = []
    start = 0
    for ex in EXAMPLES:
        t = tokenize_example(ex, TOK)
        start += len(t.prompt_ids)
        for resp in t.response_ids:
            start += len(resp)
            ends.append(start - 1)
    assert pooled_rows(batch, TOK.pad_token_id).tolist() == ends
    assert pooled_rows(batch, None).tolist() == ends


def test_initialised_from_a_causal_lm_checkpoint_keeps_its_backbone(tmp_path):
    lm = build_tiny_model("qwen2", seed=3)
    lm.save_pretrained(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight, rtol=0, atol=0)
    assert rm.score.weight.shape == (1, lm.config.hidden_size)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the checkpoint itself is untouched
    assert reloaded.lm_head.weight.shape[0] == lm.config.vocab_size


def test_a_causal_lm_is_refused():
    with pytest.raises(ModelError, match="num_labels=1"):
        packed_rewards(build_tiny_model("llama"), pack(EXAMPLES[:1], TOK), attn="dense")
