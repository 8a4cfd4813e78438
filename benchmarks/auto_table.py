"""Fill `--kernels auto`'s table (rrhf_fast/kernels/auto_table.json) from a GPU run's kernel benchmark.

`python benchmarks/auto_table.py results/kernels.csv [--out PATH] [--check]` keeps, per GPU, shape
and dtype, the newest `token_logprobs_fwd_bwd` rows of the `torch` and `triton` providers that both
measured (status ok, a GPU, not the CPU smoke run), and writes one entry each: torch_ms, triton_ms
and the rows' date and commit. auto.py picks the torch path only where an entry has torch faster
and the logits fit the memory budget; every shape without an entry keeps the fused kernel.
`--check` prints the entries without writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from report import latest, num, read_rows

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "rrhf_fast" / "kernels" / "auto_table.json"


def entries(rows: list[dict[str, str]]) -> list[dict]:
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in latest(rows):
        if r["benchmark"] != "token_logprobs_fwd_bwd" or r["status"] != "ok" or r["gpu"] in ("", "cpu"):
            continue
        if r["provider"] not in ("torch", "triton") or num(r["ms_median"]) is None:
            continue
        pairs.setdefault((r["gpu"], r["config"], r["dtype"]), {})[r["provider"]] = r
    out = []
    for (gpu, config, dtype), both in pairs.items():
        if set(both) != {"torch", "triton"}:
            continue
        shape = dict(item.split("=") for item in config.split())
        triton = both["triton"]
        out.append(dict(gpu=gpu, D=int(shape["D"]), V=int(shape["V"]), M=int(shape["M"]), dtype=dtype,
                        torch_ms=num(both["torch"]["ms_median"]), triton_ms=num(triton["ms_median"]),
                        source=f"kernels.csv {triton['date']} {triton['commit']}"))  # fmt: skip
    return sorted(out, key=lambda e: (e["gpu"], e["D"], e["V"], e["M"], e["dtype"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--out", type=Path, default=TABLE)
    p.add_argument("--check", action="store_true", help="print the entries, write nothing")
    args = p.parse_args(argv)
    found = entries(read_rows(args.csv))
    for e in found:
        faster = "torch" if e["torch_ms"] < e["triton_ms"] else "triton"
        print(f"{e['gpu']} D={e['D']} V={e['V']} M={e['M']} {e['dtype']}: torch {e['torch_ms']:.3f} ms, "
              f"triton {e['triton_ms']:.3f} ms: {faster} faster")  # fmt: skip
    if args.check:
        return 0
    data = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    data["entries"] = found
    args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(found)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
