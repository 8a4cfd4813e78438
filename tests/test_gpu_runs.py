"""The GPU visit (benchmarks/gpu_visit.sh, and the optional gpu_more.sh) is ready before a GPU is lent.

Default suite (seconds): the scripts parse and the old names are aliases, the visit's plan is in
priority order and fits its 480 s budget, `--plan` prints it, every test file with GPU tests is run
by a script, the warm compile covers the launched shapes, the runner marks what it skips, cuts and
fails (fake parts), and a budget too small for any part marks every part skipped. Slow: both
`--dry-run`s (the same sequence on the CPU: tiny shapes, Triton's interpreter), and a dry run
stopped midway (SIGTERM, and SIGKILL as a device limit does) that still leaves the finished parts'
files and a summary marking the rest.
"""

import json
import os
import re
import signal
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
import gpu_runner  # noqa: E402
import warm_compile  # noqa: E402
from test_token_logprobs_backward import GPU_SHAPE  # noqa: E402

SCRIPTS = {"visit": BENCH / "gpu_visit.sh", "more": BENCH / "gpu_more.sh"}
ALIASES = {"visit": BENCH / "gpu_run1.sh", "more": BENCH / "gpu_run2.sh"}
PRIORITY = ["probe", "warm-compile", "kernel-tests", "kernels-headline", "step-headline",
            "attention-headline", "plan-vs-gpu"]  # fmt: skip


