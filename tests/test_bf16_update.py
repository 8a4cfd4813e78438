"""--bf16-update (optimizers.bf16_update, optimizers.paramwise): stochastic rounding is unbiased and lets
small updates accumulate where round-to-nearest loses them, Kahan compensation too; both resume
exactly; on the demo task bf16 weights with stochastic rounding track fp32 master weights."""

import copy
import dataclasses

import pytest
import torch
from training_runs import config, write_data

from rrhf_fast.optimizers.bf16_update import kahan_round, rounding_generator, stochastic_round
from rrhf_fast.optimizers.optim import build_optimizer
from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer
from rrhf_fast.training.train import train

TORCH_THREADS = 1


def _neighbours(x):
    """The bf16 values on either side of each fp32 value: towards zero and away from it."""
    bits = x.view(torch.int32) & -65536
    toward = bits.view(torch.float32)
    away = torch.where(toward == x, x, (bits + 65536).view(torch.float32))
    return toward, away


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(64, generator=g), -torch.rand(32, generator=g) * 1e-3, torch.tensor([1.0, -2.5])]
    )
    toward, away = _neighbours(x)
    draws = torch.stack([stochastic_round(x, torch.Generator().manual_seed(s)).float() for s in range(4000)])
    assert ((draws == toward) | (draws == away)).all()
    gap = (away - toward).abs()
    p_away = (x - toward).abs() / gap.clamp_min(1e-30)  # the unbiased probability of rounding away
    sd = torch.sqrt(p_away * (1 - p_away) / len(draws)) * gap  # standard error of the mean of the draws
    assert ((draws.mean(0) - x).abs() <= 5 * sd + 1e-12).all()
    assert (draws[:, -2:] == x[-2:]).all()  # bf16 values stay as they are
    nearest = x.bfloat16().float()  # the same bound catches a biased rounding
    assert ((nearest - x).abs() > 5 * sd + 1e-12).float().mean() > 0.5


def test_non_finite_values_round_to_themselves():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0])
    out = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 3.0


@pytest.mark.parametrize("mode", ["nearest", "stochastic", "kahan"])
def test_small_updates_accumulate_unless_rounded_to_nearest(mode):
    """1000 updates of +1e-4 on weights of 1.0 (bf16 spacing there: 2**-7 = 0.0078)."""
    w = torch.ones(2048, dtype=torch.bfloat16)
    comp = torch.zeros_like(w)
    for step in range(1000):
        new = w.float() + 1e-4
        if mode == "nearest":
            w = new.bfloat16()
        elif mode == "stochastic":
            w = stochastic_round(new, rounding_generator(w.device, 0, 0, step))
        else:
            w, comp = kahan_round(w, new, comp)
    mean = w.float().mean().item()
    if mode == "nearest":
        assert mean == 1.0  # every update lost
    elif mode == "stochastic":
        assert mean == pytest.approx(1.1, abs=0.005)  # exact in expectation
        assert w.float().std() > 0  # each weight took its own path
    else:  # the bf16 compensation rounds too: 0.0028 of the 0.1 is lost here, against all of it
        assert (w.float() + comp.float() - 1.1).abs().max() < 5e-3 and (w.float() - 1.1).abs().max() < 8e-3


def test_rounding_noise_is_a_function_of_seed_parameter_and_step():
    x = torch.randn(256) * 1e-2
    same = [stochastic_round(x, rounding_generator(x.device, 3, 7, 11)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    for other in [(4, 7, 11), (3, 8, 11), (3, 7, 12)]:
        assert not torch.equal(same[0], stochastic_round(x, rounding_generator(x.device, *other)))


def _bf16_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 16)).bfloat16()


def _steps(model, opt, seeds):
    for seed in seeds:
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed)).bfloat16()
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("in_backward", [False, True], ids=["after", "in-backward"])
def test_rounded_bf16_steps_resume_exactly_with_fp32_states(mode, in_backward):
    kw = dict(lr=1e-3, weight_decay=0.1, bf16_update=mode, seed=5, in_backward=in_backward)
    a = _bf16_mlp()
    opt_a = build_optimizer(a.named_parameters(), "adamw", **kw)
    assert isinstance(opt_a, ParamwiseOptimizer)
    _steps(a, opt_a, range(3))
    saved = copy.deepcopy(opt_a.state_dict())  # as torch.save would: the live state keeps changing
    assert all(v.dtype == torch.float32 for s in saved["state"].values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq"))  # fmt: skip
    assert all(("kahan_comp" in s) == (mode == "kahan") for s in saved["state"].values())
    b = _bf16_mlp()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b.named_parameters(), "adamw", **kw)
    opt_b.load_state_dict(saved)
    _steps(a, opt_a, range(3, 6))
    _steps(b, opt_b, range(3, 6))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())


