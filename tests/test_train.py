"""training.train: accumulation by global query counts, exact resume, the finite-loss guard, metrics."""

import random

import pytest
import torch
from safetensors.torch import load_file
from training_runs import config, metrics, write_data

import rrhf_fast.checkpointing.checkpoint as ckpt
import rrhf_fast.objectives.base as objective_base
from rrhf_fast.checkpointing.checkpoint import latest_checkpoint, verify_checkpoint
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import pack_tokenized, tokenize_example
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import build_tokenizer, save_tiny_model
from rrhf_fast.objectives import build_objective, ranking_counts
from rrhf_fast.step.steps import epoch_order, plan_steps
from rrhf_fast.training.train import forward_backward, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -------------------------------------------------------------------------------------------------
# gradient accumulation: sums over the step's queries, divided by their global count


def _packed_len(data):
    from rrhf_fast.data.records import load_examples

    return [tokenize_example(e, build_tokenizer()).packed_len for e in load_examples(data)]


SPLITS = [
    pytest.param(dict(queries_per_step=8, micro_batch_tokens=1), 8, id="qps-8x1"),
    pytest.param(dict(queries_per_step=8, micro_batch_tokens=4), 2, id="qps-2x4"),
    pytest.param(dict(grad_accum=8, micro_batch_tokens=1), 8, id="accum-8x1"),
    pytest.param(dict(grad_accum=2, micro_batch_tokens=4), 2, id="accum-2x4"),
]


@pytest.mark.parametrize("split, micro_batches", SPLITS)
def test_micro_batching_gives_the_same_update(tmp_path, model_dir, split, micro_batches):
    """One step over 8 queries: 1 x 8, 8 x 1 and 2 x 4 micro-batches, fp32, torch AdamW.

    micro_batch_tokens in SPLITS counts queries: every query here packs to the same length. lr is
    1e-4: Adam's first update is lr * g / (|g| + eps), so for the few weights whose gradient is ~1e-8
    the float reordering of the micro-batch sums (~1e-7 relative, see the gradient test below) moves
    the update by up to 2% of lr; at 1e-4 that stays under 1e-5, as at any fine-tuning lr.
    """
    data = write_data(tmp_path / "d.jsonl", 8, equal_lengths=True)
    (length,) = set(_packed_len(data))
    full = train(config(tmp_path, model_dir, data, "full", max_steps=1, queries_per_step=8, lr=1e-4,
                        micro_batch_tokens=8 * length))  # fmt: skip
    split = {**split, "micro_batch_tokens": split["micro_batch_tokens"] * length}
    cfg = config(tmp_path, model_dir, data, "split", max_steps=1, lr=1e-4, **split)
    assert [len(step) for step in plan_steps([length] * 8, list(range(8)), cfg)] == [micro_batches]
    part = train(cfg)
    assert max_diff(weights(full.model), weights(part.model)) <= 1e-5
    assert max_diff(weights(full.model), weights(part.model)) > 0  # it did train
    assert part.last["loss"] == pytest.approx(full.last["loss"], rel=1e-6)  # not a sum of per-batch means


def test_accumulated_gradient_is_the_full_batch_gradient(tmp_path, model_dir):
    """Adam hides a uniform gradient scale; compare the gradients themselves, uneven splits too."""
    from rrhf_fast.data.records import load_examples
    from rrhf_fast.models.loading import load_model, resolve_device
    from rrhf_fast.models.logprobs import prepare_model

    data = write_data(tmp_path / "d.jsonl", 8, seed=3)
    cfg = config(tmp_path, model_dir, data)
    items = [tokenize_example(e, build_tokenizer()) for e in load_examples(data)]
    model = prepare_model(load_model(cfg, resolve_device("cpu")))

    def grads(groups):
        model.zero_grad(set_to_none=True)
        batches = [pack_tokenized([items[i] for i in g]) for g in groups]
        metrics = forward_backward(model, build_objective(cfg), batches, torch.autocast("cpu", enabled=False))
        return metrics.terms.tolist(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_losses, ref = grads([list(range(8))])
    for groups in ([[0, 1, 2, 3, 4], [5, 6, 7]], [[i] for i in range(8)], [[0], [1, 2, 3, 4, 5, 6, 7]]):
        losses, got = grads(groups)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-7)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7)