def env(**extra) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return {**keep, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def states(out: Path) -> dict[str, str]:
    return {r["part"]: r["state"] for r in summary(out)["parts"]}


@pytest.mark.parametrize("path", [*SCRIPTS.values(), *ALIASES.values(), BENCH / "gpu_lib.sh"], ids=str)
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_visit_is_in_priority_order_and_fits_its_budget():
    parts = gpu_plan.parts("visit")
    assert [p.name for p in parts] == PRIORITY
    for p in parts:
        assert p.cap_s <= 0 or p.expected_s <= p.cap_s, p  # a cap below its own estimate
    assert sum(p.expected_s for p in parts) <= gpu_plan.BUDGET_S == 480
    assert gpu_plan.BUDGET_S + 60 <= gpu_plan.COMMAND_S  # room for the set-up inside a 600 s command
    # The second script's parts are not the visit's (its warm compile excepted: a fresh machine).
    more = {p.name for p in gpu_plan.parts("more")}
    assert more & set(PRIORITY) == {"warm-compile"}


def test_plan_option_prints_the_estimates_and_the_aliases_run_the_new_scripts():
    run = lambda script, *a: subprocess.run(  # noqa: E731
        ["bash", str(script), *a], env=env(), capture_output=True, text=True, timeout=120
    )
    done = run(SCRIPTS["visit"], "--plan")
    assert done.returncode == 0, done.stderr
    for part in PRIORITY:
        assert re.search(rf"^  {part} +expected +\d+ s  cap +(\d+ s|rest)", done.stdout, re.M), done.stdout
    assert re.search(r"total: expected \d+ s \(\d\.\d min\) of a 480 s budget", done.stdout), done.stdout
    visit = [w for w in warm_compile.WORKLOADS if w.name in gpu_plan.VISIT_WORKLOADS]
    assert f"{warm_compile.compiles(visit)} Triton compiles" in done.stdout
    assert run(ALIASES["visit"], "--plan").stdout == done.stdout
    more = run(ALIASES["more"], "--plan")
    assert more.returncode == 0 and "plan of gpu_more.sh" in more.stdout
    budget = subprocess.run(["bash", str(SCRIPTS["visit"]), "--plan"], env=env(RRHF_GPU_SECONDS="300"),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "of a 300 s budget" in budget.stdout
    bad = run(SCRIPTS["more"], "--fast")
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


def test_budget_must_be_seconds_within_a_command(monkeypatch):
    monkeypatch.setenv("RRHF_GPU_SECONDS", "soon")
    with pytest.raises(SystemExit, match="RRHF_GPU_SECONDS must be a number of seconds, got 'soon'"):
        gpu_plan.budget()
    monkeypatch.setenv("RRHF_GPU_SECONDS", "900")
    with pytest.raises(SystemExit, match="must lie in 1..600"):
        gpu_plan.budget()
    monkeypatch.setenv("RRHF_GPU_SECONDS", "300")
    assert gpu_plan.budget() == 300


def test_every_gpu_test_file_is_run_by_a_script():
    marked = {
        p.name for p in (ROOT / "tests").glob("test_*.py") if re.search(r"pytest\.mark\.gpu\b", p.read_text())
    }
    files = gpu_plan.KERNEL_TEST_FILES + gpu_plan.GPU_TEST_FILES + gpu_plan.FLEX_TEST_FILES
    named = {Path(f).name for f in files}
    assert marked and marked <= named, marked - named
    ctx = gpu_plan.Context(out_dir="/x")
    commands = [" ".join(p.command(ctx)) for s in gpu_plan.SCRIPTS for p in gpu_plan.parts(s)]
    for f in files:
        assert any(f in c for c in commands), f


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
    # Every workload is warmed by the script that launches it; the visit's include the headline.
    names = {w.name for w in warm_compile.WORKLOADS}
    assert set(gpu_plan.VISIT_WORKLOADS) | set(gpu_plan.MORE_WORKLOADS) == names
    assert {"kernels-headline", "kernels-gate", "step-1b", "test-bf16"} <= set(gpu_plan.VISIT_WORKLOADS)


# ---------------------------------------------------------------------------------------------
# The runner, with parts that are short Python commands


def fake_parts(_liger_cce: bool) -> list:
    py = lambda code: lambda c: [c.python, "-c", code]  # noqa: E731
    write = "import os, pathlib; pathlib.Path(os.environ['OUT'], 'a.csv').write_text('x'); print('wrote a')"
    sleep = "import time; print('sleeping', flush=True); time.sleep(60)"
    return [
        gpu_plan.Part("writes", 30, 1, "writes a file", py(write)),
        gpu_plan.Part("hangs", 2, 1, "sleeps past its cap", py(sleep)),
        gpu_plan.Part("fails", 30, 1, "exits 3", py("import sys; print('no GPU here'); sys.exit(3)")),
        gpu_plan.Part("too-long", 0, 10_000, "needs more than the budget", py("print('never')")),
        gpu_plan.Part("last", 0, 1, "the rest", py("print('last')")),
    ]


def test_runner_saves_each_part_and_marks_what_it_cut_failed_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_plan.SCRIPTS, "fake", fake_parts)
    monkeypatch.setattr(gpu_runner, "MIN_PART_S", 1)
    monkeypatch.setattr(gpu_runner, "GRACE_S", 2)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_runner, "_commit", lambda: "abc1234")
    ctx = gpu_plan.Context(python=sys.executable, out_dir=str(tmp_path))
    runner = gpu_runner.Runner("fake", ctx, budget_s=60, t0=time.time(), liger_cce=False)
    start = time.time()
    assert runner.run() == 1  # a part failed
    assert time.time() - start < 30  # the hanging part was stopped at its 2 s cap
    got = states(tmp_path)
    assert got["writes"] == "ok" and got["hangs"] == "cut at its 2 s cap"
    assert got["fails"] == "failed (exit 3)"
    assert got["too-long"].startswith("skipped: needs ~10000 s, ") and got["last"] == "ok"
    rows = {r["part"]: r for r in summary(tmp_path)["parts"]}
    assert rows["writes"]["files"] == ["a.csv", "writes.log"]
    assert "wrote a" in (tmp_path / "writes.log").read_text()
    assert "sleeping" in (tmp_path / "hangs.log").read_text()
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# gpu_fake.sh: finished") and "commit abc1234" in md
    assert "| too-long | skipped: needs ~10000 s" in md and "in progress" not in md
    assert rows["fails"]["note"] == "no GPU here" and rows["hangs"]["note"] == "KeyboardInterrupt"


