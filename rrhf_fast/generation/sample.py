"""Sample k candidate responses per prompt from a causal LM (`rrhf-fast sample`).

Candidates come from diverse beam search (the RRHF paper's sampling policy, see beam_search.py),
from top-p / temperature sampling, or from both (`strategy="mixed"`); `strategy="greedy"` gives the
one greedy answer per prompt (what `rrhf-fast iterate` evaluates). The output is the training
JSONL format with empty scores (`rrhf-fast score` fills them) and a per-response `sources` list in
the meta; `--merge` adds responses from other sources (gold answers, another model's outputs).
Prompts are tokenised exactly as training tokenises them (`packing.tokenize_prompt`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rrhf_fast import config as config_module
from rrhf_fast.checkpointing.provenance import save_run_config
from rrhf_fast.config import config_from_args, opt
from rrhf_fast.data.outputs import check_output_file
from rrhf_fast.data.packing import tokenize_prompt
from rrhf_fast.data.records import Example, load_examples_with_stats, write_examples
from rrhf_fast.data.schemas import Message, parse_prompt
from rrhf_fast.errors import DataError, UserError
from rrhf_fast.generation.beam_search import diverse_beam_search
from rrhf_fast.models.loading import INFERENCE_DTYPES, load_pretrained
from rrhf_fast.models.tokenizer import decode, ensure_pad_token, eos_token_ids, left_pad
from rrhf_fast.models.wrapping import eval_mode

logger = logging.getLogger(__name__)

STRATEGIES = ("beam", "sample", "mixed", "greedy")
SAMPLING_BACKENDS = ("hf", "vllm")


@dataclass
class SampleConfig:
    """How to generate; each field is a `rrhf-fast sample` flag (`max_new_tokens` -> `--max-new-tokens`)."""

    strategy: str = opt("beam", "diverse beam search, sampling, both, or greedy (k = 1)", choices=STRATEGIES)
    num_beam_groups: int | None = opt(None, "beam groups (default: one per beam, the most diverse)")
    diversity_penalty: float = opt(1.0, "subtracted per earlier beam group that chose the same token")
    length_penalty: float = opt(1.0, "beam hypothesis score = sum of log-probs / length ** this")
    beam_candidates: int | None = opt(None, "mixed: how many of the k come from beam search (default k // 2)")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = opt(0, "sample among the k likeliest tokens (0: off)")
    max_new_tokens: int = opt(128, "generated tokens per response at most")
    max_prompt_len: int | None = opt(None, "keep the last N prompt tokens, as training does")
    stop: tuple[str, ...] = opt((), 'cut a response before this string, e.g. "Human:" (repeatable)')
    chat_template: bool = opt(
        False, "a text query becomes the user turn of the chat template (a conversation always does)"
    )
    batch_size: int = opt(8, "prompts per generation call (each expands to k rows)")
    seed: int | None = opt(0, "seed of the sampling (results repeat for the same seed and batch size)")

    def split(self, k: int) -> tuple[int, int]:
        """(candidates from beam search, candidates from sampling) for k candidates."""
        if self.strategy in ("beam", "greedy"):  # greedy is a beam of one, decoded by generate()
            return k, 0
        if self.strategy == "sample":
            return 0, k
        beams = self.beam_candidates if self.beam_candidates is not None else max(1, k // 2)
        if not 0 <= beams <= k:
            raise UserError(f"--beam-candidates must be between 0 and --num-candidates ({k}), got {beams}")
        return beams, k - beams

    def sources(self, k: int) -> list[str]:
        """The source name of each of the k candidates, in the order generate_candidates returns them."""
        if self.strategy == "greedy":
            return ["greedy"] * k
        beams, samples = self.split(k)
        return ["beam"] * beams + ["sample"] * samples

    def validate(self, k: int) -> SampleConfig:
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if k < 1:
            raise UserError(f"--num-candidates must be at least 1, got {k}")
        if self.strategy == "greedy" and k != 1:
            raise UserError(f"--strategy greedy gives one response per prompt; got --num-candidates {k}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise UserError("sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
        if any(not s for s in self.stop):
            raise UserError("--stop strings must not be empty")
        beams, _ = self.split(k)
        groups = self.num_beam_groups or beams
        if beams and (groups < 1 or beams % groups):
            raise UserError(f"--num-beam-groups {groups} must divide the {beams} beam candidates")
        return self


# ----------------------------------------------------------------------------------------------
# Prompts and merged sources


def read_prompts(path: str | os.PathLike) -> list[str | list[Message]]:
    """Queries from a text file (one per line) or JSONL records (`{"query"}`, TRL's `{"prompt"}`, a
    conversation, or any training record: schemas.parse_prompt); blank lines skipped.

    `.jsonl` is JSONL and `.txt` is text; any other name is JSONL when its first non-blank
    character is `{`. A text line keeps its spaces (only the line break is removed).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), None, None, f"cannot read the prompts file ({err.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    suffix = path.suffix.lower()
    is_jsonl = suffix == ".jsonl" or (suffix != ".txt" and raw.lstrip()[:1] == b"{")
    queries = []
    for lineno, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            raise DataError(
                str(path), lineno, None, f"invalid UTF-8 at offset {err.start}; re-save as UTF-8"
            ) from None
        if text.strip():
            queries.append(_parse_prompt(text, path, lineno) if is_jsonl else text)
    if not queries:
        raise DataError(str(path), None, None, "holds no prompts")
    return queries


