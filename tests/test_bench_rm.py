"""benchmarks/bench_rm.py: its providers train the same loss, and its CPU smoke run writes its rows."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_rm  # noqa: E402
from test_benchmarks import check_smoke_run  # noqa: E402

TORCH_THREADS = 1


def test_providers_compute_the_same_loss_and_gradient():
    # A speed comparison means something only if every provider trains the same thing.
    model = bench_rm.build_reward_model("tiny", torch.device("cpu"), torch.float32)
    items = bench_rm.queries(3, 4, 9, 5, model.config.vocab_size, seed=0)
    items[1].scores = [1.0, 1.0, 0.0, 2.0]  # a tie: no pair between responses 0 and 1
    results = {}
    for name, step in {
        "packed": bench_rm.packed_step(model, None, items, 40, torch.device("cpu")),  # 2+ micro-batches
        "pairs": bench_rm.padded_step(model, None, items, True, torch.device("cpu")),
        "responses": bench_rm.padded_step(model, None, items, False, torch.device("cpu")),
    }.items():
        loss = step()
        results[name] = (loss, model.model.layers[0].mlp.up_proj.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    loss, grad = results["packed"]
    for name in ("pairs", "responses"):
        assert results[name][0] == pytest.approx(loss, abs=1e-6), name
        torch.testing.assert_close(results[name][1], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_rm_step_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_rm.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--profile"]) == 0
    finally:
        torch.set_num_threads(threads)
    check_smoke_run(tmp_path, "rm_step", set(bench_rm.PROVIDERS))
