"""The benchmark scripts keep working: each CPU smoke run writes its CSV, report and figures.

Also the harness pieces a GPU run relies on and a CPU run cannot show: the peak table behind MFU,
the FLOP formula, the correctness gate for third-party kernels, and the target verdicts.
"""

import csv
import datetime as dt
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_attention  # noqa: E402
import bench_kernels  # noqa: E402
import bench_pack_budget  # noqa: E402
import bench_step  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402
import workload  # noqa: E402

REQUIRED = (
    "benchmark,provider,config,dtype,gpu,torch,triton,ms_median,ms_p20,ms_p80,peak_mem_gib,tflops,"
    "tokens_per_s,mfu,date,commit"
).split(",")


@pytest.fixture(autouse=True)
def keep_threads():
    """Smoke runs use one CPU thread; give the rest of the test session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(REQUIRED)] == REQUIRED
        return list(reader)


def check_smoke_run(out: Path, topic: str, providers: set[str]) -> list[dict[str, str]]:
    rows = read_csv(out / f"{topic}_cpu_smoke.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= providers
    for r in ok:
        assert float(r["ms_p20"]) <= float(r["ms_median"]) <= float(r["ms_p80"])
        assert float(r["tokens_per_s"]) > 0 and float(r["tflops"]) > 0
        assert r["gpu"] == "cpu" and r["torch"] == torch.__version__
        assert r["peak_mem_gib"] == "" and r["mfu"] == ""  # no CPU number is faked
        assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?|unknown", r["commit"])
        dt.datetime.fromisoformat(r["date"])
    for r in rows:
        assert r["status"] == "ok" or r["note"], "a provider without a number must say why"
    md = (out / f"{topic}_cpu_smoke.md").read_text()
    assert "## cpu" in md and "| config |" in md
    for figure in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / figure).stat().st_size > 1000
    assert (out / f"{topic}_cpu_smoke_profile.txt").read_text().count("\n## ") >= 1
    return rows


def test_kernels_smoke(tmp_path):
    assert bench_kernels.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--profile"]) == 0
    # triton runs under the interpreter here (tests/conftest.py sets TRITON_INTERPRET=1)
    rows = check_smoke_run(tmp_path, "kernels", {"torch", "triton"})
    assert {r["benchmark"] for r in rows} == {"token_logprobs_fwd", "token_logprobs_fwd_bwd"}
    skipped = {r["provider"]: r["note"] for r in rows if r["status"] == "skipped"}
    assert "CUDA only" in skipped["liger"] and "CUDA only" in skipped["cce"]
    # A second run appends: the CSV keeps the history, the report shows the latest.
    bench_kernels.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--providers", "torch"])
    assert len(read_csv(tmp_path / "kernels_cpu_smoke.csv")) > len(rows)


def test_step_smoke(tmp_path):
    assert bench_step.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--profile"]) == 0
    check_smoke_run(tmp_path, "step", {"rrhf-fast", "rrhf-fast/packed", "reference"})


def test_step_micro_batch_sweep_smoke(tmp_path):
    """--micro-batch-tokens: rrhf-fast/packed at the headline config, one row per budget, after it
    the (k, prompt length) sweep; --sweep-only leaves the headline config out."""
    argv = ["--cpu-smoke", "--out-dir", str(tmp_path), "--sweep-only", "--providers", "rrhf-fast/packed"]
    assert bench_step.main([*argv, "--micro-batch-tokens", "16,32"]) == 0
    rows = read_csv(tmp_path / "step_cpu_smoke.csv")
    assert [r["config"] for r in rows] == ["k=2 P=8 R=4 micro-batch=16", "k=2 P=8 R=4 micro-batch=32"] + [
        f"k={k} P={p} R=4" for k, p in bench_step.SMOKE_CONFIGS
    ]
    assert {r["status"] for r in rows} == {"ok"} and rows[0]["sweep"].startswith("micro-batch tokens")


def test_pack_budget_smoke(tmp_path):
    """Two budgets of the new dense path and one of dense-full, each a fresh `train` process."""
    argv = [
        "--smoke",
        "--budgets",
        "100,256",
        "--full-budgets",
        "100",
        "--steps",
        "2",
        "--out-dir",
        str(tmp_path),
    ]
    assert bench_pack_budget.main(argv) == 0
    rows = read_csv(tmp_path / "pack_budget_cpu_smoke.csv")
    assert [(r["provider"], r["config"]) for r in rows] == [
        ("dense", "budget=100"), ("dense", "budget=256"), ("dense-full", "budget=100")
    ]  # fmt: skip
    assert all(float(r["cpu_ms_median"]) > 0 and 0.1 < float(r["peak_mem_gib"]) < 8 for r in rows)
    md = (tmp_path / "pack_budget_cpu_smoke.md").read_text()
    assert "| dense | 256 |" in md and "| dense-full | 100 |" in md and "1.00x" in md


def test_attention_smoke(tmp_path):
    assert bench_attention.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--profile"]) == 0
    rows = check_smoke_run(tmp_path, "attention", {"shared-prompt/dense", "padded/sdpa"})
    assert all(r["status"] == "skipped" for r in rows if r["provider"] == "shared-prompt/flex")


@pytest.mark.slow
def test_kernels_smoke_torch_compile(tmp_path):
    bench_kernels.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--providers", "torch,torch.compile"])
    rows = read_csv(tmp_path / "kernels_cpu_smoke.csv")
    assert {r["status"] for r in rows if r["provider"] == "torch.compile"} == {"ok"}


@pytest.mark.slow
def test_run_gpu_script_smoke(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "SMOKE_OUT_DIR": str(tmp_path / "r"),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "run_gpu.sh"), "--cpu-smoke", "kernels", "step", "attention", "pytest-bench"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exit 0" in proc.stdout and "exit 1" not in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"results.tar.gz", "run_gpu.log", "step_cpu_smoke.md"}
    assert (tmp_path / "r" / "kernels_pytest_benchmark.json").exists()


# ---------------------------------------------------------------------------------------------
# Harness pieces


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 PCIe", None),  # not in the table: no MFU rather than a guessed peak
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, peak, monkeypatch):
    monkeypatch.delenv("RRHF_BENCH_PEAK_TFLOPS", raising=False)
    assert common.peak_bf16_tflops(name) == peak


def test_cpu_timer_quantiles_and_no_memory_number():
    ms, p20, p80 = common.time_ms(lambda: sum(range(2000)), torch.device("cpu"))
    assert 0 < p20 <= ms <= p80
    assert all(math.isnan(v) for v in common.peak_memory_gib(lambda: None, torch.device("cpu")))


def test_old_csv_gains_new_columns(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("benchmark,provider,ms_median\nb,p,1.5\n")
    common.open_csv(path)
    common.append_row(path, {"benchmark": "b2", "provider": "q", "note": "x"})
    rows = read_csv(path)
    assert [r["benchmark"] for r in rows] == ["b", "b2"] and rows[0]["ms_median"] == "1.5"


def test_model_flops_formula():
    """Tiny Llama: D=64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers, V=259; one query P=5, n=(3, 2)."""
    from rrhf_fast.data.packing import TokenizedExample
    from rrhf_fast.models.tiny import build_tiny_model

    model = build_tiny_model("llama")
    items = [TokenizedExample([1, 2, 3, 4, 5], [[6, 7, 8], [9, 10]], [0.0, 1.0])]
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    pairs = 15 + (3 * 5 + 6) + (2 * 5 + 3)
    want = 6 * (linear * 10 + 259 * 64 * 5) + 12 * 2 * 4 * 16 * pairs
    assert workload.model_flops(model, items) == want
    assert workload.useful_tokens(items) == 10


def test_provider_gate_rejects_a_backward_for_scalar_gradients_only():
    """Old fused cross-entropy kernels computed gradients in forward and scaled them by the upstream
    gradient afterwards: right for a mean, wrong per token. The gate must refuse such a provider."""

    class ScaleAfterSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, rows, targets):
            with torch.enable_grad():
                hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
                logp = bench_kernels.token_logprobs_torch(hh, ww, rows, targets)
                logp.sum().backward()
            ctx.save_for_backward(hh.grad, ww.grad)
            return logp.detach()

        @staticmethod
        def backward(ctx, g):
            dh, dw = ctx.saved_tensors
            return dh * g.mean(), dw * g.mean(), None, None

    cpu = torch.device("cpu")
    bench_kernels.check_provider(bench_kernels.token_logprobs_torch, cpu, torch.float32)  # accepted
    with pytest.raises(bench_kernels.Unavailable, match="dhidden"):
        bench_kernels.check_provider(ScaleAfterSum.apply, cpu, torch.float32)


def gpu_row(benchmark, config, provider, **metrics):
    row = dict.fromkeys(common.COLUMNS, "")
    row.update(
        benchmark=benchmark, config=config, provider=provider, gpu="NVIDIA H100 80GB HBM3", status="ok"
    )
    row.update({k: str(v) for k, v in metrics.items()})
    return row


def test_targets_say_met_or_by_how_much_missed(tmp_path):
    rows = [
        gpu_row(*report.STEP, "reference", tokens_per_s=1000, peak_mem_gib=30),
        gpu_row(*report.STEP, "rrhf-fast", tokens_per_s=2400, peak_mem_gib=9),
        gpu_row(*report.STEP, "rrhf-fast/packed", tokens_per_s=5000, mfu=0.5),
    ]
    lines = "\n".join(report.target_lines("step", rows, tmp_path / "none.txt"))
    assert "2.4 (goal 3, short by 20%) | **missed**" in lines
    assert "0.3 (goal <= 0.333) | met" in lines
    assert "0.5 (goal 0.45) | met" in lines
    assert "rerun the script with `--profile`" in lines


def test_report_shows_the_latest_row_of_each_provider_and_config():
    old = gpu_row("b", "c", "p", ms_median=2.0)
    new = gpu_row("b", "c", "p", ms_median=1.0)
    other = gpu_row("b", "c", "q", ms_median=3.0)
    assert report.latest([old, other, new]) == [new, other]


def test_plan_vs_gpu_smoke(tmp_path):
    """benchmarks/plan_vs_gpu.py (issue #24's GPU check) on the CPU: each mode's plan beside the
    tracked live bytes of two real steps, one row each, the markdown report; a missing optimizer
    package is a skipped row with its reason, not a crash."""
    import plan_vs_gpu

    modes = "fp32,bf16-stochastic-in-backward,bf16-offload"
    assert plan_vs_gpu.main(["--cpu-smoke", "--out-dir", str(tmp_path), "--modes", modes]) == 0
    rows = list(csv.DictReader((tmp_path / "plan_vs_gpu_cpu_smoke.csv").open()))
    assert [r["mode"] for r in rows] == modes.split(",")
    for r in rows:
        assert r["status"] == "ok" and r["gpu"] == "cpu" and r["allocated_gib"] == ""
        assert float(r["planned_gib"]) > 0 and float(r["tracked_gib"]) > 0
    assert float(rows[2]["planned_host_gib"]) > 0 and float(rows[2]["tracked_host_gib"]) > 0
    assert "| bf16-offload |" in (tmp_path / "plan_vs_gpu_cpu_smoke.md").read_text()
    assert plan_vs_gpu.runs("A:*,B:x", ["m", "n"]) == [("A", "m"), ("A", "n"), ("B", "x")]


def test_checkpoint_hash_benchmark_writes_its_table(tmp_path):
    import bench_checkpoint_hash

    out = tmp_path / "checkpoint_hash"
    bench_checkpoint_hash.main(["--gb", "0.004", "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)])
    text = (out.with_suffix(".md")).read_text()
    assert "| sha256, page cache |" in text and "| blake2b, page cache |" in text and "2-core" in text
    rows = (out.with_suffix(".csv")).read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("measure,seconds,s_per_gb")
