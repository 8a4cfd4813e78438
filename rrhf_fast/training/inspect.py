"""`rrhf-fast inspect`: how records become tokens, for debugging data before a run.

For each record (up to --limit): where it is, its prompt tokens and each response's tokens, exactly
as `train` with the same flags would pack them (tokenize.tokenize_examples). `--format text` shows
the decoded pieces with every token boundary marked by `|`; `--format json` prints one object per
record, `{"source", "prompt_ids", "response_ids", "scores"}`. Both end with the packing summary of
every record (not only the shown ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import check_positions, describe_packing, packing_summary
from rrhf_fast.data.records import load_examples_with_stats
from rrhf_fast.data.tokenize import TokenizedExample, tokenize_examples
from rrhf_fast.errors import UserError

# The TrainConfig flags that decide which records are read and how they become tokens.
_FLAGS = ("model", "data", "max_prompt_len", "max_response_len", "chat_template", "data_split",
          "query_field", "responses_field", "scores_field")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    skip = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _FLAGS]
    config_module.add_arguments(parser, TrainConfig, skip=skip)
    parser.add_argument("--limit", type=int, default=5, metavar="N", help="records to show (default: 5)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")


def main(args: argparse.Namespace) -> int:
    from rrhf_fast.models.loading import load_config, load_tokenizer, max_positions

    config = TrainConfig(output_dir=".", **{name: getattr(args, name) for name in _FLAGS})
    config.validate()
    if args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")
    stats = load_examples_with_stats(config.data, require_scores=False, **config.data_options())
    if not stats.examples:
        raise UserError(f"{config.data}: holds no records")
    tokenizer = load_tokenizer(config.model)
    where = stats.locations()
    items = tokenize_examples(stats.examples, tokenizer, locations=where, **config.tokenizing())
    check_positions(items, where, max_positions(load_config(config.model)))  # what train refuses
    for item, loc in list(zip(items, where, strict=True))[: args.limit]:
        print(_as_json(item, loc) if args.format == "json" else _as_text(item, loc, tokenizer))
    summary = packing_summary(items)
    if args.format == "json":
        print(json.dumps({"packing": summary, "formats": stats.formats}))
    else:
        shapes = ", ".join(f"{n} {name}" for name, n in stats.formats.items())
        print(f"records: {shapes}")
        print(describe_packing(summary))
    return 0


def _as_json(item: TokenizedExample, where: str) -> str:
    return json.dumps(
        {
            "source": where,
            "prompt_ids": item.prompt_ids,
            "response_ids": item.response_ids,
            "scores": item.scores,
        }
    )


def _as_text(item: TokenizedExample, where: str, tokenizer: Any) -> str:
    lines = [
        f"{where}: {len(item.response_ids)} response(s)"
        + (" [prompt/response share a token]" if item.merged else "")
    ]
    lines.append(f"  prompt ({len(item.prompt_ids)} tokens): {pieces(item.prompt_ids, tokenizer)}")
    for j, ids in enumerate(item.response_ids):
        score = f", score {item.scores[j]:g}" if item.scores else ""
        lines.append(f"  response {j} ({len(ids)} tokens{score}): {pieces(ids, tokenizer)}")
    return "\n".join(lines)


def pieces(ids: list[int], tokenizer: Any) -> str:
    """The tokens' text with `|` between tokens; special tokens as written, newlines as \\n."""
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return "|".join(t.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|") for t in texts)
