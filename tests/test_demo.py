"""rrhf_fast.demo: the task's reward, and shortened demos whose held-out reward must rise."""

import random
import re

import pytest

from rrhf_fast.cli import main
from rrhf_fast.demo import corrupt, gold_of, reward


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