def _parse_prompt(text: str, path: Path, lineno: int) -> str | list[Message]:
    """A JSONL prompt record, in the shapes `train` reads (schemas.parse_prompt): a conversation is
    kept as its messages and goes through the chat template as training's prompts do."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(str(path), lineno, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    return parse_prompt(record, lambda name, problem: DataError(str(path), lineno, name, problem))


def _query_key(query: Any) -> str:
    """A query as a dict key: its text, or its messages as JSON (a conversation)."""
    return query if isinstance(query, str) else json.dumps(query, sort_keys=True)


def merge_responses(examples: list[Example], path: str | os.PathLike) -> int:
    """Append the responses of `path` (training format, scores ignored) to the examples with the
    same query; their source is the record's own `sources` or else the file's stem. Returns the
    number of responses added; a query not among the examples is an error naming its line."""
    stats = load_examples_with_stats(path, require_scores=False)
    by_query: dict[str, list[Example]] = {}
    for ex in examples:
        by_query.setdefault(_query_key(ex.query), []).append(ex)
    added = 0
    for extra, where in zip(stats.examples, stats.locations(), strict=True):
        targets = by_query.get(_query_key(extra.query))
        if targets is None:
            raise UserError(
                f"{where}: query {_short(extra.query)} is not among the prompts; merge files must use "
                "the prompts' exact query text"
            )
        names = extra.meta.get("sources")
        if not (isinstance(names, list) and len(names) == len(extra.responses)):
            names = [Path(path).stem] * len(extra.responses)
        for ex in targets:
            ex.responses.extend(extra.responses)
            ex.meta.setdefault("sources", []).extend(str(n) for n in names)
            added += len(extra.responses)
    return added


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ----------------------------------------------------------------------------------------------
# Generation (Hugging Face backend)


@torch.no_grad()
def generate_candidates(
    model: Any,
    tokenizer: Any,
    queries: Sequence[str | list[Message]],
    num_candidates: int,
    config: SampleConfig | None = None,
) -> list[list[str]]:
    """k candidate texts per query, in the order of `config.sources(k)`; may contain empty strings.

    Reproducible for the same seed, batch size, model and device. Stop strings cut the text after
    generation (beam search stops only at EOS or `max_new_tokens`).
    """
    config = (config or SampleConfig()).validate(num_candidates)
    ensure_pad_token(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    prompts = [_prompt_ids(q, tokenizer, config) for q in queries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    out: list[list[str]] = [[] for _ in queries]
    with eval_mode(model):
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            batch = _generate_batch(
                model, tokenizer, [prompts[i] for i in idx], num_candidates, config, eos_ids
            )
            for i, seqs in zip(idx, batch, strict=True):
                out[i] = [cut_at_stop(decode(tokenizer, s, eos_ids), config.stop) for s in seqs]
    return out


def _generate_batch(
    model, tokenizer, prompts, k: int, config: SampleConfig, eos_ids
) -> list[list[list[int]]]:
    """New-token lists for a batch of prompt token lists: k per prompt, beam ones first."""
    n_beam, n_sample = config.split(k)
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
    if config.strategy == "greedy":
        return [[seq] for seq in _hf_generate(model, tokenizer, input_ids, mask, config, eos_ids, 1, False)]
    rows: list[list[list[int]]] = [[] for _ in prompts]
    if n_beam:
        beams = diverse_beam_search(
            model, input_ids, mask, num_beams=n_beam, num_beam_groups=config.num_beam_groups or n_beam,
            diversity_penalty=config.diversity_penalty, length_penalty=config.length_penalty,
            max_new_tokens=config.max_new_tokens, eos_token_ids=eos_ids,
        )  # fmt: skip
        for row, seqs in zip(rows, beams, strict=True):
            row.extend(seqs)
    if n_sample:
        new = _hf_generate(model, tokenizer, input_ids, mask, config, eos_ids, n_sample, True)
        for i, row in enumerate(rows):
            row.extend(new[i * n_sample : (i + 1) * n_sample])
    return rows


def _hf_generate(model, tokenizer, input_ids, mask, config: SampleConfig, eos_ids, n: int, sample: bool):
    """`generate()`'s new tokens: n sampled rows per prompt, or the greedy one (sample=False)."""
    knobs = dict(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k) if sample else {}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,  # generate counts position ids from it, as beam_search.positions does
        do_sample=sample,
        num_beams=1,
        **knobs,
        num_return_sequences=n,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(config.stop) or None,
        tokenizer=tokenizer if config.stop else None,
    )
    return out[:, input_ids.shape[1] :].tolist()