def test_a_budget_too_small_for_any_part_marks_every_part_skipped(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPTS["visit"]), "--dry-run"], env=env(OUT=str(tmp_path), RRHF_GPU_SECONDS="5"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got = states(tmp_path)
    assert list(got) == PRIORITY
    assert all(re.fullmatch(r"skipped: needs ~\d+ s, \d+ s left", s) for s in got.values()), got
    assert summary(tmp_path)["state"] == "finished" and summary(tmp_path)["budget_s"] == 5


# ---------------------------------------------------------------------------------------------
# The dry runs


@pytest.mark.slow
@pytest.mark.parametrize("script", ["visit", "more"])
def test_dry_run(tmp_path, script):
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(SCRIPTS[script]), "--dry-run"], env=env(OUT=str(tmp_path)),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = summary(tmp_path)
    assert data["state"] == "finished" and data["dry_run"]
    parts = gpu_plan.parts(script)
    assert states(tmp_path) == {p.name: "ok" for p in parts}
    for p in parts:
        assert (tmp_path / f"{p.name}.log").stat().st_size > 0
        for topic in p.topics:
            for suffix in (".csv", ".md"):
                assert (tmp_path / f"{topic}_cpu_smoke{suffix}").exists(), (topic, suffix)
    for name, n in gpu_plan.TESTS.items():  # the plan's test counts are the tests each part selects
        if name in {p.name for p in parts}:
            assert "<testsuite" in (tmp_path / f"{name}.xml").read_text()
            assert re.search(rf"\b{n} skipped, \d+ deselected", (tmp_path / f"{name}.log").read_text()), name
    if script == "visit":
        assert "provider" in (tmp_path / "summary.md").read_text()  # the headline tables
        assert set(data["headlines"]) >= {"kernels", "step", "attention"}
    assert seconds < 300, f"the dry run took {seconds:.0f} s"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_dry_run_stopped_midway_keeps_the_finished_parts(tmp_path, sig):
    """Stopped after its first two parts (SIGTERM: the runner's handler; SIGKILL to the whole
    process group, as a device limit does): the finished parts' files are there, and the summary
    marks the part that was running and the rest as not run."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPTS["visit"]), "--dry-run"], env=env(OUT=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(1)
            if (tmp_path / "summary.json").exists():
                got = states(tmp_path)
                if got["probe"] == "ok" and got["warm-compile"] == "ok":
                    break
        else:
            pytest.fail("the first two parts did not finish in 300 s")
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    got = states(tmp_path)
    assert got["probe"] == "ok" and got["warm-compile"] == "ok"
    finished = [f"probe_cpu_smoke.{x}" for x in ("csv", "md", "txt")] + ["probe.log", "warm-compile.log"]
    for name in finished:
        assert (tmp_path / name).stat().st_size > 0, name
    rest = PRIORITY[2:]
    data, md = summary(tmp_path), (tmp_path / "summary.md").read_text()
    if sig == signal.SIGTERM:
        assert data["state"] == "stopped by SIGTERM"
        current = [p for p in rest if got[p] == "interrupted (the command was stopped)"]
        assert len(current) == 1, got
        later = rest[rest.index(current[0]) + 1 :]
        assert all(got[p] == "not run: the command was stopped (SIGTERM)" for p in later), got
    else:  # nothing ran after the kill: the summary written before the part started is the last
        assert data["state"] == "in progress" and "the command was killed" in md
        current = [p for p in rest if got[p].startswith("running (since +")]
        assert len(current) == 1, got
        later = rest[rest.index(current[0]) + 1 :]
        assert all(got[p] == "not run yet" for p in later), got


@pytest.mark.slow
def test_gpu_run_needs_none_of_the_packages_the_gpu_machine_lacks(tmp_path):
    """tests/gpu_machine_check.py: with datasets, bitsandbytes, trl, flash-attn, Liger and CCE
    unimportable, every test file of both scripts collects, every benchmark they start imports, and
    the trainer of the GPU trainer test trains (on the CPU)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gpu_machine_check.py"), str(tmp_path)],
        cwd=ROOT, env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"losses \[[0-9.]+, [0-9.]+\]", done.stdout), done.stdout[-1000:]
