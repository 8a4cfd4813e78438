"""Run a GPU visit's parts (benchmarks/gpu_plan.py) one by one, saving each part's results as it ends.

`python benchmarks/gpu_runner.py visit|more [--plan] [--dry-run]` (benchmarks/gpu_visit.sh and
gpu_more.sh call it after their set-up). Everything goes straight into one folder: `$OUT` where the
device tool sets it (else benchmarks/results/, or a temporary folder for --dry-run), so a command
cut off at its limit still brings back every part it finished:

- each part's own log `<part>.log`, its CSV / markdown / profile / probe files as the part writes
  them, the pytest parts' junit XML `<part>.xml`;
- `summary.md` and `summary.json`, rewritten before and after every part: each part's state (not
  run yet, running, ok, failed, cut at its limit, skipped for lack of time, interrupted, not run
  because the command was stopped), its seconds, its cap, the files it wrote, and the headline
  tables of the benchmarks that ran. A summary whose state is still "in progress" is that of a
  command killed outright (the part marked "running" is the one it was in).

The budget is RRHF_GPU_SECONDS (default 480 s), counted from RRHF_GPU_T0 (the shell script's start,
epoch seconds) or from this process's start. A part whose estimate does not fit what is left is
skipped; one that runs gets the smaller of its cap and what is left, then SIGINT (pytest writes its
summary and XML, a benchmark keeps its rows), SIGKILL 20 s later. SIGINT or SIGTERM to this
process stops the running part the same way and marks the rest as not run.

`--dry-run`: the same sequence on the CPU (tiny shapes, TRITON_INTERPRET=1, the GPU tests
collected and skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gpu_plan

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 20  # SIGINT, then SIGKILL this much later
MIN_PART_S = 10  # no part starts with less than this left


class Stopped(Exception):
    """SIGINT or SIGTERM reached the runner."""


def _die_with_parent() -> None:
    """In the child, before exec: its own process group (the runner signals the group: workers
    included), and SIGKILL when the runner dies (Linux), so nothing outlives a killed command."""
    os.setpgrp()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Runner:
    def __init__(self, script: str, ctx: gpu_plan.Context, budget_s: int, t0: float, liger_cce: bool):
        self.script, self.ctx, self.budget_s, self.t0 = script, ctx, budget_s, t0
        self.liger_cce = liger_cce
        self.out = Path(ctx.out_dir)
        self.parts = gpu_plan.parts(script, liger_cce)
        self.rows = {
            p.name: dict(part=p.name, state="not run yet", seconds=None, cap_s=None,
                         expected_s=round(p.expected_s), files=[], note="")
            for p in self.parts
        }  # fmt: skip
        self.state = "in progress"
        self.child: subprocess.Popen | None = None
        self.log = open(self.out / f"gpu_{script}.log", "a", encoding="utf-8")  # noqa: SIM115
        self.headlines: dict[str, list[str]] = {}

    # ---- time and output
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        line = f"[gpu_{self.script} {now:%H:%M:%S} +{self.elapsed():.0f}s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    # ---- the summary, rewritten after every change
    def write_summary(self) -> None:
        env = dict(script=f"gpu_{self.script}.sh", dry_run=self.ctx.dry, state=self.state,
                   budget_s=self.budget_s, elapsed_s=round(self.elapsed()), commit=_commit(),
                   written=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))  # fmt: skip
        data = {**env, "parts": list(self.rows.values()), "headlines": self.headlines}
        _write_atomic(self.out / "summary.json", json.dumps(data, indent=1) + "\n")
        dry = " (--dry-run: CPU, tiny shapes, interpreter)" if self.ctx.dry else ""
        lines = [
            f"# gpu_{self.script}.sh: {self.state}{dry}",
            "",
            f"Written {env['written']}, {env['elapsed_s']} s into a {self.budget_s} s budget "
            f"(RRHF_GPU_SECONDS); commit {env['commit']}.",
        ]
        if self.state == "in progress":
            lines += [
                "",
                "If this is the summary that came back, the command was killed while the part marked "
                "*running* ran: every part above it is complete, the rest did not run.",
            ]
        lines += [
            "",
            "| part | state | seconds | cap s | expected s | files | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows.values():
            files = ", ".join(r["files"][:8]) + (f" (+{len(r['files']) - 8})" if len(r["files"]) > 8 else "")
            lines.append(f"| {r['part']} | {r['state']} | {_cell(r['seconds'])} | {_cell(r['cap_s'])} | "
                         f"{r['expected_s']} | {files} | {r['note']} |")  # fmt: skip
        for topic, table in self.headlines.items():
            lines += ["", f"## {topic}", "", "```", *table, "```"]
        _write_atomic(self.out / "summary.md", "\n".join(lines) + "\n")

    # ---- the parts
    def run(self) -> int:
        self.say(f"results in {self.out}; budget {self.budget_s} s; commit {_commit()}")
        self.say(gpu_plan.table(self.script, self.liger_cce, self.budget_s))
        self.write_summary()
        failed = 0
        try:
            for part in self.parts:
                failed += self.run_part(part)
            self.state = "finished"
        except Stopped as stop:
            self.state = f"stopped by {stop}"
            for r in self.rows.values():
                if r["state"] == "not run yet":
                    r["state"] = f"not run: the command was stopped ({stop})"
            failed += 1
        finally:
            self.write_summary()
            self.say(f"{self.state} after {self.elapsed():.0f} s: summary in {self.out / 'summary.md'}")
            for r in self.rows.values():
                self.say(f"  {r['part']:<20} {r['state']}")
        return 1 if failed else 0

    def run_part(self, part: gpu_plan.Part) -> int:
        row, left = self.rows[part.name], self.left()
        if left < max(part.expected_s, MIN_PART_S):
            row["state"] = f"skipped: needs ~{part.expected_s:.0f} s, {max(left, 0):.0f} s left"
            self.say(f"{part.name}: {row['state']}")
            self.write_summary()
            return 0
        cap = {0: left, -1: left / 2}.get(part.cap_s, min(part.cap_s, left))
        cap = int(max(cap, MIN_PART_S))
        start = time.time()
        row.update(state=f"running (since +{self.elapsed():.0f} s, cap {cap} s)", cap_s=cap)
        self.write_summary()
        self.say(f"{part.name}: start (cap {cap} s)")
        try:
            rc, cut = self.execute(part, cap)
        finally:  # also when the runner is stopped: what the part wrote so far
            row["seconds"] = round(time.time() - start, 1)
            row["files"] = self.files_since(start)
        if cut:
            row["state"] = f"cut at its {cap} s cap"
        elif rc == 0:
            row["state"] = "ok"
        else:
            row["state"] = f"failed (exit {rc})"
        if row["state"] != "ok":  # why, as far as its log says: its last line
            row["note"] = _last_line(self.out / f"{part.name}.log")
        if part.topics:
            self.add_headlines(part)
        self.say(f"{part.name}: {row['state']} after {row['seconds']:.0f} s")
        self.write_summary()
        return 0 if row["state"] == "ok" else 1

    def files_since(self, start: float) -> list[str]:
        own = ("summary.md", "summary.json", f"gpu_{self.script}.log")
        found = [p for p in self.out.rglob("*") if p.is_file() and p.name not in own]
        return sorted(str(p.relative_to(self.out)) for p in found if p.stat().st_mtime >= start - 1)

    def execute(self, part: gpu_plan.Part, cap: int) -> tuple[int, bool]:
        """Run the part's command with its output into <part>.log (and this process's stdout)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.ctx.dry:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        log = open(self.out / f"{part.name}.log", "w", encoding="utf-8")  # noqa: SIM115
        self.child = child = subprocess.Popen(
            part.command(self.ctx), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", preexec_fn=_die_with_parent,
        )  # fmt: skip
        pump = threading.Thread(target=_pump, args=(child.stdout, log, self.log), daemon=True)
        pump.start()
        cut = False
        try:
            try:
                child.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                cut = True
                self.say(f"{part.name}: {cap} s cap reached: SIGINT")
                _stop(child)
        except Stopped:
            self.say(f"{part.name}: the runner was stopped: SIGINT to the part")
            _stop(child)
            pump.join(5)
            log.close()
            self.rows[part.name]["state"] = "interrupted (the command was stopped)"
            raise
        finally:
            self.child = None
        pump.join(5)
        log.close()
        return child.returncode, cut

    def add_headlines(self, part: gpu_plan.Part) -> None:
        try:
            import headline

            for topic in part.topics:
                for name in (f"{topic}.csv", f"{topic}_cpu_smoke.csv"):
                    lines = headline.headline_lines(self.out / name)
                    if lines:
                        self.headlines[topic] = lines
        except Exception as exc:  # the tables are a convenience: never lose the summary to them
            self.headlines[part.name] = [f"no headline table: {type(exc).__name__}: {exc}"]


