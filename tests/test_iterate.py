"""rrhf_fast.pipelines.iterate: every round's files, resume after a crash in round 2 (bitwise equal to the run
that never stopped), DPO rounds with reference log-probs, the command line."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import rrhf_fast.pipelines.iterate as iterate_module
import rrhf_fast.training.train as train_module
from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import load_examples
from rrhf_fast.errors import UserError
from rrhf_fast.generation.sample import SampleConfig
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.pipelines.demo_task import gold_of
from rrhf_fast.pipelines.iterate import IterateConfig, Settings, iterate

SCORER = "python:rrhf_fast.pipelines.demo_task:query_reward"
STEPS = 3  # per round


TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    digits = ["".join(rng.sample("0123456789", 4)) for _ in range(8)]
    (root / "prompts.txt").write_text("".join(f"sort {d}:\n" for d in digits[:6]))
    (root / "eval.txt").write_text("".join(f"sort {d}:\n" for d in digits[6:]))
    gold = [{"query": f"sort {d}:", "responses": [gold_of(d)]} for d in digits[:3]]
    (root / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    return {"model": save_tiny_model(root / "model", seed=0), **{p.stem: p for p in root.iterdir()}}


def settings(task, out, rounds=2, resume=False, **train):
    run = IterateConfig(output_dir=str(out), prompts=str(task["prompts"]), scorer=SCORER, rounds=rounds,
                        eval_prompts=str(task["eval"]), num_candidates=3, merge=(str(task["gold"]),),
                        resume=resume)  # fmt: skip
    base = dict(
        model=str(task["model"]),
        data="",
        output_dir="",
        max_steps=STEPS,
        queries_per_step=2,
        optim="adamw",
        lr=1e-2,
        warmup_steps=0,
        device="cpu",
        log_every=0,
        plot=False,
        save_every=0,
    )
    sample = SampleConfig(strategy="sample", max_new_tokens=5, seed=0)
    return Settings(run, TrainConfig(**{**base, **train}), sample)


def final_weights(out):
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[-1])
    return load_file(out / row["model"] / "model.safetensors")


def summary(out):
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_two_rounds_then_resume_after_a_crash_in_round_two_is_bitwise_equal(task, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    rows = iterate(settings(task, whole))
    assert [r["round"] for r in rows] == [0, 1, 2] and summary(whole) == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows
    ]
    for r in (1, 2):
        rdir = whole / f"round-00{r}"
        for name in ("sampled.jsonl", "scored.jsonl", "trained.json", "eval.jsonl", "round.json"):
            assert (rdir / name).is_file(), name
        assert len((rdir / "train" / "metrics.jsonl").read_text().splitlines()) == STEPS
        sampled, scored = (
            load_examples(rdir / "sampled.jsonl", require_scores=False),
            load_examples(rdir / "scored.jsonl"),
        )
        assert [ex.responses for ex in sampled] == [ex.responses for ex in scored]
        assert sum(ex.meta["sources"].count("gold") for ex in scored) == 3  # the merged source, every round
        assert all(
            s == 1.0
            for ex in scored
            for s, src in zip(ex.scores, ex.meta["sources"], strict=True)
            if src == "gold"
        )
    assert rows[2]["model"] == f"round-002/train/checkpoint-{STEPS}"
    # round 2 starts from round 1's model: its first training step loads round 1's final weights
    assert json.loads((whole / "round-002" / "train" / "config.json").read_text())["model"] == str(
        whole / rows[1]["model"]
    )

    # The same run, killed in the middle of round 2's training (after its step-1 checkpoint).
    crashed = tmp_path / "crashed"
    calls, real = {"n": 0}, train_module.forward_backward

    def crash_in_round_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEPS + 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "forward_backward", crash_in_round_two)
        with pytest.raises(RuntimeError, match="simulated crash"):
            iterate(settings(task, crashed, save_every=1))  # a checkpoint each step
    assert (crashed / "round-001" / "round.json").exists() and not (
        crashed / "round-002" / "round.json"
    ).exists()
    assert (crashed / "round-002" / "train" / "checkpoint-1").is_dir()
    with pytest.raises(UserError, match="--resume"):
        iterate(settings(task, crashed))

    # --resume: no sampling or scoring again (round 1 complete, round 2 sampled and scored), the
    # training goes on from its checkpoint, and everything equals the uninterrupted run.
    redone = []
    for stage in ("_sample", "_score", "_evaluate"):
        real_stage = getattr(iterate_module, stage)
        monkeypatch.setattr(
            iterate_module, stage, lambda *a, _f=real_stage, _n=stage: redone.append(_n) or _f(*a)
        )
    steps = {"n": 0}

    def count(*args, **kwargs):
        steps["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", count)
    iterate(settings(task, crashed, resume=True, save_every=1))
    assert redone == ["_evaluate"]  # round 2's evaluation only
    assert steps["n"] == STEPS - 1  # round 2's training went on from its checkpoint-1
    a, b = final_weights(whole), final_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(whole) == summary(crashed)
    for r in (1, 2):
        for name in ("sampled.jsonl", "scored.jsonl", "eval.jsonl"):
            assert (whole / f"round-00{r}" / name).read_text() == (
                crashed / f"round-00{r}" / name
            ).read_text()


def test_dpo_rounds_store_the_reference_log_probs(task, tmp_path):
    out = tmp_path / "dpo"
    # lr 3e-3: with the mean over paired queries only (the old mean diluted it by the tied ones), lr 1e-2
    # ended step 3 at 0.93, above step 1's ln 2
    iterate(settings(task, out, rounds=1, loss="dpo", dpo_beta=0.5, queries_per_step=6, lr=3e-3))
    data = load_examples(out / "round-001" / "reference.jsonl")
    assert len(data) == 6 and all(len(ex.meta["ref_logps"]) == len(ex.responses) for ex in data)
    assert all(v < 0 for ex in data for v in ex.meta["ref_logps"])
    metrics = [
        json.loads(x) for x in (out / "round-001" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    # The round's starting model is the reference: at step 1 (all 6 queries) every pair has margin 0,
    # and the mean is over the queries that form a pair (the tied ones are counted, not averaged in).
    pairs = sum(len(set(ex.scores)) > 1 for ex in data)
    assert pairs >= 3 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["tied_queries"] == 6 - pairs
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.parametrize("loss", ["dpo-pl", "lipo"])
def test_listwise_reference_losses_train_on_the_rounds_reference_log_probs(task, tmp_path, loss):
    out = tmp_path / loss
    iterate(settings(task, out, rounds=1, loss=loss, queries_per_step=6, lr=3e-3))
    data = load_examples(out / "round-001" / "reference.jsonl")
    assert all(len(ex.meta["ref_logps"]) == len(ex.responses) for ex in data)
    metrics = [
        json.loads(x) for x in (out / "round-001" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # the round's start is the reference
    # the margin, not the loss: LiPO's Lambda weights follow the model's own order, which training moves
    assert metrics[-1]["margin"] > metrics[0]["margin"]


def test_lora_rounds_build_on_each_other_through_merged_models(task, tmp_path):
    """Each round's adapter is folded into that round's starting model: round 2's model is the
    initial one plus two rank-r updates (rank 2r), not plus round 2's adapter alone."""
    out = tmp_path / "lora"
    rows = iterate(settings(task, out, lora_r=2, lr=0.05))
    assert [row["model"] for row in rows[1:]] == ["round-001/merged", "round-002/merged"]
    config = json.loads((out / "round-002" / "train" / "config.json").read_text())
    assert config["model"] == str(out / "round-001" / "merged")
    paths = (task["model"], out / "round-001" / "merged", out / "round-002" / "merged")
    init, one, two = (load_file(path / "model.safetensors") for path in paths)
    name = "model.layers.0.self_attn.q_proj.weight"

    def rank(delta):
        return int(torch.linalg.matrix_rank(delta.double(), atol=1e-4))

    assert (rank(one[name] - init[name]), rank(two[name] - one[name]), rank(two[name] - init[name])) == (
        2,
        2,
        4,
    )
    assert torch.equal(
        init["model.embed_tokens.weight"], two["model.embed_tokens.weight"]
    )  # not a LoRA target


