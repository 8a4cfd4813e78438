"""Launch geometry of the fused forward (utils.forward_grid): whole waves, L2-sized row groups."""

import importlib

import pytest

from rrhf_fast.kernels.utils import autotune_bench, forward_grid, m_bucket

H100 = dict(slots=132, l2_bytes=50 << 20)
SHAPES = [
    pytest.param(8192, 4096, 128256, id="llama3-8k"),
    pytest.param(16384, 4096, 128256, id="llama3-16k"),
    pytest.param(2048, 4096, 128256, id="llama3-2k"),
    pytest.param(8192, 2048, 32001, id="llama2-vocab"),
    pytest.param(4096, 4096, 50257, id="gpt2-vocab"),
    pytest.param(512, 2048, 250680, id="bloom-vocab-few-rows"),
]


def tile_steps(M, V, splits, slots, block_m=128, block_v=256):
    blocks, tiles = -(-M // block_m), -(-V // block_v)
    return -(-blocks * splits // slots) * (-(-tiles // splits) + 1)


def test_worked_example_of_the_docstring():
    assert forward_grid(8192, 128256, 4096, 2, **H100) == (12, 12)
    assert tile_steps(8192, 128256, 12, 132) == 258
    assert tile_steps(8192, 128256, 5, 132) == 306  # the old rule's 5 splits


@pytest.mark.parametrize("M,D,V", SHAPES)
def test_split_is_the_cheapest_that_keeps_a_wave_in_l2(M, D, V):
    splits, group = forward_grid(M, V, D, 2, **H100)
    blocks = -(-M // 128)
    assert 1 <= splits <= 64 and 1 <= group <= blocks
    assert group * 128 * D * 2 <= H100["l2_bytes"] // 4  # the group's hidden rows fit a quarter of L2
    if blocks > group:
        assert splits * group >= H100["slots"]  # a wave spans at most two groups of row blocks
    ideal = blocks * -(-V // 256) / H100["slots"]
    cost = tile_steps(M, V, splits, H100["slots"])
    allowed = [s for s in range(1, 65) if blocks <= group or s * group >= H100["slots"]]
    assert cost == min(tile_steps(M, V, s, H100["slots"]) for s in allowed)
    assert cost <= 1.15 * ideal + 2, (splits, cost, ideal)


def test_autotuners_key_on_a_row_bucket_and_tune_without_a_flush_buffer():
    tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
    assert [m_bucket(m) for m in (1, 600, 1024, 1025, 8192, 10**6)] == [512, 1024, 1024, 2048, 8192, 32768]
    for tuned in (tlp._fwd_tuned, tlp._dlogits_tuned):
        assert "M_BUCKET" in tuned.keys and "D" in tuned.keys
        assert tuned._do_bench is autotune_bench  # no 256 MiB L2-flush buffer at the first step
        assert not tuned.restore_value  # outputs fully overwritten: no clone per config
