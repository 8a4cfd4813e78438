"""rrhf_fast.models.attention: every backend against a brute-force reference of the attention rule."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from rrhf_fast.data.packing import TokenizedExample, pack_tokenized
from rrhf_fast.models import attention, segment_attention
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


# ----------------------------------------------------------------------------------------------
# The per-segment dense path (issue 31): the same values and gradients as one SDPA over the whole
# row (`dense-full`) and as the varlen reference, on packs of many ragged queries; cost of the rule.


def many_queries(seed: int = 0, queries: int = 9):
    """Queries with prompts of 1 to 23 tokens and 1 to 5 responses of 1 to 13 tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(queries):
        plen, k = int(torch.randint(1, 24, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(1, 14, (k,), generator=g).tolist()
        items.append(TokenizedExample(list(range(plen)), [[7] * n for n in lens], [0.0] * k))
    return pack_tokenized(items)


SEGMENT_CASES = [
    pytest.param(4, 2, None, None, id="gqa"),
    pytest.param(3, 3, None, None, id="mha"),
    pytest.param(4, 1, 5, None, id="mqa-window5"),
    pytest.param(4, 2, 1, None, id="gqa-window1"),
    pytest.param(4, 2, None, 3.0, id="gqa-softcap"),
    pytest.param(4, 2, 9, 3.0, id="gqa-window9-softcap"),
]


def run_backend(batch, backend, heads, kv_heads, window, softcap, seed=5):
    q, k, v = (
        x.requires_grad_() for x in qkv(batch.num_tokens, heads, kv_heads, dtype=torch.float32, seed=seed)
    )
    meta = SharedPromptMeta.from_batch(batch, backend)
    out, _ = shared_prompt_attention(
        None, q, k, v, None, scaling=0.3, sliding_window=window, softcap=softcap, sp_meta=meta
    )
    w = torch.linspace(-1.5, 2.0, out.numel()).view_as(out) ** 3  # non-uniform upstream gradient
    return (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))


LAYOUTS = [  # (CALL_ENTRIES, GROUP_SLACK): many buckets with padding, responses per segment or grouped
    pytest.param(0, 0.0, id="per-response"),
    pytest.param(0, 100.0, id="grouped"),
    pytest.param(1 << 14, 1.25, id="default"),
]


def with_layout(monkeypatch, call_entries, group_slack):
    monkeypatch.setattr(segment_attention, "CALL_ENTRIES", call_entries)
    monkeypatch.setattr(segment_attention, "GROUP_SLACK", group_slack)


@pytest.mark.parametrize("call_entries, group_slack", LAYOUTS)
@pytest.mark.parametrize("heads, kv_heads, window, softcap", SEGMENT_CASES)
def test_dense_per_segment_equals_dense_full_and_varlen_fp32(
    heads, kv_heads, window, softcap, call_entries, group_slack, monkeypatch
):
    with_layout(monkeypatch, call_entries, group_slack)
    batch = many_queries()
    assert batch.num_queries == 9 and batch.num_responses > 20
    layout = SharedPromptMeta.from_batch(batch, "dense").layout()
    assert len(layout.buckets) > (8 if call_entries == 0 else 0) and any(b.n > 1 for b in layout.buckets)
    if group_slack != 1.25:  # all responses of a query in one segment, or one segment each
        assert len(layout.segments) == (2 * 9 if group_slack > 1 else 9 + batch.num_responses)
    new = run_backend(batch, "dense", heads, kv_heads, window, softcap)
    for reference in (attention.DENSE_FULL, "varlen"):
        ref = run_backend(batch, reference, heads, kv_heads, window, softcap)
        for name, a, b in zip(("out", "dq", "dk", "dv"), new, ref, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=2e-5, msg=lambda m, n=name, r=reference: f"{n} vs {r}: {m}"
            )


def largest_intermediate(fn) -> int:
    """The most elements of any tensor an op returns while fn runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        fn()
    return Largest.most


@pytest.mark.parametrize("softcap", [pytest.param(None, id="sdpa"), pytest.param(3.0, id="softcap-math")])
@pytest.mark.parametrize("backend", ["dense", attention.DENSE_FULL])
def test_dense_costs_the_rule_not_the_square_of_the_pack(backend, softcap):
    batch = many_queries(seed=2, queries=24)
    T = batch.num_tokens
    layout = SharedPromptMeta.from_batch(batch, "dense").layout()
    P, R = batch.prompt_len, batch.response_len
    rule = int((P * P).sum() + (R * (P[batch.response_query] + R)).sum())  # prompts whole, as computed
    rule *= segment_attention.GROUP_SLACK  # grouped responses may cost that much more
    calls = len(layout.buckets)
    assert layout.padded_cost() <= segment_attention.PAD_SLACK * rule + calls * segment_attention.CALL_ENTRIES
    assert layout.padded_cost() < T * T / 4
    most = largest_intermediate(lambda: run_backend(batch, backend, 2, 1, 7, softcap))
    if backend == "dense":
        assert most <= 2 * layout.padded_cost()  # [n, H, Lq, Lk] scores (2 heads) at most
        assert calls <= 6  # few SDPA calls per layer for 24 + 70 segments
    else:  # the reference's [T, T] mask: what the test exists to catch
        assert most >= T * T


@pytest.mark.parametrize("call_entries, group_slack", LAYOUTS[:2])
@pytest.mark.parametrize("window", [pytest.param(None, id="causal"), pytest.param(6, id="window6")])
@pytest.mark.parametrize("block", [4, 8])
def test_block_mask_equals_create_block_mask(window, block, call_entries, group_slack, monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask

    with_layout(monkeypatch, call_entries, group_slack)

    batch = many_queries(seed=3)
    meta = SharedPromptMeta.from_batch(batch, "flex")

    def mask_mod(b, h, q_idx, kv_idx):
        return meta.allowed(q_idx, kv_idx, window)

    T = batch.num_tokens
    ours = segment_attention.block_mask(meta.layout(), window, mask_mod, block=block)
    torchs = create_block_mask(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=block)
    assert ours.seq_lengths == torchs.seq_lengths and ours.BLOCK_SIZE == torchs.BLOCK_SIZE
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        torch.testing.assert_close(getattr(ours, name), getattr(torchs, name), msg=name)
    for num, name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        for i, n in enumerate(getattr(torchs, num)[0, 0].tolist()):
            assert getattr(ours, name)[0, 0, i, :n].tolist() == getattr(torchs, name)[0, 0, i, :n].tolist()
    assert (ours.kv_num_blocks > 0).any() and (window is not None or (ours.full_kv_num_blocks > 0).any())
