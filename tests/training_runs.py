"""What the training tests share: graded sorting data, a small CPU TrainConfig, a run's metrics."""

import json
import random

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples


def write_data(path, n=8, seed=0, equal_lengths=False):
    """n queries, 3 graded responses each (a sorted string, a near miss, a wrong order); with
    equal_lengths every query packs to the same size."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(4 if equal_lengths else rng.randint(2, 6)))
        gold = "".join(sorted(digits))
        responses = (
            [gold, digits, gold[::-1]] if equal_lengths else [gold, digits + "0", gold[::-1][:-1] or "x"]
        )
        examples.append(Example(query=f"sort {digits}:", responses=responses, scores=[1.0, 0.5, 0.0]))
    write_examples(path, examples)
    return path


def config(tmp_path, model_dir, data, name="run", **overrides):
    """torch AdamW on the CPU, no warmup, no saves or logs unless asked; run dir tmp_path / name."""
    base = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / name), optim="adamw", lr=1e-2,
                device="cpu", log_every=0, plot=False, save_every=0, warmup_steps=0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