def test_each_epoch_covers_every_query_once():
    lengths = [random.Random(i).randint(5, 40) for i in range(37)]
    for kwargs in (dict(queries_per_step=5), dict(grad_accum=3)):
        cfg = TrainConfig(model="m", data="d", output_dir="o", micro_batch_tokens=60, **kwargs)
        order = epoch_order(37, seed=1, epoch=2)
        steps = plan_steps(lengths, order, cfg)
        flat = [i for step in steps for mb in step for i in mb]
        assert flat == order and sorted(flat) == list(range(37))
        assert all(sum(lengths[i] for i in mb) <= 60 for step in steps for mb in step)
    assert epoch_order(37, 1, 2) == epoch_order(37, 1, 2) != epoch_order(37, 1, 3)


# -------------------------------------------------------------------------------------------------
# exact resume


def _interrupt_at_step(monkeypatch, step, error=KeyboardInterrupt):
    """Raise `error` in the forward of `step` (one micro-batch per step in these runs)."""
    real = objective_base.packed_logprobs
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_base, "packed_logprobs", forward)


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_killed_and_resumed_run_is_bitwise_equal(tmp_path, model_dir, monkeypatch, optim):
    # 16 queries, 6 per step: epochs of 3 steps (6, 6, 4 queries); 6 steps cross an epoch boundary.
    data = write_data(tmp_path / "d.jsonl", 16)
    kw = dict(max_steps=6, queries_per_step=6, micro_batch_tokens=4096, optim=optim, warmup_steps=2)
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))

    cfg = config(tmp_path, model_dir, data, "killed", save_every=3, **kw)
    with monkeypatch.context() as patch:
        _interrupt_at_step(patch, 4)  # Ctrl-C (or a kill) in the middle of step 4
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint-3"
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))

    assert resumed.step == 6
    a, b = weights(whole.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(whole.checkpoint / "optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed.checkpoint / "optimizer.pt", weights_only=True)
    assert str(opt_a) == str(opt_b)
    drop = ("tokens_per_s", "mem_mib")
    rows = [
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / n)]
        for n in ("whole", "killed")
    ]
    assert rows[0] == rows[1]  # the same losses, lr, grad norms, data order, step by step