def test_command_line_runs_a_round_and_reports_the_rewards(task, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["iterate", "--model", str(task["model"]), "--prompts", str(task["prompts"]), "--eval-prompts",
            str(task["eval"]), "--scorer", SCORER, "--output-dir", str(out), "--rounds", "1",
            "--num-candidates", "2", "--sample-strategy", "sample", "--sample-max-new-tokens", "4",
            "--max-steps", "1", "--optim", "adamw", "--device", "cpu", "--no-plot", "--merge",
            str(task["gold"]), "--dedup"]  # fmt: skip
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert last.startswith(f"iterate: held-out reward by round: {rows[0]['eval_reward']:.3f} -> ")
    saved = json.loads((out / "iterate.json").read_text())
    assert saved["sample"]["max_new_tokens"] == 4 and saved["train"]["max_steps"] == 1
    assert saved["run"]["merge"] == [str(task["gold"])] and saved["run"]["dedup"] is True


def test_bad_flags_are_one_sentence_errors(task, tmp_path, capsys):
    argv = ["iterate", "--model", str(task["model"]), "--prompts", str(task["prompts"]), "--scorer", "nope",
            "--output-dir", str(tmp_path / "x"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "--scorer 'nope'" in capsys.readouterr().err
    assert main([*argv[:-6], "--scorer", SCORER, "--output-dir", str(tmp_path / "y"), "--sample-strategy",
                 "greedy", "--num-candidates", "3"]) == 2  # fmt: skip
    assert "one response per prompt" in capsys.readouterr().err


def test_a_policy_with_only_empty_answers_is_one_clear_error(task, tmp_path, monkeypatch):
    import rrhf_fast.generation.sample as sample_module

    monkeypatch.setattr(
        sample_module, "generate_candidates", lambda model, tok, queries, k, cfg: [[""] * k] * len(queries)
    )
    s = settings(task, tmp_path / "empty", rounds=1)
    s.run.merge = ()
    with pytest.raises(UserError, match="round 1: .* gave only empty responses"):
        iterate(s)
    assert not (tmp_path / "empty" / "round-001" / "sampled.jsonl").exists()


def test_resuming_a_run_saved_with_the_old_train_field_names_changes_no_flag(tmp_path, capsys):
    """An iterate.json written before --loss-impl became --kernels and --mode became --length-norm."""
    from rrhf_fast.pipelines.iterate import CONFIG_FILE, _prepare

    fake = {"prompts": tmp_path / "p.txt", "eval": tmp_path / "e.txt", "gold": tmp_path / "g.jsonl",
            "model": tmp_path / "model"}  # fmt: skip
    run = settings(fake, tmp_path / "run", resume=True, kernels="torch", length_norm="official")
    saved = json.loads(json.dumps(run.to_dict()))
    saved["train"]["loss_impl"], saved["train"]["mode"] = (
        saved["train"].pop("kernels"),
        saved["train"].pop("length_norm"),
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(saved), encoding="utf-8")
    _prepare(run)
    assert "changed flags" not in capsys.readouterr().out
    _prepare(settings(fake, tmp_path / "run", resume=True, kernels="auto", length_norm="official"))
    assert "train.kernels: 'torch' -> 'auto'" in capsys.readouterr().out


def test_loss_rm_is_refused_before_any_work(task, tmp_path):
    """iterate trains the policy it samples from; a reward model is `rrhf-fast train-rm`'s job."""
    with pytest.raises(UserError, match="train-rm"):
        iterate(settings(task, tmp_path / "rm", loss="rm"))
    assert not (tmp_path / "rm").exists()
