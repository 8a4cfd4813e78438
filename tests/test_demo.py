"""rrhf_fast.pipelines.demo: the task's reward, and shortened demos whose held-out reward must rise."""

import json
import random
import re
from itertools import combinations

import pytest

from rrhf_fast.cli import main
from rrhf_fast.data.records import load_examples
from rrhf_fast.generation.score import build_scorer
from rrhf_fast.pipelines.demo_online import _reward_model_run, _settings, _task
from rrhf_fast.pipelines.demo_task import DemoConfig, corrupt, gold_of, query_reward, reward
from rrhf_fast.pipelines.iterate import iterate


@pytest.mark.parametrize(
    "digits, response, expected",
    [
        pytest.param("4193", "1349", 1.0, id="sorted"),
        pytest.param("4193", "1394", 0.5, id="two-wrong"),
        pytest.param("4193", "134", 0.75, id="one-short"),
        pytest.param("4193", "13499", 0.8, id="one-long"),
        pytest.param("4193", "", 0.0, id="empty"),
        pytest.param("4193", "abcd", 0.0, id="garbage"),
    ],
)
def test_reward_gives_partial_credit(digits, response, expected):
    assert reward(digits, response) == pytest.approx(expected)


def test_corruptions_always_change_the_answer():
    rng = random.Random(0)
    for _ in range(500):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))
        assert corrupt(rng, gold_of(digits), rng.randint(1, 3)) != gold_of(digits)


def _run_demo(tmp_path, capsys, *flags):
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), *flags])
    out = capsys.readouterr().out
    assert code == 0
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"demo: reward (\d\.\d{3}) -> (\d\.\d{3})", last)
    assert match, last
    assert (tmp_path / "demo" / "rrhf" / "metrics.jsonl").exists()
    return float(match.group(1)), float(match.group(2)), out


def test_short_demo_reward_rises(tmp_path, capsys):
    before, after, out = _run_demo(
        tmp_path,
        capsys,
        "--steps",
        "30",
        "--train-queries",
        "240",
        "--eval-queries",
        "40",
        "--no-sft-baseline",
    )
    assert before < 0.05  # a random model writes bytes, not digits
    assert after > before + 0.15
    assert (tmp_path / "demo" / "rrhf" / "curves.png").exists()


def test_demo_with_baseline_reward_rises(tmp_path, capsys):
    before, after, out = _run_demo(
        tmp_path, capsys, "--steps", "120", "--train-queries", "800", "--eval-queries", "80"
    )
    assert after > before + 0.3
    assert "SFT only (--rank-weight 0)" in out and (tmp_path / "demo" / "sft" / "curves.png").exists()


# -------------------------------------------------------------------------------------------------
# --online: SFT warm-up, then reward-only RRHF through rrhf-fast iterate, offline vs online


def test_query_reward_reads_the_digits_from_the_prompt():
    assert query_reward("sort 4193:", "1394") == reward("4193", "1394") == 0.5
    with pytest.raises(ValueError, match="not a demo prompt"):
        query_reward("sort these: 4193", "1349")


@pytest.mark.usefixtures("one_thread")
def test_short_online_run_raises_the_reward_in_every_round(tmp_path):
    """600 prompts, 150 steps in 3 rounds, seed 0. Measured with 1, 2 and 3 torch threads: from 0.300
    at the start, rounds between 0.44 and 0.56; the policy's own candidates 0.203 -> 0.30-0.32. Rounds
    this short (50 steps) do not reliably rise one after another (the slow test below shows that at
    the demo's size), but every round stays well above the warmed-up start."""
    config = DemoConfig(output_dir=str(tmp_path), train_queries=600, eval_queries=100, steps=150, seed=0)
    policy, files = _task(config, tmp_path)
    rows = iterate(_settings(config, policy, files, tmp_path / "online", rounds=3, rank_weight=1.0))
    start, *rounds = [row["eval_reward"] for row in rows]
    assert len(rounds) == 3 and min(rounds) > start + 0.1
    assert [row["train_steps"] for row in rows[1:]] == [50, 50, 50]
    sampled = [row["sampled_reward"] for row in rows[1:]]
    assert sampled[-1] > sampled[0] + 0.05  # the policy's own candidates get better: it is online


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_online_demo_beats_one_offline_round_with_the_same_steps(tmp_path, capsys):
    """The default demo --online, seed 0. Measured (offline; online by round) with 2 torch threads:
    0.623; 0.627 0.704 0.735 (`demo --online --seeds 0-2`: online minus offline +0.033 to +0.112).
    With --reward-model (run after the other two, which it leaves unchanged), 1 thread, commit
    8e0c651 and its pre-rebase parent alike: reward model held-out accuracy 0.508 -> 0.777 (2344
    pairs); the RM-scored online run 0.495 -> 0.534 0.491 0.466 by the function while the reward
    model's own score of its answers rose -0.05 -> 0.20 0.51 0.68 (over-optimisation of an
    imperfect reward model)."""
    code = main(
        ["demo", "--online", "--reward-model", "--no-sft-baseline", "--output-dir", str(tmp_path / "demo")]
    )
    out = capsys.readouterr().out
    assert code == 0
    match = re.fullmatch(
        r"demo: online reward (\d\.\d{3}) -> (\d\.\d{3}) \(offline (\d\.\d{3})\)", out.splitlines()[-1]
    )
    assert match, out.splitlines()[-1]
    start, online, offline = map(float, match.groups())
    assert online > offline + 0.02 and offline > start + 0.1
    rows = [
        json.loads(line) for line in (tmp_path / "demo" / "online" / "rounds.jsonl").read_text().splitlines()
    ]
    rewards = [row["eval_reward"] for row in rows]
    assert all(b > a for a, b in zip(rewards, rewards[1:], strict=False))
    accuracy = re.search(r"held-out pairwise accuracy (\d\.\d{3}) -> (\d\.\d{3}) \((\d+) pairs\)", out)
    assert accuracy, out
    assert (
        float(accuracy.group(2)) >= 0.72 and float(accuracy.group(1)) < 0.6 and int(accuracy.group(3)) > 1000
    )
    table = re.search(r"online RRHF \(RM\) +((?:\d\.\d{3} +){4})", out)
    assert table and float(table.group(1).split()[0]) == start, out  # the same starting policy


