"""What the training tests share: graded sorting data, a small CPU TrainConfig, a run's metrics."""

import json
import random

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples


def write_data(path, n=8, seed=0, equal_lengths=False):
    """n queries, 3 graded responses each (a sorted string, a near miss, a wrong order); with
    equal_lengths every query packs to the same size."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(4 if equal_lengths else rng.randint(2, 6)))
        gold = "".join(sorted(digits))
        responses = (
            [gold, digits, gold[::-1]] if equal_lengths else [gold, digits + "0", gold[::-1][:-1] or "x"]
        )
        examples.append(Example(query=f"sort {digits}:", responses=responses, scores=[1.0, 0.5, 0.0]))
    write_examples(path, examples)
    return path


def config(tmp_path, model_dir, data, name="run", **overrides):
    """torch AdamW on the CPU, no warmup, no saves or logs unless asked; run dir tmp_path / name."""
    base = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / name), optim="adamw", lr=1e-2,
                device="cpu", log_every=0, plot=False, save_every=0, warmup_steps=0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def reseal(checkpoint):
    """Rewrite the checkpoint's marker to match its files as they now are (sizes and hashes): a
    consistent checkpoint with bad contents, as a buggy or hostile writer would leave it, so that a
    test reaches the check behind the hashes."""
    from rrhf_fast.integrity import HASH, MARKER, seal_files

    marker = json.loads((checkpoint / MARKER).read_text())
    files, hashes = seal_files(checkpoint)
    files.pop(MARKER), hashes.pop(MARKER)
    marker["files"], marker[HASH] = files, hashes
    (checkpoint / MARKER).write_text(json.dumps(marker))


def tree_digest(root):
    """Every file under `root` (relative path -> sha256 of its bytes), for "left byte for byte"."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _gloo_rank(rank: int, fn, store_dir: str, args: tuple, results: dict) -> None:
    import datetime

    import torch.distributed as tdist

    store = tdist.FileStore(f"{store_dir}/store", 2)
    tdist.init_process_group(
        "gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results[rank] = fn(rank, *args)
    finally:
        tdist.destroy_process_group()


def on_two_gloo_ranks(fn, store_dir, *args) -> dict:
    """fn(rank, *args) on two spawned processes in one gloo group (a FileStore in store_dir); each
    rank's return value by rank. fn must be a module-level function (spawn pickles it)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_rank, args=(fn, str(store_dir), args, results), nprocs=2, join=True)
        return dict(results)
