"""`rrhf-fast plan`: the simulated step against a real CPU step, the layer extrapolation against a
whole simulation, bitsandbytes' layouts against the library, the command's output."""

import json
import math

import pytest
import torch
from test_ops import launches_unseen  # noqa: F401 (fixture)

from rrhf_fast import cli
from rrhf_fast.config import TrainConfig
from rrhf_fast.models.tiny import tiny_config
from rrhf_fast.planning import plan, plan_cuda
from rrhf_fast.planning.simulate import batch_shape, plan_step, simulate

TORCH_THREADS = 1


def flags(**kw):
    base = dict(model="-", data="-", output_dir="-", optim="adamw", attn="dense", kernels="triton")
    return TrainConfig(**{**base, **kw})


VALIDATION = [
    pytest.param("llama-tied", {}, id="llama-tied-full"),
    pytest.param("llama", dict(loss="rm"), id="llama-reward-model"),
    pytest.param("qwen2", dict(lora_r=4), id="qwen2-lora", marks=pytest.mark.slow),
    pytest.param("gemma2", dict(gradient_checkpointing=True), id="gemma2-full-ckpt", marks=pytest.mark.slow),
    pytest.param("llama", dict(lora_r=8, gradient_checkpointing=True), id="llama-lora-ckpt",
                 marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize("arch,kw", VALIDATION)
def test_planned_peak_is_the_real_steps(launches_unseen, arch, kw):  # noqa: F811
    """Plan (fake tensors, 2 and 4 layers extrapolated to 6) vs the live tensor bytes of a real CPU
    step of the same configuration (6 layers, the Triton kernels under the interpreter)."""
    hf = tiny_config(arch.removesuffix("-tied"), num_layers=6, tie_word_embeddings=arch.endswith("-tied"))
    config, shape = flags(**kw), batch_shape(192)
    real = simulate(hf, config, shape, fake=False, cuda=False)
    planned = plan_step(hf, config, shape, cuda=False)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    assert planned.peak_phase == real.peak_phase
    for category in ("weights", "gradients"):
        assert planned.by_category[category] == pytest.approx(real.by_category[category], rel=0.01)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({}, id="full"),
        pytest.param(dict(lora_r=4, gradient_checkpointing=True), id="lora-ckpt", marks=pytest.mark.slow),
    ],
)
def test_extrapolation_matches_the_whole_simulation(kw):
    hf = tiny_config("qwen2", num_layers=10, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=1000)
    config, shape = flags(attn="auto", kernels="auto", **kw), batch_shape(512)
    whole = simulate(hf, config, shape)
    planned = plan_step(hf, config, shape)
    assert planned.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.01)
    for category, value in whole.by_category.items():
        assert planned.by_category[category] == pytest.approx(value, rel=0.01, abs=4096), category


@pytest.mark.slow  # 15-45 s: a 12-layer simulation
def test_extrapolation_follows_each_phase(monkeypatch):
    """With torch's cached autocast (the trainer's is uncached) and 2 and 4 layers this step peaks
    in backward (the embedding and lm_head weigh most); with 12, in forward (the cache's bf16 copies
    of every layer's fp32 weights): plan_step extrapolates each phase's peak, so it lands on the
    whole simulation's peak and phase. A 500-token vocabulary: with 3000, 12 layers peak in backward
    too since the fused log-probs no longer hold a bf16 copy of the lm_head from forward to backward
    (its fp32 gradient and chunk buffers come in backward)."""
    from rrhf_fast.planning import simulate as simulate_module

    cached = lambda device_type: torch.autocast(device_type, dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(simulate_module, "training_autocast", cached)
    hf = tiny_config("qwen2", num_layers=12, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=500)
    config = flags(attn="auto", kernels="auto", optim="adamw8bit", optim_in_backward=True,
                   gradient_checkpointing=True)  # fmt: skip
    shape = batch_shape(256)
    assert simulate(hf, config, shape, layers=4).peak_phase == "backward"
    whole, planned = simulate(hf, config, shape), plan_step(hf, config, shape)
    assert whole.peak_phase == planned.peak_phase == "forward"
    assert planned.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.01)