def _pump(stream, *sinks) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        for sink in sinks:
            with contextlib.suppress(ValueError):  # closed by a stopped runner
                sink.write(line)
                sink.flush()


def _stop(child: subprocess.Popen) -> None:
    """SIGINT to the part's process group, SIGKILL after GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:160].replace("|", "/")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def _commit() -> str:
    import common

    return common.git_commit()


def liger_cce_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("liger_kernel", "cut_cross_entropy"))


def out_dir(dry: bool) -> Path:
    """$OUT (the device tool's), else benchmarks/results/ on a GPU, a temporary folder for --dry-run."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry:
        return Path(os.environ.get("SMOKE_OUT_DIR") or tempfile.mkdtemp(prefix="gpu_dry_run_"))
    return ROOT / "benchmarks" / "results"


def _on_signal(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", choices=sorted(gpu_plan.SCRIPTS))
    p.add_argument("--plan", action="store_true", help="print each part's expected time and cap, and exit")
    p.add_argument(
        "--dry-run", action="store_true", help="the same sequence on the CPU: tiny shapes, interpreter"
    )
    args = p.parse_args(argv)
    budget_s, liger_cce = gpu_plan.budget(), liger_cce_importable()
    if args.plan:
        print(gpu_plan.table(args.script, liger_cce, budget_s))
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = out_dir(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    t0 = float(os.environ.get("RRHF_GPU_T0") or time.time())
    ctx = gpu_plan.Context(python=sys.executable, out_dir=str(out), dry=args.dry_run)
    runner = Runner(args.script, ctx, budget_s, t0, liger_cce)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
