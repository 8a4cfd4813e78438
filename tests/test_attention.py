"""rrhf_fast.models.attention: every backend against a brute-force reference of the attention rule."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from rrhf_fast.data.packing import TokenizedExample, pack_tokenized
from rrhf_fast.models import attention
from rrhf_fast.models.attention import (
    NAME,
    SharedPromptMeta,
    packed_forward,
    resolve_backend,
    shared_prompt_attention,
    varlen_reference,
)


def ragged_batch(seed: int = 0):
    """Three queries, prompts of 1, 5 and 9 tokens, 1 to 4 responses of 1 to 7 tokens each."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for plen, k in ((5, 3), (1, 1), (9, 4)):
        lens = torch.randint(1, 8, (k,), generator=g).tolist()
        items.append(TokenizedExample(list(range(plen)), [[7] * n for n in lens], [0.0] * k))
    return pack_tokenized(items)


def qkv(T, heads=4, kv_heads=2, dim=16, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, T, dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, kv_heads, T, dim, generator=g, dtype=torch.float64)
    v = torch.randn(1, kv_heads, T, dim, generator=g, dtype=torch.float64)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def brute_force(batch, q, k, v, scaling, window=None, softcap=None):
    """Token by token, straight from the rule of docs/DESIGN.md §3: [1, T, H, D] in fp64."""
    T, H = q.shape[2], q.shape[1]
    n_rep = H // k.shape[1]
    grp, seg, pos = batch.seq_group, batch.seq_segment, batch.position_ids[0]
    out = torch.zeros(1, T, H, q.shape[-1], dtype=torch.float64)
    for i in range(T):
        keys = [
            j
            for j in range(i + 1)
            if grp[j] == grp[i]
            and (seg[j] == 0 or seg[j] == seg[i])
            and (window is None or pos[i] - pos[j] < window)
        ]
        for h in range(H):
            s = (k[0, h // n_rep, keys].double() @ q[0, h, i].double()) * scaling
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            out[0, i, h] = s.softmax(-1) @ v[0, h // n_rep, keys].double()
    return out


CASES = [
    pytest.param(None, None, 4, id="gqa"),
    pytest.param(None, None, 2, id="mha"),
    pytest.param(4, None, 4, id="gqa-window4"),
    pytest.param(1, None, 4, id="gqa-window1"),
    pytest.param(None, 5.0, 4, id="gqa-softcap"),
    pytest.param(3, 5.0, 4, id="gqa-window3-softcap"),
]


@pytest.mark.parametrize("window, softcap, heads", CASES)
@pytest.mark.parametrize("backend", ["dense", "varlen", "flex"])
def test_backends_match_brute_force_fp64(backend, window, softcap, heads):
    batch = ragged_batch()
    q, k, v = qkv(batch.num_tokens, heads=heads)
    meta = SharedPromptMeta.from_batch(batch, backend)
    with torch.no_grad():  # flex runs forward only on the CPU
        out, weights = shared_prompt_attention(
            None, q, k, v, None, scaling=0.3, sliding_window=window, softcap=softcap, sp_meta=meta
        )
    assert weights is None and out.shape == (1, batch.num_tokens, heads, 16)
    torch.testing.assert_close(out, brute_force(batch, q, k, v, 0.3, window, softcap), rtol=0, atol=1e-10)


def test_dense_and_varlen_gradients_agree():
    batch = ragged_batch(seed=1)
    grads = []
    for backend in ("dense", "varlen"):
        q, k, v = (x.requires_grad_() for x in qkv(batch.num_tokens, seed=3))
        meta = SharedPromptMeta.from_batch(batch, backend)
        out, _ = shared_prompt_attention(None, q, k, v, None, scaling=0.25, sliding_window=4, sp_meta=meta)
        w = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
        grads.append(torch.autograd.grad((out * w).sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_window_that_masks_nothing_is_dropped():
    meta = SharedPromptMeta.from_batch(ragged_batch(), "dense")
    assert meta.window(None) is None and meta.window(meta.max_seqlen_k) is None
    assert meta.window(meta.max_seqlen_k - 1) == meta.max_seqlen_k - 1
    assert meta.dense_mask(None) is meta.dense_mask(None)  # built once per batch, not per layer


def test_varlen_reference_is_bottom_right_causal():
    q, k, v = (x[0].transpose(0, 1) for x in qkv(5, heads=2, kv_heads=2))  # [T, H, D]
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = varlen_reference(q[3:], k, v, cu_q, cu_k, scale=0.25)  # SDPA default: 16 ** -0.5
    full = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1) for x in (q, k, v)), is_causal=True
    )
    torch.testing.assert_close(out, full.transpose(0, 1)[3:])


class Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("q_len", [pytest.param(7, id="prefill"), pytest.param(1, id="decode")])
def test_without_metadata_it_is_causal_attention(q_len):
    q, k, v = qkv(7, dtype=torch.float32)
    q = q[:, :, -q_len:]
    out, _ = shared_prompt_attention(Module(), q, k, v, None, scaling=0.25)
    expected, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, expected)
    # Soft-capped (Gemma 2): the explicit math path, aligned at the bottom right like a KV cache.
    out, _ = shared_prompt_attention(Module(), q, k, v, None, scaling=0.25, softcap=2.0)
    keys = torch.arange(7)[None, :] <= torch.arange(7 - q_len, 7)[:, None]
    s = torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25 / 2.0) * 2.0
    expected = s.masked_fill(~keys, -torch.inf).softmax(-1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_registered_under_a_neutral_name():
    assert AttentionInterface()[NAME] is shared_prompt_attention
    assert NAME in AttentionMaskInterface._global_mapping
    assert not any(word in NAME for word in ("flash", "sdpa", "flex_attention"))


def test_mask_function_yields_none_only_during_packed_forward():
    mask_fn = AttentionMaskInterface()[NAME]
    kwargs = dict(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=False)
    assert mask_fn(**kwargs).shape == (1, 1, 4, 4)
    with packed_forward():
        assert mask_fn(**kwargs) is None
    assert attention._PACKED_FORWARD.get() is False


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "dense"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="attn must be one of"):
        resolve_backend("flash", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# CUDA kernels in bf16: max |backend - ref_fp64| <= 2 max |dense bf16 - ref_fp64| + small (STYLE.md).


@pytest.mark.gpu
@pytest.mark.parametrize(
    "window, softcap", [(None, None), (4, None), (None, 5.0)], ids=["plain", "window", "softcap"]
)
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_cuda_backends_bf16(backend, window, softcap):
    if backend == "varlen" and softcap is not None and not attention._has_flash_attn():
        pytest.skip("torch varlen has no soft-capping")
    batch = ragged_batch().to("cuda")
    q, k, v = qkv(batch.num_tokens, heads=8, kv_heads=2, dim=64, device="cuda")
    ref = brute_force(batch.to("cpu"), q.cpu(), k.cpu(), v.cpu(), 0.125, window, softcap).cuda()
    bf = [x.bfloat16() for x in (q, k, v)]
    dense_meta = SharedPromptMeta.from_batch(batch, "dense")
    base, _ = shared_prompt_attention(
        None, *bf, None, scaling=0.125, sliding_window=window, softcap=softcap, sp_meta=dense_meta
    )
    meta = SharedPromptMeta.from_batch(batch, backend)
    out, _ = shared_prompt_attention(
        None, *bf, None, scaling=0.125, sliding_window=window, softcap=softcap, sp_meta=meta
    )
    base_err = (base.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * base_err + 1e-3
