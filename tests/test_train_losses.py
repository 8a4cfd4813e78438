"""`rrhf-fast train --loss dpo-pl|lipo|pro|simpo|orpo` end to end on a tiny model: the command line, the
packed batch and fused log-prob path, metrics (the loss terms, margin, ranking accuracy), held-out
evaluation, LoRA, exact resume, and each loss's refusal of data it cannot train on."""

import itertools
import json
import math
import random
import shutil

import pytest

from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)
REFERENCE = ("dpo-pl", "lipo")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _data(n, seed=0):
    """k = 3 or 4 responses; the fourth, when present, ties the second."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        digits = "".join(rng.sample("0123456789", rng.randint(2, 5)))
        gold = "".join(sorted(digits))
        responses, scores = [gold, digits, gold[::-1] + "9"], [1.0, 0.4, 0.0]
        if i % 2:
            responses, scores = [*responses, digits + "0"], [*scores, 0.4]
        examples.append(Example(f"sort {digits}:", responses, scores))
    return examples


@pytest.fixture(scope="module")
def data(tmp_path_factory, model_dir):
    """Training and held-out files, with reference log-probs of the starting model (`ref-logps`)."""
    root = tmp_path_factory.mktemp("data")
    write_examples(root / "plain.jsonl", _data(8))
    write_examples(root / "eval-plain.jsonl", _data(4, seed=1))
    for name in ("plain", "eval-plain"):
        code = main(["ref-logps", "--model", str(model_dir), "--in", str(root / f"{name}.jsonl"),
                     "--out", str(root / f"{name}-ref.jsonl"), "--device", "cpu"])  # fmt: skip
        assert code == 0
    return root


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _argv(model_dir, data, run, loss, *extra):
    suffix = "-ref" if loss in REFERENCE else ""
    return ["train", "--model", str(model_dir), "--data", str(data / f"plain{suffix}.jsonl"),
            "--eval-data", str(data / f"eval-plain{suffix}.jsonl"), "--output-dir", str(run), "--loss", loss,
            "--optim", "adamw", "--lr", "3e-3", "--warmup-steps", "0", "--max-steps", "6",
            "--queries-per-step", "8", "--device", "cpu", "--log-every", "0", "--no-plot",
            *extra]  # fmt: skip


def _start_loss(loss, examples):
    """The loss at step 1, where the policy is its own reference (u = 0 up to rounding): dpo-pl's
    Plackett-Luce terms are log |pool|; LiPO's pairs are -log sigmoid(0) times their Lambda weight,
    whose positions follow the rounding noise in u: (lowest, highest) over every order."""
    if loss == "dpo-pl":
        total = 0.0
        for ex in examples:
            s = ex.scores
            total += sum(math.log(sum(t <= si for t in s)) for si in s if any(t < si for t in s))
        return total / len(examples), total / len(examples)
    low = high = 0.0
    for ex in examples:
        s = ex.scores
        values = []
        for tau in itertools.permutations(range(1, len(s) + 1)):
            inv_d = [1 / math.log2(1 + t) for t in tau]
            values.append(sum(abs(2 ** s[i] - 2 ** s[j]) * abs(inv_d[i] - inv_d[j]) * math.log(2)
                              for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]))  # fmt: skip
        low, high = low + min(values), high + max(values)
    return low / len(examples), high / len(examples)


@pytest.mark.parametrize("loss", ["dpo-pl", "lipo", "pro", "simpo", "orpo"])
def test_train_each_loss_from_the_command_line(tmp_path, model_dir, data, loss, capsys):
    run = tmp_path / "run"
    assert main(_argv(model_dir, data, run, loss)) == 0, capsys.readouterr().err
    rows = _rows(run)
    train_rows = [r for r in rows if "loss" in r and "step" in r]
    first, last = train_rows[0], train_rows[-1]
    assert {"loss", "rank_loss", "sft_loss", "margin", "accuracy", "top1", "best_reward"} <= set(first)
    assert first["loss"] == pytest.approx(first["rank_loss"] + first["sft_loss"], abs=1e-6)
    if loss in REFERENCE:  # the policy is its reference at step 1: every margin 0, the loss known
        assert first["margin"] == pytest.approx(0.0, abs=1e-5)
        low, high = _start_loss(loss, _data(8))
        assert low - 1e-4 <= first["loss"] <= high + 1e-4
    if loss in ("pro", "orpo"):
        assert first["sft_loss"] > 0
    assert last["loss"] < first["loss"]
    assert last["margin"] > first["margin"]
    config = json.loads((run / "config.json").read_text())
    assert config["loss"] == loss
    final = [r for r in rows if "eval_loss" in r][-1]
    assert final["eval_accuracy"] is not None and math.isfinite(final["eval_loss"])


def test_lora_run_resumes_exactly(tmp_path, model_dir, data):
    """LoRA and --resume: steps 3-4 resumed from checkpoint-2 end where the uninterrupted run ended."""
    base = dict(model=str(model_dir), data=str(data / "plain-ref.jsonl"), output_dir=str(tmp_path / "a"),
                loss="lipo", lipo_beta=0.5, lora_r=4, lora_alpha=8.0, optim="adamw", lr=1e-2, warmup_steps=0,
                max_steps=4, queries_per_step=4, device="cpu", log_every=0, plot=False, save_every=2,
                keep_checkpoints=3)  # fmt: skip
    whole = train(TrainConfig(**base))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    (tmp_path / "b" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _rows(tmp_path / "a") if r.get("step", 0) <= 2)
    )
    resumed = train(TrainConfig(**{**base, "output_dir": str(tmp_path / "b"), "resume": True}))
    assert resumed.step == whole.step == 4
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    assert _rows(tmp_path / "a")[-1]["loss"] == _rows(tmp_path / "b")[-1]["loss"]


@pytest.mark.parametrize("loss", ["dpo-pl", "lipo"])
def test_reference_losses_refuse_data_without_ref_logps(tmp_path, model_dir, data, loss, capsys):
    argv = _argv(model_dir, data, tmp_path / "run", loss)
    argv[argv.index("--data") + 1] = str(data / "plain.jsonl")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f'--loss {loss} needs a "ref_logps" list' in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("loss", "flags"),
    [("simpo", {}), ("dpo-pl", {}), ("pro", {"pro_sft_weight": 0.0})],
    ids=["simpo", "dpo-pl", "pro"],
)
def test_a_loss_refuses_data_it_trains_nothing_on(tmp_path, model_dir, loss, flags):
    examples = [Example(f"q{i}", ["a", "b"], [0.5, 0.5]) for i in range(3)]
    for ex in examples:
        ex.meta["ref_logps"] = [-1.0, -1.0]
    write_examples(tmp_path / "tied.jsonl", examples)
    cfg = TrainConfig(model=str(model_dir), data=str(tmp_path / "tied.jsonl"), output_dir=str(tmp_path / "r"),
                      loss=loss, device="cpu", max_steps=1, **flags)  # fmt: skip
    with pytest.raises(
        UserError, match=f"no query has two responses with different scores, so --loss {loss}"
    ):
        train(cfg)


def test_orpo_and_pro_train_sft_on_data_without_pairs(tmp_path, model_dir):
    """A loss with an SFT term trains on queries without a pair (ORPO: its SFT term)."""
    write_examples(tmp_path / "one.jsonl", [Example(f"sort {i}:", [str(i)], [1.0]) for i in range(4)])
    cfg = TrainConfig(model=str(model_dir), data=str(tmp_path / "one.jsonl"), output_dir=str(tmp_path / "r"),
                      loss="orpo", device="cpu", max_steps=1, optim="adamw", log_every=0,
                      plot=False)  # fmt: skip
    train(cfg)
    row = _rows(tmp_path / "r")[0]
    assert row["rank_loss"] == 0.0 and row["sft_loss"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"dpo_loss": "hinge", "dpo_label_smoothing": 0.1},
            "--dpo-label-smoothing applies to --dpo-loss robust",
        ),
        ({"dpo_loss": "robust", "dpo_label_smoothing": 0.5}, "--dpo-label-smoothing must be in [0, 0.5)"),
        ({"loss": "dpo-pl", "dpo_loss": "ipo"}, "--loss dpo-pl is the Plackett-Luce generalisation"),
        ({"loss": "simpo", "simpo_beta": 0.0}, "--simpo-beta must be a positive number"),
        ({"loss": "lipo", "lipo_beta": -1.0}, "--lipo-beta must be a positive number"),
        ({"loss": "orpo", "orpo_lambda": -0.1}, "--orpo-lambda must be a non-negative number"),
    ],
    ids=["smoothing-hinge", "smoothing-half", "dpo-pl-ipo", "simpo-beta", "lipo-beta", "orpo-lambda"],
)
def test_bad_loss_flags_are_one_sentence_errors(flags, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(model="m", data="d", output_dir="o", **flags).validate()


@pytest.mark.parametrize("loss", ["dpo", "dpo-pl", "lipo", "pro", "simpo", "orpo"])
def test_plan_simulates_each_loss_on_fake_tensors(tmp_path, loss, capsys):
    """`rrhf-fast plan` runs the step under FakeTensorMode: no loss may need a data-dependent shape."""
    from rrhf_fast.models.tiny import tiny_config

    tiny_config("llama", num_layers=1).save_pretrained(tmp_path)
    assert (
        main(["plan", "--model", str(tmp_path), "--micro-batch-tokens", "256", "--loss", loss, "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["peak_bytes"] > 0


def test_optim_in_backward_trains_a_ranking_loss_like_the_ordinary_step(tmp_path, model_dir, data):
    """--optim-in-backward (updates inside the backward, two passes with --max-grad-norm) on simpo:
    the same weights as the ordinary step with torch AdamW."""
    base = dict(model=str(model_dir), data=str(data / "plain.jsonl"), loss="simpo", optim="adamw", lr=1e-3,
                warmup_steps=0, max_steps=2, queries_per_step=4, device="cpu", log_every=0, plot=False,
                save_every=0)  # fmt: skip
    plain = train(TrainConfig(**base, output_dir=str(tmp_path / "a")))
    inside = train(TrainConfig(**base, output_dir=str(tmp_path / "b"), optim_in_backward=True))
    a, b = plain.model.state_dict(), inside.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert _rows(tmp_path / "b")[-1]["loss"] == pytest.approx(_rows(tmp_path / "a")[-1]["loss"], rel=1e-6)