def _prompt_ids(query: str, tokenizer: Any, config: SampleConfig) -> list[int]:
    ids = tokenize_prompt(query, tokenizer, config.chat_template)
    if config.max_prompt_len is not None:
        ids = ids[-config.max_prompt_len :]
    if not ids:
        raise UserError(f"query {_short(query)} tokenises to no tokens; give a non-empty query")
    return ids


# ----------------------------------------------------------------------------------------------
# Tokens and text


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` before the first occurrence of any stop string, right-stripped when cut: the
    whitespace before a turn marker such as "Human:" belongs to the separator, not the response."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)].rstrip() if cuts else text


# ----------------------------------------------------------------------------------------------
# vLLM backend (optional)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def generate_candidates_vllm(
    model_path: str,
    queries: Sequence[str | list[Message]],
    num_candidates: int,
    config: SampleConfig,
    dtype: str = "auto",
) -> list[list[str]]:
    """`generate_candidates` on vLLM: top-p / temperature sampling only (vLLM has no diverse beam
    search). The prompts are the same token ids the HF backend feeds."""
    if not vllm_available():
        raise UserError(
            "--backend vllm needs vLLM, which is not installed: `pip install vllm`, or use --backend hf"
        )
    if config.strategy != "sample":
        raise UserError(
            f"--backend vllm supports --strategy sample only (got {config.strategy}); use --backend hf"
        )
    from vllm import LLM, SamplingParams

    from rrhf_fast.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path, require_eos=False)
    prompts = [{"prompt_token_ids": _prompt_ids(q, tokenizer, config)} for q in queries]
    llm = LLM(model=model_path, dtype=dtype, seed=config.seed or 0)
    params = SamplingParams(
        n=num_candidates, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or -1,
        max_tokens=config.max_new_tokens, stop=list(config.stop) or None, seed=config.seed,
    )  # fmt: skip
    outputs = llm.generate(prompts, params)
    return [[cut_at_stop(c.text, config.stop) for c in o.outputs] for o in outputs]


# ----------------------------------------------------------------------------------------------
# Files


def candidates_to_examples(
    queries: Sequence[str | list[Message]], candidates: Sequence[Sequence[str]], sources: Sequence[str]
) -> list[Example]:
    """Unscored examples from generated candidates, with a `sources` meta list; empty texts are
    dropped (training rejects empty responses) and counted in a warning."""
    examples, empty = [], 0
    for query, texts in zip(queries, candidates, strict=True):
        keep = [(t, s) for t, s in zip(texts, sources, strict=True) if t]
        empty += len(texts) - len(keep)
        examples.append(Example(query, [t for t, _ in keep], [], {"sources": [s for _, s in keep]}))
    if empty:
        logger.warning("dropped %d empty candidate(s) (EOS first, or a stop string at the start)", empty)
    return examples


def dedup_responses(ex: Example) -> None:
    """Keep the first of identical responses (and its source)."""
    seen, keep = set(), []
    for i, text in enumerate(ex.responses):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    ex.responses = [ex.responses[i] for i in keep]
    if "sources" in ex.meta:
        ex.meta["sources"] = [ex.meta["sources"][i] for i in keep]


def sample_file(
    model: str,
    prompts: str | os.PathLike,
    out: str | os.PathLike,
    num_candidates: int,
    config: SampleConfig | None = None,
    *,
    merge: Sequence[str | os.PathLike] = (),
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    dedup: bool = False,
) -> list[Example]:
    """`rrhf-fast sample`: prompts file -> unscored training JSONL (written atomically)."""
    config = (config or SampleConfig()).validate(num_candidates)
    if backend not in SAMPLING_BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(SAMPLING_BACKENDS)}, got {backend!r}")
    queries = read_prompts(prompts)
    check_output_file(out)
    if backend == "vllm":
        candidates = generate_candidates_vllm(model, queries, num_candidates, config, dtype)
    else:
        from transformers import AutoModelForCausalLM

        lm, tokenizer = load_pretrained(model, AutoModelForCausalLM, device, dtype)
        candidates = generate_candidates(lm, tokenizer, queries, num_candidates, config)
    examples = build_examples(queries, candidates, config.sources(num_candidates), merge=merge, dedup=dedup)
    write_examples(out, examples)
    return examples


def build_examples(
    queries: Sequence[str | list[Message]],
    candidates: Sequence[Sequence[str]],
    sources: Sequence[str],
    *,
    merge: Sequence[str | os.PathLike] = (),
    dedup: bool = False,
) -> list[Example]:
    """Unscored examples from generated candidates plus the `merge` files' responses; prompts left
    with no response are dropped (with a warning)."""
    examples = candidates_to_examples(queries, candidates, sources)
    for path in merge:
        logger.info("merged %d response(s) from %s", merge_responses(examples, path), path)
    if dedup:
        for ex in examples:
            dedup_responses(ex)
    empty = [i for i, ex in enumerate(examples) if not ex.responses]
    if empty:
        logger.warning("%d prompt(s) got no non-empty response and are left out (first: %s)", len(empty),
                       _short(examples[empty[0]].query))  # fmt: skip
        examples = [ex for ex in examples if ex.responses]
    return examples


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, metavar="PATH", help="causal LM: save_pretrained directory or hub id"
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='one prompt per line, or JSONL: {"query": ...} or {"prompt": ...}, text or messages',
    )
    p.add_argument(
        "--num-candidates", "-k", type=int, required=True, metavar="K", help="responses per prompt"
    )
    p.add_argument(
        "--out", required=True, metavar="FILE", help="output JSONL (training format, empty scores)"
    )
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="FILE",
        help="JSONL of extra responses (training format) matched by query (repeatable)",
    )
    p.add_argument(
        "--dedup", action=argparse.BooleanOptionalAction, default=False,
        help="drop repeated identical responses of a prompt",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=SAMPLING_BACKENDS, default="hf", help="vllm: faster sampling, if installed"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument(
        "--dtype", default="auto", choices=INFERENCE_DTYPES, help="(auto: bfloat16 on CUDA, else float32)"
    )
    config_module.add_arguments(p, SampleConfig)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args, SampleConfig)
    examples = sample_file(
        args.model, args.prompts, args.out, args.num_candidates, config, merge=args.merge,
        backend=args.backend, device=args.device, dtype=args.dtype, dedup=args.dedup,
    )  # fmt: skip
    run = {k: v for k, v in vars(args).items() if k not in asdict(config) and k != "command"}
    save_run_config(args.out, "sample", {**run, **asdict(config)})
    total = sum(len(ex.responses) for ex in examples)
    print(f"wrote {len(examples)} prompts with {total} responses to {args.out}")
    return 0
