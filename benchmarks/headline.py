"""The headline rows of benchmark CSVs, side by side in plain text: what a GPU run prints last.

`python benchmarks/headline.py results/kernels.csv [results/step.csv ...]` prints, per GPU and
benchmark, the latest row of each provider at the headline config: time, peak and extra memory,
TFLOP/s, tokens/s, MFU, or why a provider has no number. The time / memory trade of the kernels
(the torch reference keeps the logits, the fused kernels recompute them) reads off one table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from report import latest, num, read_rows

# topic -> (GPU headline config, CPU smoke headline config)
HEADLINES = {
    "kernels": ("D=4096 V=128256 M=8192", "D=32 V=259 M=16"),
    "step": ("k=6 P=512 R=128", "k=2 P=8 R=4"),
    "attention": ("k=6 P=512 R=128", "k=2 P=8 R=4"),
    "probe": ("M=N=K=8192", "M=N=K=256"),
}
COLUMNS = (("ms_median", "ms", "{:.3f}"), ("peak_mem_gib", "peak GiB", "{:.2f}"),
           ("extra_mem_gib", "extra GiB", "{:.2f}"), ("tflops", "TFLOP/s", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:.4g}"), ("mfu", "MFU", "{:.1%}"))  # fmt: skip


def headline_lines(csv_path: Path) -> list[str]:
    topic = csv_path.stem.removesuffix("_cpu_smoke")
    if topic not in HEADLINES or not csv_path.exists():
        return []
    rows = latest(read_rows(csv_path))
    out = []
    for gpu in dict.fromkeys(r["gpu"] for r in rows):
        config = HEADLINES[topic][gpu == "cpu"]
        picked = [r for r in rows if r["gpu"] == gpu and r["config"] == config]
        for bench in dict.fromkeys(r["benchmark"] for r in picked):
            out.append(f"{topic} on {gpu}: {bench} at {config}")
            head = f"  {'provider':<26}" + "".join(f"{label:>11}" for _, label, _ in COLUMNS)
            out.append(head)
            for r in (r for r in picked if r["benchmark"] == bench):
                if r["status"] != "ok":
                    out.append(f"  {r['provider']:<26} {r['status']}: {r['note'][:90]}")
                    continue
                cells = [
                    (fmt.format(v) if (v := num(r.get(col))) is not None else "-") for col, _, fmt in COLUMNS
                ]
                out.append(f"  {r['provider']:<26}" + "".join(f"{c:>11}" for c in cells))
    return out


def main(argv: list[str]) -> int:
    for path in argv:
        lines = headline_lines(Path(path))
        if lines:
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