def test_bf16_adamw8bit_with_stochastic_rounding_steps():
    model = _bf16_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model.named_parameters(), "adamw8bit", lr=1e-3, bf16_update="stochastic")
    _steps(model, opt, range(2))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -------------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rrhf_fast.pipelines.demo import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "in-pieces"])
def test_bf16_trainer_run_with_kahan_resumes_bitwise(tmp_path, model_dir, monkeypatch, pieces):
    """In pieces: every weight over 512 values is updated 256 values at a time, through the trainer's
    checkpoints (which hold each tensor's state whole)."""
    if pieces:
        from rrhf_fast.optimizers import bf16_update, paramwise

        monkeypatch.setattr(bf16_update, "ROUND_CHUNK", 256)
        monkeypatch.setattr(paramwise, "UPDATE_CHUNK", 256)
    stepped = []
    original = ParamwiseOptimizer._step_pieces
    monkeypatch.setattr(
        ParamwiseOptimizer, "_step_pieces", lambda self, slot: (stepped.append(slot), original(self, slot))
    )
    data = write_data(tmp_path / "d.jsonl", 8)
    kw = dict(
        max_steps=4,
        queries_per_step=4,
        micro_batch_tokens=4096,
        dtype="bfloat16",
        bf16_update="kahan",
        lr=1e-3,
        min_lr=1e-3,
    )  # fmt: skip  (a constant lr: the 2-step run has the 4-step run's schedule)
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))
    half = config(tmp_path, model_dir, data, "half", save_every=2, **kw)
    train(dataclasses.replace(half, max_steps=2))
    resumed = train(dataclasses.replace(half, resume=True))
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a["lm_head.weight"].dtype == torch.bfloat16
    assert bool(stepped) == pieces


# -------------------------------------------------------------------------------------------------
# the demo task: bf16 weights with stochastic rounding track fp32 master weights


@pytest.mark.slow
def test_bf16_stochastic_rounding_tracks_fp32_on_the_demo_task(tmp_path):
    """`make demo`'s task and RRHF run (300 steps, torch AdamW), once with fp32 weights and once with
    bf16 weights and --bf16-update stochastic: the held-out reward of greedy answers (the bf16 weights
    scored in fp32) is no more than 0.03 below fp32's: stochastic rounding must not cost reward. One
    sided: the two runs part along the way and bf16 may end higher (0.988 against 0.955 at 981a939).
    About 3 to 25 minutes on a 2-core CPU, by load, bf16 being slow there."""
    from rrhf_fast.pipelines import demo
    from rrhf_fast.pipelines.demo_task import prepare_task

    cfg = demo.DemoConfig(output_dir=str(tmp_path), optim="adamw", sft_baseline=False)
    task = prepare_task(cfg, tmp_path)  # `make demo`'s initial model, train.jsonl and eval.jsonl
    rewards = {}
    for name, flags in [("fp32", {}), ("bf16", dict(dtype="bfloat16", bf16_update="stochastic"))]:
        run = demo.train_config(cfg, task.model_dir, tmp_path, name, 1.0)
        model = train(dataclasses.replace(run, plot=False, **flags)).model.float()
        rewards[name] = demo.score_greedy(model, task.tokenizer, task.eval_queries, cfg.max_digits)[0]
    assert rewards["fp32"] > 0.5  # it trained
    assert rewards["bf16"] >= rewards["fp32"] - 0.03, rewards


def test_chunked_rounding_is_unbiased_and_bounded_in_memory():
    """stochastic_round_into rounds chunk by chunk: each value still lands on a bf16 neighbour with
    the unbiased probabilities, one chunk equal to the whole tensor draws the same noise as
    stochastic_round, and the live bytes it adds are measured (MemoryTracker on real tensors) to
    scale with the chunk, not the tensor."""
    from rrhf_fast.optimizers.bf16_update import stochastic_round_into
    from rrhf_fast.planning.memtrack import MemoryTracker

    x = torch.full((4000, 64), 1.0 + 2**-10)  # 1/8 of the way from 1 to the next bf16 value
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_into(out, x, torch.Generator().manual_seed(0), chunk=1000)
    up = (out.float() > 1).float().mean().item()
    assert set(out.float().unique().tolist()) <= {1.0, 1.0 + 2**-7} and abs(up - 0.125) < 0.01
    whole = torch.empty_like(out)
    stochastic_round_into(whole, x, torch.Generator().manual_seed(1), chunk=x.numel())
    assert torch.equal(whole, stochastic_round(x, torch.Generator().manual_seed(1)))

    def peak(chunk):
        with MemoryTracker() as tracker:
            stochastic_round_into(out, x, torch.Generator().manual_seed(0), chunk=chunk)
        return tracker.report().peak_bytes

    n, chunk = x.numel(), 4096
    assert peak(n) >= 12 * n  # int32 noise, the sum, the mask, bf16 results: ~16 bytes a value
    assert peak(chunk) <= 20 * chunk