def test_autocast_weight_copies_are_their_own_category():
    """fp32 weights under bf16 autocast: the bf16 copy of each decoder linear (2 bytes a weight,
    cached for the whole forward) is "weight_copies", the same at any token budget; "activations"
    is what grows with the tokens. bf16 weights are not copied."""
    hf = tiny_config("llama", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=64)
    linears = sum(m.weight.numel() for m in _meta_model(hf).model.layers.modules()
                  if isinstance(m, torch.nn.Linear))  # fmt: skip
    small, large = (plan_step(hf, flags(), batch_shape(t), cuda=False) for t in (128, 512))
    assert small.by_category["weight_copies"] == large.by_category["weight_copies"]
    assert small.by_category["weight_copies"] == pytest.approx(2 * linears, rel=0.01)
    assert large.by_category["activations"] > 3 * small.by_category["activations"]
    bf16 = plan_step(hf, flags(dtype="bfloat16"), batch_shape(128), cuda=False)
    assert bf16.by_category["weight_copies"] == 0


def test_adamw8bit_states_are_bitsandbytes_layout():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(77, 130)), torch.nn.Parameter(torch.randn(300)),
              torch.nn.Parameter(torch.randn(4096))]  # fmt: skip
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in params:
        real = sorted(
            (v.numel(), v.dtype)
            for k, v in optimizer.state[p].items()
            if torch.is_tensor(v) and "qmap" not in k
        )
        assert real == sorted((math.prod(s), d) for s, d in plan_cuda.adamw8bit_state_shapes(p.numel()))


def test_nf4_bytes_are_bitsandbytes_layout():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(300, 130, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    parts = [packed, state.absmax, state.state2.absmax, state.state2.code, state.offset]
    assert plan_cuda.nf4_bytes(w.numel()) == sum(t.numel() * t.element_size() for t in parts)


def test_quantized_base_counts_stored_bytes():
    """QLoRA: the decoder linears count as NF4 bytes, the rest is fp32, only adapters train."""
    hf = tiny_config("llama", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2)
    lora = plan_step(hf, flags(lora_r=4), batch_shape(256))
    qlora = plan_step(hf, flags(lora_r=4, load_in_4bit=True), batch_shape(256))
    shapes = [(128, 128)] * 2 + [(64, 128)] * 2 + [(256, 128)] * 3  # q, o | k, v | gate, up, down
    fp32 = 2 * sum(4 * o * i for o, i in shapes)  # two layers; LoRA's base stays fp32 (--dtype auto)
    saved = fp32 - 2 * sum(plan_cuda.nf4_bytes(o * i) for o, i in shapes)
    assert lora.by_category["weights"] - qlora.by_category["weights"] == pytest.approx(saved, rel=0.01)
    assert qlora.by_category["gradients"] == lora.by_category["gradients"]


def test_search_bisects_to_the_largest_fitting_budget():
    calls = []

    def fits(tokens):
        calls.append(tokens)
        return tokens <= 5000

    assert plan.search_tokens(fits) == 4864
    assert len(calls) < 12
    calls.clear()
    assert plan.search_tokens(fits, guess=4700) == 4864
    assert len(calls) < 6  # a good guess (plan's affine one) saves most steps
    assert plan.search_tokens(fits, guess=100_000, limit=8192) == 4864
    assert plan.search_tokens(lambda t: True, limit=8192) == 8192
    assert plan.search_tokens(lambda t: False) is None


@pytest.mark.parametrize(
    "text,value", [("80GiB", 80 << 30), ("24GB", 24 * 10**9), ("81920MiB", 80 << 30), ("48", 48 << 30)]
)
def test_parse_memory(text, value):
    assert plan.parse_memory(text) == value


def test_cli_json(tmp_path, capsys):
    tiny_config("llama", num_layers=2).save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path), "--micro-batch-tokens", "512", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"peak_bytes", "peak_phase", "by_category", "micro_batch_tokens", "fits",
                        "max_micro_batch_tokens", "host_peak_bytes", "host_by_category", "trainable_params",
                        "cpu_params_per_s", "cpu_step_seconds"}  # fmt: skip
    assert out["host_peak_bytes"] == 0 and out["cpu_step_seconds"] is None  # nothing offloaded
    assert set(out["by_category"]) == {"weights", "gradients", "optimizer", "weight_copies", "activations",
                                       "temporaries"}  # fmt: skip
    assert out["micro_batch_tokens"] == 512 and out["fits"] is None and out["max_micro_batch_tokens"] is None
    assert out["peak_bytes"] >= max(out["by_category"].values())


