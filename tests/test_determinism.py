"""CPU training is deterministic for a given thread count: the same RRHF run twice, with 2 torch
threads, gives the same weights bit for bit (what the bit-exact resume promise and the README's demo
figures rest on); and `demo --seeds` reports each seed's figures as a run of that seed alone does.

The model has the demo's width and the micro-batches are a few thousand tokens, so the logits, the
attention and the matmuls are large enough for ATen to split them over both threads.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.pipelines.demo_seeds import parse_seeds, run_seeds
from rrhf_fast.pipelines.demo_task import DemoConfig, gold_of, make_digits, prompt_of, reward

TORCH_THREADS = 2


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("det")
    rng = random.Random(0)
    examples = []
    for _ in range(96):
        digits = make_digits(rng, 3, 6)
        cands = [gold_of(digits), gold_of(digits)[::-1], digits, digits[:-1]]
        examples.append(Example(prompt_of(digits), cands, [reward(digits, c) for c in cands]))
    write_examples(root / "train.jsonl", examples)
    return save_tiny_model(root / "model", seed=0, hidden_size=128, layers=2), root


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_the_same_rrhf_run_twice_gives_the_same_weights_bitwise(task, optim):
    from rrhf_fast.training.train import train

    model, root = task
    assert torch.get_num_threads() == 2
    weights = []
    for run in ("a", "b"):
        out = root / f"{optim}-{run}"
        cfg = TrainConfig(model=str(model), data=str(root / "train.jsonl"), output_dir=str(out), max_steps=4,
                          queries_per_step=32, micro_batch_tokens=2048, lr=3e-3, warmup_steps=1, optim=optim,
                          device="cpu", seed=0, save_every=0, log_every=0, plot=False)  # fmt: skip
        train(cfg)
        (file,) = (out / "checkpoint-4").glob("*.safetensors")
        weights.append(load_file(file))
    a, b = weights
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    base = load_file(next((model).glob("*.safetensors")))
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)  # it trained


@pytest.mark.parametrize(
    "text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("3", [3]), ("0,3,7", [0, 3, 7]), ("0-2,5,1", [0, 1, 2, 5])]
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["a", "3-1", "-2", "1,,2", "0-x"])
def test_bad_seeds_are_one_sentence(text):
    with pytest.raises(UserError, match=re.escape(f"--seeds {text!r}")):
        parse_seeds(text)


def test_run_seeds_tabulates_each_seed_with_mean_min_max(tmp_path, capsys):
    """The aggregation alone, on a run function whose figures depend on the seed it is given."""
    seen = []

    def run(config):
        seen.append((config.seed, config.output_dir, config.seeds))
        return {"before": 0.0, "rrhf": {"reward": 0.5 + config.seed / 10}, "sft": {"reward": 0.6}}

    result = run_seeds(DemoConfig(output_dir=str(tmp_path), seeds="1-3"), run)
    assert seen == [(s, str(tmp_path / f"seed-{s}"), "") for s in (1, 2, 3)]
    assert result["summary"]["RRHF"] == {"mean": pytest.approx(0.7), "min": 0.6, "max": 0.8}
    assert result["summary"]["RRHF minus SFT-only"] == {"mean": pytest.approx(0.1), "min": pytest.approx(0.0),
                                                        "max": pytest.approx(0.2)}  # fmt: skip
    assert json.loads((tmp_path / "seeds.json").read_text())["per_seed"]["2"]["RRHF"] == pytest.approx(0.7)
    out = capsys.readouterr().out
    assert "| RRHF | 0.600 | 0.700 | 0.800 | 0.700 | 0.600 | 0.800 |" in out
    assert "| RRHF minus SFT-only | +0.000 | +0.100 | +0.200 | +0.100 | +0.000 | +0.200 |" in out


@pytest.mark.slow
def test_demo_seeds_reports_each_seed_as_its_own_run(tmp_path, capsys):
    """Two seeds of a short demo: the table's columns equal what `demo --seed N` alone prints, and the
    mean, min and max are those of the columns."""
    small = ["--steps", "6", "--train-queries", "64", "--eval-queries", "16", "--queries-per-step", "8",
             "--hidden-size", "32", "--threads", "2"]  # fmt: skip
    assert main(["demo", "--output-dir", str(tmp_path / "many"), "--seeds", "0-1", *small]) == 0
    out = capsys.readouterr().out
    assert "demo --seeds 0-1: held-out reward of greedy answers, 2 torch threads" in out
    table = json.loads((tmp_path / "many" / "seeds.json").read_text())
    assert table["seeds"] == [0, 1] and table["threads"] == 2
    alone = {}
    for seed in (0, 1):
        assert (
            main(["demo", "--output-dir", str(tmp_path / f"alone{seed}"), "--seed", str(seed), *small]) == 0
        )
        lines = capsys.readouterr().out.splitlines()
        rrhf = next(line for line in lines if line.startswith("RRHF (rank + SFT)"))
        sft = next(line for line in lines if line.startswith("SFT only"))
        alone[seed] = [float(re.search(r"-> (\d\.\d{3})", line).group(1)) for line in (rrhf, sft)]
    for seed in (0, 1):
        got = table["per_seed"][str(seed)]
        assert [round(got["RRHF"], 3), round(got["SFT-only"], 3)] == alone[seed]
    for name, stats in table["summary"].items():
        values = [table["per_seed"][str(s)][name] for s in (0, 1)]
        assert stats == {"mean": pytest.approx(sum(values) / 2), "min": min(values), "max": max(values)}
    row = next(line for line in out.splitlines() if line.startswith("| RRHF minus SFT-only |"))
    assert len(row.split("|")) == 2 + 2 + 3 + 1  # name, two seeds, mean, min, max