# -------------------------------------------------------------------------------------------------
# large weights step in pieces


def _embedding_model():
    """An embedding of 12000 values: with 4096-value pieces, two pieces (4096 and 7904 values, the
    second ending in a partial 256-value block of bitsandbytes' states); the linear steps whole."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(300, 40), torch.nn.Linear(40, 24)).bfloat16()


def _embedding_steps(model, opt, seeds):
    for seed in seeds:
        ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(seed))
        model(ids).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def _same(a, b):
    """Nested optimizer states equal: tensors bitwise, in shape and dtype."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("in_backward", [False, True], ids=["after", "in-backward"])
def test_a_weight_stepped_in_pieces_is_the_whole_step_bitwise(monkeypatch, optim, mode, in_backward):
    """A weight over 2 pieces is updated piece by piece (paramwise.UPDATE_CHUNK values of fp32 copies
    at a time, not the whole tensor's): the weights, and the states a checkpoint holds, equal the
    unchunked update's bitwise; a checkpoint of either loads into the other and the runs go on equal."""
    from rrhf_fast.optimizers import bf16_update, paramwise

    monkeypatch.setattr(bf16_update, "ROUND_CHUNK", 4096)

    def build(chunk):
        monkeypatch.setattr(paramwise, "UPDATE_CHUNK", chunk)
        model = _embedding_model()
        kw = dict(lr=1e-2, weight_decay=0.1, bf16_update=mode, seed=3, in_backward=in_backward)
        return model, build_optimizer(model.named_parameters(), optim, **kw)

    (cut, opt_cut), (whole, opt_whole) = build(4096), build(1 << 20)
    assert [len(s.pieces or []) for s in opt_cut.slots] == [2, 0, 0]
    assert [len(s.pieces or []) for s in opt_whole.slots] == [0, 0, 0]
    _embedding_steps(cut, opt_cut, range(3))
    _embedding_steps(whole, opt_whole, range(3))
    assert all(torch.equal(a, b) for a, b in zip(cut.parameters(), whole.parameters(), strict=True))
    saved = {"cut": copy.deepcopy(opt_cut.state_dict()), "whole": copy.deepcopy(opt_whole.state_dict())}
    assert _same(saved["cut"], saved["whole"])
    assert set(saved["cut"]["state"][0]) >= {"bf16_round_step", "step"}
    for source, (chunk, other) in {"whole": (4096, whole), "cut": (1 << 20, cut)}.items():
        model, opt = build(chunk)
        model.load_state_dict(other.state_dict())
        opt.load_state_dict(copy.deepcopy(saved[source]))
        _embedding_steps(model, opt, range(3, 5))
        if source == "whole":
            _embedding_steps(whole, opt_whole, range(3, 5))
            reference = whole
        else:
            _embedding_steps(cut, opt_cut, range(3, 5))
            reference = cut
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_pieces_bound_the_update_transients(monkeypatch):
    """The live bytes of a rounded update (MemoryTracker on real tensors) grow with the piece, not
    with the weight: the fp32 copies of weight and gradient and the rounding's noise of one piece."""
    from rrhf_fast.optimizers import bf16_update, paramwise
    from rrhf_fast.planning.memtrack import MemoryTracker

    monkeypatch.setattr(bf16_update, "ROUND_CHUNK", 4096)
    weight = torch.nn.Parameter(torch.randn(64 * 4096).bfloat16())

    def peak(chunk):
        monkeypatch.setattr(paramwise, "UPDATE_CHUNK", chunk)
        opt = build_optimizer([("w", weight)], "adamw8bit", lr=1e-3, bf16_update="stochastic")
        for _ in range(2):  # the states exist from the first step on
            weight.grad = torch.randn_like(weight)
            with MemoryTracker() as tracker:
                opt.step()
        return tracker.report().peak_bytes

    whole, pieces = peak(1 << 30), peak(4096)
    assert whole >= 8 * weight.numel()  # fp32 copies of the whole weight and gradient
    assert pieces <= 40 * 4096, pieces  # fp32 copies, AdamW8bit's and the rounding's temporaries
