"""The demo's CPU numerics are pinned (rrhf_fast/cpu_pins.py): ATen's AVX2 kernels, MKL's
COMPATIBLE reproducibility branch, oneDNN capped at AVX2, 2 torch threads; checked in a fresh
process, the only place the pins can take effect (they must be set before torch is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrhf_fast import cpu_pins

ROOT = Path(__file__).resolve().parents[1]


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _demo_first_line(tmp_path: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in cpu_pins.PINS and k != cpu_pins.SWITCH}
    argv = [sys.executable, "-m", "rrhf_fast.cli", "demo", "--steps", "1", "--train-queries", "8",
            "--eval-queries", "4", "--no-sft-baseline", "--output-dir", str(tmp_path / "demo")]  # fmt: skip
    done = subprocess.run(
        argv, cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[0]


@pytest.mark.skipif(not _has_avx2(), reason="the pins name AVX2 kernels: this CPU has no AVX2")
def test_a_fresh_demo_runs_with_the_pins_in_effect(tmp_path):
    line = _demo_first_line(tmp_path)
    expected = ("CPU numerics pinned: ATen AVX2 kernels, MKL CNR branch COMPATIBLE, oneDNN up to AVX2, "
                "2 torch threads")  # fmt: skip
    mkl_less = expected.replace("MKL CNR branch COMPATIBLE", "no MKL")  # a torch built without MKL
    assert line in (expected, mkl_less), line


def test_which_commands_are_pinned():
    assert cpu_pins.wanted("demo", {}) and not cpu_pins.wanted("train", {})
    assert cpu_pins.wanted("train", {cpu_pins.SWITCH: "1"})
    assert not cpu_pins.wanted("demo", {cpu_pins.SWITCH: "0"})


def test_pinning_after_torch_is_imported_changes_nothing():
    import torch  # noqa: F401 (imported already: the pins could no longer take effect)

    environ: dict[str, str] = {}
    assert cpu_pins.pin(environ) is False and environ == {}
    state = cpu_pins.report()
    assert state["threads"] >= 1 and state["aten_capability"]
    if not cpu_pins.pinned(state):
        assert cpu_pins.describe(state).startswith("CPU numerics NOT pinned")
