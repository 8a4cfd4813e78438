"""benchmarks/memory_fit.py: the CPU smoke run writes every method and both targets; the pieces a GPU
run relies on and a CPU run cannot show (the model shapes, meta-device materialisation, the search)."""

import csv
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import memory_fit  # noqa: E402
import memory_models  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    """Smoke runs use one CPU thread; give the rest of the test session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_smoke_writes_every_method_and_both_targets(tmp_path):
    assert memory_fit.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--max-queries", "2"]) == 0
    with (tmp_path / "memory_fit_cpu_smoke.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(common.COLUMNS)] == common.COLUMNS
        rows = list(reader)
    sweep = [r for r in rows if r["sweep"] == "tiny-llama k=2 P=8 R=4"]
    assert sorted(r["provider"] for r in sweep) == ["full", "lora", "qlora", "reference"]
    targets = [r for r in rows if "[smoke: tiny model]" in r["sweep"]]
    assert sorted(r["provider"] for r in targets) == ["full", "qlora"]
    for r in sweep + targets:
        assert r["status"] == "ok", r
        assert r["x"] == "32" and r["config"].startswith("G=2 (32 tokens/step")  # 2 x (8 + 2 x 4)
        assert float(r["tokens_per_s"]) > 0 and float(r["ms_median"]) > 0
        assert r["peak_mem_gib"] == "" and r["gpu"] == "cpu"  # no CPU number is faked
    assert all(r["note"] == "--max-queries 2 reached" for r in sweep)
    report = (tmp_path / "memory_fit_cpu_smoke.md").read_text()
    assert "## Summary (cpu)" in report and "### Targets (cpu)" in report
    assert report.count("fits: peak - GiB") == 2


@pytest.mark.parametrize(
    "limit, cap, expected",
    [
        pytest.param(13, 32, (13, 14), id="bisect-13"),
        pytest.param(1, 32, (1, 2), id="only-1"),
        pytest.param(0, 32, (0, 1), id="nothing-fits"),
        pytest.param(32, 32, (32, None), id="exactly-the-cap"),
        pytest.param(100, 20, (20, None), id="cap-not-a-power-of-2"),
        pytest.param(17, 20, (17, 18), id="between-16-and-cap"),
    ],
)
def test_largest_fit_doubles_then_bisects(limit, cap, expected):
    tried = []

    def fits(g):
        tried.append(g)
        return g <= limit

    assert memory_fit.largest_fit(fits, cap) == expected
    assert all(1 <= g <= cap for g in tried) and len(tried) == len(set(tried))
    assert len(tried) <= 2 * cap.bit_length() + 1  # logarithmic, not a scan


@pytest.mark.parametrize(
    "shape, params",
    [  # the published parameter counts of these models
        pytest.param("Llama-3.2-1B", 1_235_814_400, id="llama-1b"),
        pytest.param("Llama-3.2-3B", 3_212_749_824, id="llama-3b"),
        pytest.param("Llama-3.1-8B", 8_030_261_248, id="llama-8b"),
        pytest.param("Qwen2.5-7B", 7_615_616_512, id="qwen-7b"),
    ],
)
def test_shapes_have_the_published_parameter_counts(shape, params):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: the 8B model is only shapes here
        model = AutoModelForCausalLM.from_config(memory_models.model_config(shape, smoke=False))
    assert sum(p.numel() for p in model.parameters()) == params


def test_materialize_keeps_tied_weights_and_computes_rotary_tables():
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.tiny import build_tiny_model, tiny_config

    config = tiny_config("llama", tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    memory_models.materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = build_tiny_model("llama", tie_word_embeddings=True)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert model.model.norm.weight.eq(1).all()


def test_quantized_build_keeps_the_lm_head_plain():
    pytest.importorskip("bitsandbytes")
    model, flags = memory_models.build("tiny-llama", "qlora", torch.device("cpu"), smoke=True)
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32  # upcast
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert flags.gradient_checkpointing and flags.load_in_4bit