# -------------------------------------------------------------------------------------------------
# --online --reward-model: train-rm on the reward function's labels, then online RRHF scored by it


@pytest.mark.usefixtures("one_thread")
def test_reward_model_option_learns_the_labels_and_reports_the_true_reward(tmp_path):
    """A tiny run of the option: label, train-rm, one online round scored by `reward-model:DIR`.
    The reported held-out accuracy is recomputed here from the saved reward model's scores of the
    held-out labels. Measured (seed 0, 1 thread, 320 pairs): 0.706 at step 0 (the warmed-up backbone
    with a random head already orders corrupted against sampled answers), 0.716 after 16 steps,
    0.769 after 32, 0.766 after 48. The gain over the starting accuracy is what shows learning: a
    model that does not learn keeps the starting 0.706, which clears any fixed bar near chance."""
    config = DemoConfig(output_dir=str(tmp_path), train_queries=48, eval_queries=24, steps=2, rounds=1,
                        queries_per_step=8, sft_warmup=10, rm_steps=32, seed=0)  # fmt: skip
    policy, files = _task(config, tmp_path)
    rm = _reward_model_run(config, policy, files, tmp_path)
    assert rm["eval_pairs"] > 200
    assert rm["accuracy"] >= rm["accuracy_start"] + 0.04, rm  # 0.04 of 320 pairs: 13 pairs more in order
    labels = load_examples(tmp_path / "rm-eval.jsonl")
    rewards = build_scorer(f"reward-model:{rm['checkpoint']}").score(
        [ex.query for ex in labels], [ex.responses for ex in labels]
    )
    pairs = [
        (s1 > s2) == (r1 > r2)
        for ex, rs in zip(labels, rewards, strict=True)
        for (s1, r1), (s2, r2) in combinations(zip(ex.scores, rs, strict=True), 2)
        if s1 != s2
    ]
    assert len(pairs) == rm["eval_pairs"] and sum(pairs) / len(pairs) == pytest.approx(rm["accuracy"])
    assert all(
        s == query_reward(ex.query, r) for ex in labels for r, s in zip(ex.responses, ex.scores, strict=True)
    )
    scored = json.loads((tmp_path / "online-rm" / "iterate.json").read_text())["run"]["scorer"]
    assert scored == f"reward-model:{rm['checkpoint']}"
    answers = [
        json.loads(line)
        for line in (tmp_path / "online-rm" / "round-001" / "eval.jsonl").read_text().splitlines()
    ]
    true = sum(query_reward(a["query"], a["answer"]) for a in answers) / len(answers)
    assert rm["run"]["rewards"][-1] == pytest.approx(true)  # the function's reward, not the model's
    assert rm["run"]["rm_rewards"][-1] == pytest.approx(sum(a["reward"] for a in answers) / len(answers))
    assert rm["run"]["rm_rewards"][-1] != pytest.approx(true)


# -------------------------------------------------------------------------------------------------
# --losses: the ranking losses compared from one warm-up


def test_demo_losses_trains_each_loss_from_the_warm_up(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--losses", "pro,lipo", "--steps", "4", "--train-queries", "32", "--eval-queries",
                 "8", "--max-digits", "4", "--queries-per-step", "8",
                 "--sft-warmup", "5", "--output-dir", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"demo: losses pro \d\.\d{3}, lipo \d\.\d{3}", last), last
    for loss in ("pro", "lipo"):
        assert json.loads((out / loss / "config.json").read_text())["loss"] == loss
        assert json.loads((out / loss / "config.json").read_text())["model"].endswith("checkpoint-5")
    # lipo's reference is the warmed-up policy: its first step has margin 0
    rows = [json.loads(line) for line in (out / "lipo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "margin" in r)
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)
    assert all(
        len(ex.meta["ref_logps"]) == len(ex.responses) for ex in load_examples(out / "train-ref.jsonl")
    )


def test_demo_losses_refuses_a_non_policy_loss(tmp_path, capsys):
    assert main(["demo", "--losses", "rrhf,rm", "--output-dir", str(tmp_path)]) == 2
    assert "--losses takes policy losses" in capsys.readouterr().err
