"""benchmarks/bench_losses.py: the packed and padded-pair providers train the same SimPO loss, and its CPU
smoke run writes rows with machine, versions, date, commit and a tensor-count peak memory."""

import csv
import datetime as dt
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_losses  # noqa: E402
import workload  # noqa: E402

TORCH_THREADS = 1


def test_packed_and_all_pairs_compute_the_same_loss_and_gradient():
    # A speed comparison means something only if both providers train the same thing.
    model = workload.build_llama("tiny", torch.device("cpu"), torch.float32)
    items = bench_losses.queries(3, 4, 12, 3, model.config.vocab_size, seed=0)
    results = {}
    for name, step in {
        "packed": bench_losses.packed_step(model, None, items, 40, torch.device("cpu"), impl="torch"),
        "pairs": bench_losses.padded_step(model, None, items, False, torch.device("cpu")),
    }.items():
        loss = step()
        results[name] = (loss, model.model.layers[0].mlp.up_proj.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    assert results["pairs"][0] == pytest.approx(results["packed"][0], abs=1e-6)
    torch.testing.assert_close(results["pairs"][1], results["packed"][1], rtol=1e-4, atol=1e-6)


def test_pair_rows_are_the_k_choose_2_or_k_minus_1_copies():
    items = bench_losses.queries(2, 4, 3, 2, 50, seed=1)
    assert len(bench_losses.pair_rows(items, best_only=False)[2]) == 2 * 6
    assert len(bench_losses.pair_rows(items, best_only=True)[2]) == 2 * 3


def test_loss_step_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_losses.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--ks", "2,4"]) == 0
    finally:
        torch.set_num_threads(threads)
    with (tmp_path / "loss_step_cpu_smoke.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["x"]) for r in rows} == {
        (p, k) for p in bench_losses.PROVIDERS for k in ("2", "4")
    }
    for r in rows:
        assert r["status"] == "ok" and r["gpu"] == "cpu" and r["torch"] == torch.__version__
        assert float(r["ms_p20"]) <= float(r["ms_median"]) <= float(r["ms_p80"])
        assert float(r["peak_mem_gib"]) > float(r["extra_mem_gib"]) > 0
        assert "prompt cop" in r["note"] and r["commit"]
        dt.datetime.fromisoformat(r["date"])
    peak = {(r["provider"], r["x"]): float(r["peak_mem_gib"]) for r in rows}
    assert (
        peak["padded/all-pairs", "4"] > peak["rrhf-fast/packed", "4"]
    )  # 12 rows of prompt + response vs 1 row
    assert "## cpu" in (tmp_path / "loss_step_cpu_smoke.md").read_text()
