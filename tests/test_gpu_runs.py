"""The two GPU commands (benchmarks/gpu_run1.sh, gpu_run2.sh) are ready before a GPU is lent.

Default suite (seconds): the scripts parse, their plan names every part they run and fits the
device's 10 minutes a command, every test file with GPU tests is run by one of them, and the warm
compile covers the shapes the tests and benchmarks launch. Slow: both `--dry-run`s, the same
sequence on the CPU (tiny shapes, Triton's interpreter), each in under 3 minutes.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_kernels  # noqa: E402
import gpu_plan  # noqa: E402
import warm_compile  # noqa: E402
from test_token_logprobs_backward import GPU_SHAPE  # noqa: E402

SCRIPTS = {"run1": BENCH / "gpu_run1.sh", "run2": BENCH / "gpu_run2.sh"}
SWEEP_PARTS = {"step-sweep", "kernels-sweep"}  # the plan's "sweeps": what is left of the command


def script_parts(run: str) -> list[str]:
    return re.findall(r"^(?:run_part|pytest_part) ([\w-]+)", SCRIPTS[run].read_text(), re.M)


def env(**extra) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return {**keep, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("path", [*SCRIPTS.values(), BENCH / "gpu_lib.sh"], ids=lambda p: p.name)
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "timeout -s INT" in text or "gpu_lib.sh" in text  # pytest writes its summary when cut


@pytest.mark.parametrize("run", ["run1", "run2"])
def test_plan_names_every_part_and_fits_a_command(run):
    parts = {p.name: p for p in gpu_plan.parts(run)}
    ran = script_parts(run)
    assert {("sweeps" if p in SWEEP_PARTS else p) for p in ran} == set(parts)
    for p in parts.values():
        assert p.limit_s == 0 or p.expected_s <= p.limit_s, p  # a limit below its own estimate
    assert sum(p.limit_s for p in parts.values()) <= gpu_plan.COMMAND_S - gpu_plan.MARGIN_S
    expected = sum(p.expected_s for p in parts.values())
    assert expected <= {"run1": 460, "run2": 420}[run]  # about 7.5 and 7 minutes
    text = SCRIPTS[run].read_text()
    for name in ran:  # each part takes its limit from the plan (or the rest of the budget)
        line = re.search(rf"^(?:run_part|pytest_part) {name} (\S+)", text, re.M).group(1)
        assert line in (f'"$PLAN_LIMIT_{name.replace("-", "_")}"', "half", '"$PLAN_LIMIT_sweeps"')


def test_plan_option_prints_the_estimates():
    done = subprocess.run(
        ["bash", str(SCRIPTS["run1"]), "--plan"], env=env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for part in script_parts("run1"):
        assert re.search(rf"^  {part} +expected +\d+ s  limit +(\d+ s|rest)", done.stdout, re.M), done.stdout
    compiles = warm_compile.compiles(warm_compile.WORKLOADS)
    assert f"{compiles} Triton compiles" in done.stdout
    assert "total: expected" in done.stdout
    bad = subprocess.run(["bash", str(SCRIPTS["run2"]), "--fast"], env=env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


def test_every_gpu_test_file_is_run_by_a_script():
    marked = {
        p.name for p in (ROOT / "tests").glob("test_*.py") if re.search(r"pytest\.mark\.gpu\b", p.read_text())
    }
    named = set(
        re.findall(r"tests/(test_\w+\.py)", SCRIPTS["run1"].read_text() + SCRIPTS["run2"].read_text())
    )
    assert marked and marked <= named, marked - named


def test_warm_compile_covers_the_launched_shapes():
    shapes = {(w.N, w.M, w.D, w.V, w.dtype, w.softcap) for w in warm_compile.WORKLOADS}
    d, v, m = bench_kernels.GPU_HEADLINE
    x = bench_kernels.make_inputs(37, 80, 523, bench_kernels.torch.float32, bench_kernels.torch.device("cpu"))
    assert (m + m // 4 + 1, m, d, v, "bf16", None) in shapes  # make_inputs' N for the headline
    assert (x.hidden.shape[0], 37, 80, 523, "bf16", None) in shapes  # check_provider's gate shape
    n, m, d, v = GPU_SHAPE
    for dtype in ("bf16w32", "fp16", "bf16"):
        assert (n, m, d, v, dtype, None) in shapes
    # A workload's jobs: every forward and dlogits config, and the cuBLAS variant's epilogue.
    head = [w for w in warm_compile.WORKLOADS if w.cublas][0]
    tlp = warm_compile.importlib.import_module("rrhf_fast.kernels.token_logprobs")
    assert len(warm_compile.jobs([head])) == len(tlp.FWD_CONFIGS) + len(tlp.DLOGITS_CONFIGS) + 1


# ---------------------------------------------------------------------------------------------
# The dry runs


@pytest.mark.slow
@pytest.mark.parametrize("run", ["run1", "run2"])
def test_dry_run(tmp_path, run):
    out = tmp_path / "out"
    out.mkdir()
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(SCRIPTS[run]), "--dry-run"],
        env=env(SMOKE_OUT_DIR=str(tmp_path / "r"), OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for part in script_parts(run):
        assert re.search(rf"\] {part}: exit 0 after \d+s", done.stdout), (part, done.stdout[-3000:])
    results = tmp_path / "r"
    assert list(results.glob(f"gpu_{run}_*.log")) and (out / "results.tar.gz").stat().st_size > 0
    junit = list(results.glob(f"gpu_{run}_*.xml"))
    assert junit and all("<testsuite" in p.read_text() for p in junit)
    topics = {"run1": ("probe", "kernels"), "run2": ("step", "attention", "kernels")}[run]
    for topic in topics:
        assert (results / f"{topic}_cpu_smoke.md").exists()
    assert "expected" in done.stdout and "provider" in done.stdout  # the plan, the headline table
    for part, n in gpu_plan.TESTS.items():  # the plan's test counts are the tests each part selects
        if part in script_parts(run):
            section = done.stdout.split(f"] {part}: start")[1].split(f"] {part}: exit")[0]
            assert re.search(rf"\b{n} skipped, \d+ deselected", section), (part, section[-500:])
    assert seconds < 180, f"the dry run took {seconds:.0f} s"


@pytest.mark.slow
def test_gpu_run_needs_none_of_the_packages_the_gpu_machine_lacks(tmp_path):
    """tests/gpu_machine_check.py: with datasets, bitsandbytes, trl, flash-attn, Liger and CCE
    unimportable, every test file of both runs collects, every script they start imports, and the
    trainer of the GPU trainer test trains (on the CPU)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gpu_machine_check.py"), str(tmp_path)],
        cwd=ROOT, env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"losses \[[0-9.]+, [0-9.]+\]", done.stdout), done.stdout[-1000:]
