"""Shared benchmark harness: timing, peak memory, FLOP accounting, the CSV schema and the runner.

Every script builds a `Recorder` and measures providers side by side with `Recorder.measure`, which
appends a row to `<out_dir>/<topic>[_cpu_smoke].csv` at once; `Recorder.finish` regenerates the
markdown report and figures from the whole CSV (`report.py`).

CUDA timing is `triton.testing.do_bench` with quantiles (0.5, 0.2, 0.8); CPU timing (smoke runs
only, tiny shapes) is a plain timer loop reporting the same quantiles. Peak memory is
`torch.cuda.max_memory_allocated` after a reset; on CPU it is NaN, never a made-up number.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from report import slug, write_report

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUANTILES = (0.5, 0.2, 0.8)
GIB = 2**30

COLUMNS = [
    "benchmark",
    "provider",
    "config",
    "dtype",
    "gpu",
    "torch",
    "triton",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "peak_mem_gib",
    "tflops",
    "tokens_per_s",
    "mfu",
    "date",
    "commit",
    # Beyond the minimum: the sweep a row belongs to and its x value (tables and figures are
    # drawn per sweep), the memory a call adds on top of its inputs, and why a provider has no
    # number (status skipped / oom / error, with the reason in note).
    "sweep",
    "x",
    "extra_mem_gib",
    "status",
    "note",
]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s. A GPU that
# matches none of these gets no MFU: an empty cell, never a guessed peak. `RRHF_BENCH_PEAK_TFLOPS`
# overrides it for a GPU not listed here.
PEAK_BF16_TFLOPS = (
    (re.compile(r"H100.*(SXM|HBM3)", re.I), 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (re.compile(r"H200", re.I), 989.0),
    (re.compile(r"A100", re.I), 312.0),
)


# ---------------------------------------------------------------------------------------------
# Environment: device, versions, date, commit


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bf16_tflops(name: str) -> float | None:
    override = os.environ.get("RRHF_BENCH_PEAK_TFLOPS")
    if override:
        return float(override)
    for pattern, peak in PEAK_BF16_TFLOPS:
        if pattern.search(name):
            return peak
    return None


def git_commit() -> str:
    """Short HEAD, plus "-dirty" when tracked files differ from it; "unknown" outside a checkout.

    `RRHF_BENCH_COMMIT` overrides it: a copy of the tree without its .git (the device tool's) is
    told the commit by the session that sends it.
    """
    if os.environ.get("RRHF_BENCH_COMMIT"):
        return os.environ["RRHF_BENCH_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def environment(device: torch.device) -> dict[str, str]:
    return {
        "gpu": gpu_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


# ---------------------------------------------------------------------------------------------
# Command line shared by the scripts


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes, results in <topic>_cpu_smoke.csv (automatic when no CUDA device is present)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the CSV and reports go")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument(
        "--headline-only",
        action="store_true",
        help="the headline config only, no sweep (the GPU visit: benchmarks/README.md)",
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="the sweeps without the headline config (measured before, e.g. by --headline-only)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run torch.profiler on the headline config; top-20 kernels to <topic>_profile_<gpu>.txt",
    )
    return p


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """(device, smoke): smoke mode on request or whenever CUDA is absent."""
    if args.cpu_smoke or not torch.cuda.is_available():
        # One thread: tiny shapes gain nothing from more, and on a shared 2-core machine the thread
        # pool's spinning made a smoke step ~30x slower (measured: 400 ms vs 12 ms a tiny step).
        torch.set_num_threads(1)
        return torch.device("cpu"), True
    return torch.device("cuda"), False


def selected(providers: Iterable[str], wanted: str | None) -> list[str]:
    providers = list(providers)
    if not wanted:
        return providers
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in providers]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {providers}")
    return names


# ---------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: list[torch.Tensor] | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of `fn`."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up: first-call allocations and lazy initialisation
    times: list[float] = []
    deadline = time.perf_counter() + min(rep_ms, 50.0) / 1e3  # CPU runs are smoke tests only
    while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = np.quantile(np.array(times), QUANTILES)
    return float(q[0]), float(q[1]), float(q[2])


def peak_memory_gib(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak allocated during one call, peak minus what was allocated before it), in GiB."""
    if device.type != "cuda":
        return math.nan, math.nan
    sync(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / GIB, (peak - before) / GIB


def free_memory(device: torch.device) -> None:
    """Return what the last measurement left (reference cycles, cached blocks) before the next one."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def profile_table(fn: Callable[[], object], device: torch.device, rows: int = 20) -> str:
    """torch.profiler over one warm call of `fn`: the top kernels (CUDA) or ops (CPU) by total time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    # Self time: the kernels themselves rank first, not the ops that launch them.
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


# ---------------------------------------------------------------------------------------------
# Recording


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}"


class Recorder:
    """One script run: each measurement is appended to the CSV as it is made (a run stopped by a time
    limit keeps what it measured); `finish` regenerates the report from the whole CSV."""

    def __init__(self, topic: str, out_dir: Path, device: torch.device, smoke: bool):
        self.topic = topic
        self.out_dir = Path(out_dir)
        self.device = device
        self.smoke = smoke
        self.env = environment(device)
        self.peak_tflops = peak_bf16_tflops(self.env["gpu"]) if device.type == "cuda" else None
        self.profiles: dict[str, str] = {}
        open_csv(self.csv_path)

    @property
    def csv_path(self) -> Path:
        return self.out_dir / f"{self.topic}{'_cpu_smoke' if self.smoke else ''}.csv"

    @property
    def profile_path(self) -> Path:
        if self.smoke:
            return self.out_dir / f"{self.topic}_cpu_smoke_profile.txt"
        return self.out_dir / f"{self.topic}_profile_{slug(self.env['gpu'])}.txt"

    def _row(self, benchmark: str, sweep: str, provider: str, config: str, x: float, dtype) -> dict:
        row = dict.fromkeys(COLUMNS, "")
        row.update(self.env)
        row.update(
            benchmark=benchmark,
            sweep=sweep,
            provider=provider,
            config=config,
            x=fmt(float(x)),
            dtype=str(dtype).removeprefix("torch."),
        )
        return row

    def measure(
        self,
        benchmark: str,
        sweep: str,
        provider: str,
        config: str,
        x: float,
        dtype,
        fn: Callable[[], object],
        *,
        flops: float | None = None,
        tokens: float | None = None,
        grad_to_none: list[torch.Tensor] | None = None,
        rep_ms: float = 100.0,
        warmup_ms: float = 25.0,
        peak_fn: Callable[[Callable[[], object]], tuple[float, float]] | None = None,
        note: str = "",
    ) -> dict | None:
        """Time `fn` and take its peak memory (`peak_fn(fn)` -> (peak, extra) GiB where the device's
        allocator cannot tell, e.g. a tensor count on the CPU); a failure becomes a row with status
        and reason."""
        row = self._row(benchmark, sweep, provider, config, x, dtype)
        row["note"] = note
        try:
            ms, p20, p80 = time_ms(fn, self.device, grad_to_none, warmup_ms=warmup_ms, rep_ms=rep_ms)
            peak, extra = (peak_fn or (lambda f: peak_memory_gib(f, self.device)))(fn)
        except torch.cuda.OutOfMemoryError as exc:
            return self._failed(row, "oom", describe(exc))
        except Exception as exc:  # one provider failing must not end the run: its row says why
            return self._failed(row, "error", describe(exc))
        finally:
            free_memory(self.device)
        seconds = ms / 1e3
        tflops = flops / seconds / 1e12 if flops else None
        mfu = tflops / self.peak_tflops if tflops and self.peak_tflops else None
        row.update(
            ms_median=fmt(ms),
            ms_p20=fmt(p20),
            ms_p80=fmt(p80),
            peak_mem_gib=fmt(peak),
            extra_mem_gib=fmt(extra),
            tflops=fmt(tflops),
            tokens_per_s=fmt(tokens / seconds if tokens else None),
            mfu=fmt(mfu),
            status="ok",
        )
        self._add(row)
        print(f"  {benchmark:<22} {provider:>24} {config:<24} {ms:10.3f} ms  peak {fmt(peak) or '-'} GiB")
        return row

    def skip(self, benchmark: str, sweep: str, provider: str, config: str, x: float, dtype, reason: str):
        return self._failed(self._row(benchmark, sweep, provider, config, x, dtype), "skipped", reason)

    def _failed(self, row: dict, status: str, note: str) -> dict:
        row.update(status=status, note=note)
        self._add(row)
        print(f"  {row['benchmark']:<22} {row['provider']:>24} {row['config']:<24} {status}: {note}")
        return row

    def _add(self, row: dict[str, str]) -> None:
        append_row(self.csv_path, row)

    def profile(self, label: str, fn: Callable[[], object]) -> None:
        """Profile one call of `fn` and write its table at once (this run's first one starts the file)."""
        try:
            table = profile_table(fn, self.device)
        except Exception as exc:
            table = f"profiling failed: {describe(exc)}"
        finally:
            free_memory(self.device)
        if not self.profiles:
            env = self.env
            self.profile_path.write_text(f"# {self.topic} on {env['gpu']}, {env['date']}, {env['commit']}\n")
        self.profiles[label] = table
        with self.profile_path.open("a") as f:
            f.write(f"\n## {label}\n{table}\n")

    def finish(self) -> Path:
        """Regenerate the report from the whole CSV (every run so far, this one included)."""
        return write_report(self.csv_path)


def open_csv(path: Path) -> None:
    """Create the CSV with its header, or rewrite an older one whose header lacks some columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, str]] = []
    header: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            header = list(reader.fieldnames or [])
    if header[: len(COLUMNS)] == COLUMNS:
        return
    header = COLUMNS + [c for c in header if c not in COLUMNS]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(old)


def append_row(path: Path, row: dict[str, str]) -> None:
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore").writerow(row)