def test_crash_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path, model_dir, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", 8)
    kw = dict(max_steps=6, queries_per_step=4, micro_batch_tokens=4096)
    whole = train(config(tmp_path, model_dir, data, "whole", **kw))
    cfg = config(tmp_path, model_dir, data, "crashed", save_every=2, **kw)
    real_save, saves = torch.save, {"n": 0}

    def save_then_crash(obj, f, *args, **kwargs):  # the weights and optimizer of step 4 are written
        real_save(obj, f, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 4:
            raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", save_then_crash)
        full_disk = r"could not write checkpoint-4 .*no space left.*checkpoint-2 is intact"
        with pytest.raises(UserError, match=full_disk):
            train(cfg)  # a full disk is one sentence naming the checkpoint that survives
    run_dir = tmp_path / "crashed"
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    verify_checkpoint(run_dir / "checkpoint-2")
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    a, b = weights(whole.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_with_checkpoints_needs_resume(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    train(cfg)
    with pytest.raises(UserError, match="pass --resume"):
        train(cfg)
    capsys.readouterr()
    again = train(TrainConfig(**{**cfg.to_dict(), "resume": True, "max_steps": 2, "lr": 1e-3}))
    assert again.step == 2
    out = capsys.readouterr().out
    assert "resumed from" in out and "with changed flags: --lr 0.001 (was 0.01)" in out
    changes = "steps 2 instead of 1, peak lr 0.001 instead of 0.01;"
    assert f"--max-steps, --lr changed, so the learning-rate schedule changes: {changes}" in out


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 4)
    assert train(config(tmp_path, model_dir, data, max_steps=2, resume=True)).step == 2


# -------------------------------------------------------------------------------------------------
# the finite-loss guard


def _poison(monkeypatch, bad_steps, where="loss"):
    """NaN in the log-probs (loss) or only in their gradient, at the given 1-based steps."""
    real = objective_base.packed_logprobs
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        logp = real(*args, **kwargs)
        if calls["n"] in bad_steps:
            if where == "loss":
                return logp * float("nan")
            logp.register_hook(lambda g: g * float("nan"))
        return logp

    monkeypatch.setattr(objective_base, "packed_logprobs", forward)


@pytest.mark.parametrize("where", ["loss", "grad"])
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_non_finite_step_is_skipped(tmp_path, model_dir, monkeypatch, where, optim):
    data = write_data(tmp_path / "d.jsonl", 8)
    _poison(monkeypatch, {3}, where)
    cfg = config(tmp_path, model_dir, data, max_steps=4, queries_per_step=2, save_every=1, keep_checkpoints=5,
                 optim=optim)  # fmt: skip
    import rrhf_fast.training.train as train_module

    real, after = train_module.train_step, []  # the weights and optimizer state after each step

    def spy(job, work):
        out = real(job, work)
        weights = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
        after.append((weights, str(job.optimizer.state_dict()["state"])))
        return out

    monkeypatch.setattr(train_module, "train_step", spy)
    result = train(cfg)
    run = tmp_path / "run"
    (w2, o2), (w3, o3), (w4, _) = after[1:]
    assert all(torch.equal(w2[k], w3[k]) for k in w2) and o2 == o3  # step 3 changed nothing
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    saved = load_file(run / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(saved[k], w4[k]) for k in saved)
    assert not (run / "checkpoint-3").exists()  # no checkpoint of a skipped step
    rows = metrics(run)
    assert [r["skipped"] for r in rows] == [False, False, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert result.step == 4


def test_too_many_non_finite_steps_in_a_row_stop_with_one_sentence(tmp_path, model_dir, monkeypatch, capsys):
    from rrhf_fast.cli import main

    data = write_data(tmp_path / "d.jsonl", 8)
    _poison(monkeypatch, set(range(2, 100)))
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--optim", "adamw", "--max-steps", "8", "--queries-per-step", "1", "--max-bad-steps", "3",
            "--save-every", "1", "--log-every", "0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stopped being finite at step 2 (steps 2-4 skipped, 3 in a row)" in err
    assert "checkpoint-1 (saved after it) renamed *.diverged" in err and "Traceback" not in err
    assert "no checkpoint was saved before it" in err
    assert err.count("\n") == 1
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-1.diverged"]  # none written during the skipped steps 2-4


# -------------------------------------------------------------------------------------------------
# metrics, evaluation, plots


def test_metrics_eval_and_plot(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 8)
    held_out = write_data(tmp_path / "e.jsonl", 6, seed=9)
    cfg = config(tmp_path, model_dir, data, max_steps=4, queries_per_step=4, eval_data=str(held_out),
                 eval_every=2, plot=True)  # fmt: skip
    train(cfg)
    run = tmp_path / "run"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [("eval_accuracy" in r) for r in rows] == [True, False, True, False, True]
    for key in ("loss", "rank_loss", "sft_loss", "accuracy", "top1", "best_reward", "lr", "grad_norm",
                "tokens_per_s", "mem_mib", "skipped_steps"):  # fmt: skip
        assert all(key in r for r in rows[1:]), key
    for r in rows:
        if "eval_accuracy" in r:
            assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_best_reward"] <= 1
            assert r["eval_loss"] == pytest.approx(r["eval_rank_loss"] + r["eval_sft_loss"])
    assert rows[4]["eval_loss"] < rows[0]["eval_loss"]
    assert (run / "curves.png").stat().st_size > 10_000
    assert TrainConfig.load(run / "config.json") == cfg


def test_ranking_counts_by_hand():
    # query 0: r = [1, 0, 2], p orders (2 > 0 > 1) -> pairs (1<0) ok, (1<2) ok, (0<2) ok: 3 / 3
    # query 1: r = [0, 1], p = [0, -1] -> wrong: 0 / 1; top by p is response 0 with reward 0
    p = torch.tensor([-1.0, -2.0, -0.5, 0.0, -1.0])
    r = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0])
    counts = ranking_counts(p, r, torch.tensor([0, 0, 0, 1, 1]), 2)
    assert (counts.correct_pairs, counts.pairs, counts.top1) == (3, 4, 1)
    assert counts.summary() == {"accuracy": 0.75, "top1": 0.5, "best_reward": 1.0, "tied_queries": 0}


def test_gradient_checkpointing_matches(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 8)
    plain = train(config(tmp_path, model_dir, data, "plain", max_steps=2, queries_per_step=4))
    ckpt_run = train(config(tmp_path, model_dir, data, "ckpt", max_steps=2, queries_per_step=4,
                            gradient_checkpointing=True))  # fmt: skip
    assert max_diff(weights(plain.model), weights(ckpt_run.model)) <= 1e-6


# -------------------------------------------------------------------------------------------------
# the model must be one whose packed log-probs equal its own forward


def test_a_model_whose_head_transforms_logits_is_refused_before_training(tmp_path, model_dir, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", 4)
    real = objective_base.load_model

    def load_scaled(config, device):  # a head that scales its logits, as an unknown architecture might
        model = real(config, device)
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 2)
        return model

    monkeypatch.setattr(objective_base, "load_model", load_scaled)
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    with pytest.raises(UserError, match="head transforms the logits"):
        train(cfg)
    assert latest_checkpoint(cfg.output_dir) is None