@pytest.mark.slow  # 30 s: a dozen simulated steps
def test_cli_search(tmp_path, capsys):
    tiny_config("llama", num_layers=2).save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path), "--gpu-memory", "1.7GiB", "--json"]
    assert cli.main([*argv, "--micro-batch-tokens", "512", "--search"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True
    best = out["max_micro_batch_tokens"]
    assert best % 256 == 0 and best > 512
    assert cli.main([*argv, "--micro-batch-tokens", str(best + 256)]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_cli_offload(tmp_path, capsys):
    tiny_config("llama", num_layers=2).save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path), "--micro-batch-tokens", "256", "--offload-optimizer",
            "--optim", "adamw"]  # fmt: skip
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n = out["trainable_params"]
    assert out["host_by_category"]["weights"] == out["host_by_category"]["gradients"] == 4 * n
    assert out["by_category"]["optimizer"] == 0 and out["host_peak_bytes"] >= 16 * n
    assert out["cpu_params_per_s"] > 0 and out["cpu_step_seconds"] == pytest.approx(
        n / out["cpu_params_per_s"]
    )
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "host memory (--offload-optimizer): peak" in text and "CPU optimizer step:" in text


def test_cli_text_and_errors(tmp_path, capsys):
    assert cli.main(["plan", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    tiny_config("gemma2", num_layers=2).save_pretrained(tmp_path)
    assert (
        cli.main(["plan", "--model", str(tmp_path), "--micro-batch-tokens", "256", "--gpu-memory", "24GB"])
        == 0
    )
    text = capsys.readouterr().out
    assert "peak:" in text and "fits in 22.4 GiB: yes" in text and "activations" in text
    assert cli.main(["plan", "--model", str(tmp_path), "--search"]) == 2
    argv = ["plan", "--model", str(tmp_path), "--optim-in-backward", "--grad-accum", "2"]
    assert cli.main(argv) == 2
    assert "--optim-in-backward" in capsys.readouterr().err


IN_BACKWARD = [
    pytest.param(dict(dtype="bfloat16", gradient_checkpointing=True, max_grad_norm=0.0),
                 id="bf16-ckpt-one-pass"),
    pytest.param(dict(bf16_update="stochastic", dtype="bfloat16"), id="bf16-stochastic-two-passes",
                 marks=pytest.mark.slow),
    pytest.param(dict(), id="fp32-two-passes", marks=pytest.mark.slow),
    pytest.param(dict(gradient_checkpointing=True, max_grad_norm=0.0), id="fp32-ckpt-one-pass",
                 marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize("kw", IN_BACKWARD)
def test_planned_peak_with_optim_in_backward_is_the_real_steps(launches_unseen, kw):  # noqa: F811
    """--optim-in-backward: each parameter stepped inside the backward (one pass, or LOMO's two with
    clipping), planned on fake tensors vs the live tensor bytes of the real CPU steps."""
    hf = tiny_config("llama", num_layers=6, hidden_size=128, num_heads=4, num_kv_heads=2)
    config, shape = flags(optim_in_backward=True, **kw), batch_shape(64)
    real = simulate(hf, config, shape, fake=False, cuda=False)
    planned = plan_step(hf, config, shape, cuda=False)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    assert planned.peak_phase == real.peak_phase
    for category in ("weights", "gradients", "optimizer"):
        assert planned.by_category[category] == pytest.approx(real.by_category[category], rel=0.02)


def _tiny_bf16_plan(**kw):
    """(plan, trainable weights, largest tensor's numel) of a small bf16 full fine-tune."""
    hf = tiny_config("llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=64)
    config = flags(dtype="bfloat16", gradient_checkpointing=True, max_grad_norm=0.0, **kw)
    sizes = [p.numel() for p in _meta_model(hf).parameters()]
    return plan_step(hf, config, batch_shape(64), cuda=False), sum(sizes), max(sizes)


def _meta_model(hf):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)


def test_optim_in_backward_saves_the_gradient_buffer():
    """Without the flag the whole-model gradient (2 bytes a bf16 weight) lives at the peak; with it,
    only the gradient of the tensor being stepped, and the peak drops by about the gradient bytes."""
    plain, n, _ = _tiny_bf16_plan()
    hooked, _, _ = _tiny_bf16_plan(optim_in_backward=True)
    grads = plain.by_category["gradients"]
    assert grads == pytest.approx(2 * n, rel=0.01)
    assert hooked.by_category["gradients"] < 0.15 * grads
    assert 0.7 * grads <= plain.peak_bytes - hooked.peak_bytes <= 1.05 * grads
    assert hooked.by_category["optimizer"] == pytest.approx(plain.by_category["optimizer"], rel=0.05)


def test_bf16_update_is_accounted():
    """--bf16-update: nearest keeps torch AdamW's moments in bf16 (4 bytes a weight); stochastic
    steps through fp32 (8 bytes of moments); kahan adds its bf16 compensation (2 bytes a weight).
    On top, each update's transients for one tensor at a time (fp32 copies of weight and gradient,
    AdamW's temporaries, the rounding's noise: under 32 bytes a value)."""
    nearest, n, largest = _tiny_bf16_plan(optim_in_backward=True)
    stochastic, _, _ = _tiny_bf16_plan(optim_in_backward=True, bf16_update="stochastic")
    kahan, _, _ = _tiny_bf16_plan(optim_in_backward=True, bf16_update="kahan")
    transient = 32 * largest
    assert 4 * n < nearest.by_category["optimizer"] < 4 * n + transient
    assert 8 * n < stochastic.by_category["optimizer"] < 8 * n + transient
    extra = kahan.by_category["optimizer"] - stochastic.by_category["optimizer"]
    assert 2 * n <= extra < 2 * n + transient
    assert 2 * n <= kahan.peak_bytes - stochastic.peak_bytes < 2 * n + transient


def test_planned_peak_of_updates_in_pieces_is_the_real_steps(launches_unseen, monkeypatch):  # noqa: F811
    """bf16 + stochastic rounding in backward with the embedding and lm_head stepped in pieces
    (paramwise.UPDATE_CHUNK lowered so a tiny model has them): planned vs the real CPU step's live
    bytes, and the pieces lower the peak against whole-tensor updates."""
    from rrhf_fast.optimizers import bf16_update, paramwise

    monkeypatch.setattr(bf16_update, "ROUND_CHUNK", 4096)
    hf = tiny_config("llama", num_layers=6, hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=512)
    config = flags(optim_in_backward=True, dtype="bfloat16", bf16_update="stochastic", max_grad_norm=0.0)
    shape = batch_shape(64)
    monkeypatch.setattr(paramwise, "UPDATE_CHUNK", 1 << 30)
    whole = plan_step(hf, config, shape, cuda=False)
    monkeypatch.setattr(paramwise, "UPDATE_CHUNK", 4096)
    real = simulate(hf, config, shape, fake=False, cuda=False)
    planned = plan_step(hf, config, shape, cuda=False)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    # (no phase check: the backward's peak and the update's are within 0.2% of each other here)
    for category in ("weights", "gradients", "optimizer"):
        assert planned.by_category[category] == pytest.approx(real.by_category[category], rel=0.02)
    embedding = 512 * 128
    assert whole.by_category["optimizer"] - planned.by_category["optimizer"] >= 6 * embedding


@pytest.mark.parametrize("attn", ["dense", "dense-full"])
def test_planned_dense_attention_grows_with_the_queries_not_the_square_of_the_pack(attn):
    """16 queries in one micro-batch plan 16x the activations of one (the per-segment dense path
    of issue 31); the [T, T] mask of dense-full, which plan counted before, grows faster."""
    hf, config = tiny_config("llama", num_layers=2), flags(attn=attn)
    acts = {}
    for queries in (1, 16):
        shape = batch_shape(queries * 112, prompt_len=48, response_len=16, k=4)
        assert shape.queries == queries
        acts[queries] = simulate(hf, config, shape, cuda=False).at_peak["activations"]
    if attn == "dense":
        assert acts[16] <= 16.5 * acts[1]
    else:
        assert acts[16] > 24 * acts[1]
