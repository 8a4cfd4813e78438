"""What the checkpoint content hashes cost (rrhf_fast/integrity.py), on a 1 GB checkpoint on this machine.

A checkpoint of `--gb` GB of fp32 weights (a safetensors file, as save_pretrained writes it) is saved
the way checkpoint.save_checkpoint saves: written, then each file hashed and fsynced in the same
open (integrity.seal_files, the bytes from the page cache), and verified the way every reader
verifies (integrity.file_digest: a second read, from the page cache when the checkpoint was just
written or read; from disk after a reboot, which this script does not force). Measured, back to
back in one process:

- hash alone, page cache: seconds per GB for SHA-256 (the hash rrhf-fast uses) and BLAKE2b (hashlib's
  other strong hash; blake3 is not installed here), on the just-written file;
- the save: write + fsync without hashing vs write + seal_files (hash + fsync), so the extra time
  a save spends on its hashes, as a fraction of the save;
- the verify a resume runs before loading.

Writes benchmarks/results/checkpoint_hash.md and .csv.

    python benchmarks/bench_checkpoint_hash.py [--gb 1] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rrhf_fast.integrity import HASH, file_digest, seal_files

GB = 10**9


def _hash_file(path: Path, name: str) -> float:
    """Seconds to hash the file with hashlib's `name`, read as file_digest reads it."""
    digest, buffer = hashlib.new(name), bytearray(1 << 22)
    view = memoryview(buffer)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return time.perf_counter() - t0


def _save(directory: Path, weights: dict[str, torch.Tensor], seal: bool) -> float:
    """Seconds to write the weights and make them durable: fsync alone, or seal_files (hash + fsync)."""
    t0 = time.perf_counter()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    if seal:
        seal_files(directory)
    else:
        for path in directory.iterdir():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (10**9 bytes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint is written")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_hash"))
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = dict(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                python=platform.python_version(), torch=torch.__version__,
                load=" / ".join(f"{x:.1f}" for x in os.getloadavg()))  # fmt: skip
    values = int(args.gb * GB) // 4
    per = values // 8  # eight tensors, as a model's layers
    weights = {f"layer{i}.weight": torch.randn(per) for i in range(8)}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        plain, sealed, sha, blake, verify = [], [], [], [], []
        for r in range(args.repeats):
            order = ((False, plain), (True, sealed))
            for seal, into in order if r % 2 == 0 else order[::-1]:  # alternated: neither always goes first
                directory = root / f"{'sealed' if seal else 'plain'}-{r}"
                directory.mkdir()
                into.append(_save(directory, weights, seal))
            file = root / f"sealed-{r}" / "model.safetensors"
            size = file.stat().st_size
            sha.append(_hash_file(file, "sha256"))
            blake.append(_hash_file(file, "blake2b"))
            t0 = time.perf_counter()
            file_digest(file)  # what a resume's verify runs per file
            verify.append(time.perf_counter() - t0)
            for directory in (root / f"plain-{r}", root / f"sealed-{r}"):
                for path in directory.iterdir():
                    path.unlink()
                directory.rmdir()
    gb = size / GB
    measured = {
        "sha256, page cache": sha,
        "blake2b, page cache": blake,
        "save: write + fsync": plain,
        f"save: write + {HASH} + fsync (seal_files)": sealed,
        f"verify before resume ({HASH}, page cache)": verify,
    }
    rows = [dict(measure=name, seconds=statistics.median(v), s_per_gb=statistics.median(v) / gb,
                 min_s=min(v), max_s=max(v)) for name, v in measured.items()]  # fmt: skip
    median = dict(
        zip(("sha", "blake", "plain", "sealed", "verify"), (r["seconds"] for r in rows), strict=True)
    )
    for row in rows:
        row.update(gb=round(gb, 3), repeats=args.repeats, **meta)
        print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    a, b = rows[2], rows[3]  # the two saves
    overlap = a["min_s"] <= b["max_s"] and b["min_s"] <= a["max_s"]
    overlap = "within their ranges on this loaded machine" if overlap else "outside their ranges"
    lines = [
        "# Checkpoint content hashes: cost on a 1 GB checkpoint (benchmarks/bench_checkpoint_hash.py)",
        "",
        f"{meta['date']}, commit {commit}, {meta['machine']}, Python {meta['python']}, "
        f"torch {meta['torch']}. One safetensors file of {gb:.3f} GB (fp32), median (and range) of "
        f"{args.repeats} repeats, written under {args.dir}. A shared 2-core CPU: other jobs ran beside "
        f"it (load average {meta['load']} over 1 / 5 / 15 minutes at the start), so the seconds vary "
        "from run to run; the rows were measured back to back in one process. 'Page cache': the file "
        "was just written, so the hash reads memory, not the disk (a verify after a reboot reads the "
        "disk as well).",
        "",
        "| measure | seconds (median) | range | seconds per GB |",
        "|---|---|---|---|",
        *(
            f"| {r['measure']} | {r['seconds']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
            f"{r['s_per_gb']:.2f} |"
            for r in rows
        ),  # fmt: skip
        "",
        f"SHA-256 is {median['blake'] / median['sha']:.1f}x as fast as BLAKE2b here (this CPU has SHA "
        f"instructions, which OpenSSL's SHA-256 uses). A save spends about {median['sha'] / gb:.1f} s per "
        f"GB hashing (the first row); the two save rows differ by {median['sealed'] - median['plain']:+.2f} "
        f"s, {overlap}. A resume spends {median['verify'] / gb:.1f} s per GB verifying before it loads.",
        "",
    ]
    Path(f"{args.out}.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}.md and .csv")


if __name__ == "__main__":
    main()
