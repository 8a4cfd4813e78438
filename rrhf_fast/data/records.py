"""Examples: load them from any supported file or a `datasets.Dataset`, validate them, write them back.

`load_examples(path)` reads every format formats.py knows (JSONL, JSON, parquet, CSV, arrow, a folder
of shards, a saved Dataset / DatasetDict) holding any record shape schemas.py knows (rrhf-fast's
`{"query", "responses", "scores"}` of docs/DESIGN.md §2, TRL's standard / implicit-prompt /
conversational preference pairs, ranked lists) and returns `Example`s. Any other field is kept in
`Example.meta` and written back unchanged. Every malformed record raises `DataError` naming the
file, the line (or row) and the field; nothing is silently dropped. Blank JSONL lines are skipped,
counted and logged once per file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_fast.data.formats import ReadStats, Row, dataset_rows, read_rows
from rrhf_fast.data.schemas import Fields, Message, parse_record
from rrhf_fast.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One query with its k candidate responses and their reward scores (`[]` before scoring).

    `query` is a string, or a conversation (a list of `{"role", "content"}` messages); a response is
    a string, or the list of messages that answers the conversation (normally one assistant turn).
    """

    query: str | list[Message]
    responses: list[str] | list[list[Message]]
    scores: list[float]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadStats:
    """What `load_examples_with_stats` read: the examples, where each is, the blank lines skipped."""

    examples: list[Example]
    source: str
    blank_lines: list[int] = field(default_factory=list)  # 1-based line numbers
    where: list[str] = field(default_factory=list)  # "FILE:LINE" or "FILE:row N" of each example
    formats: dict[str, int] = field(default_factory=dict)  # record shape -> count (schemas.Parsed.format)

    @property
    def num_blank(self) -> int:
        return len(self.blank_lines)

    def locations(self) -> list[str]:
        """Where each example is: "FILE:LINE" (JSONL, JSON), "FILE:row N" (columnar, datasets)."""
        return list(self.where)


def load_examples(path_or_dataset: Any, **options: Any) -> list[Example]:
    """Read examples from a file, a folder or a `datasets.Dataset` (see load_examples_with_stats)."""
    return load_examples_with_stats(path_or_dataset, **options).examples


def load_examples_with_stats(
    path_or_dataset: Any,
    *,
    query_field: str = "query",
    responses_field: str = "responses",
    scores_field: str = "scores",
    require_scores: bool = True,
    split: str = "train",
) -> LoadStats:
    """Every example of `path_or_dataset`, where each one is, and the blank lines skipped.

    `split` picks the split of a DatasetDict folder or of a folder of shards named by split."""
    fields = Fields(query_field, responses_field, scores_field, require_scores)
    if isinstance(path_or_dataset, (str, os.PathLike)):
        read = ReadStats(blank_lines=[])
        stats = _collect(read_rows(path_or_dataset, split, read), str(path_or_dataset), fields)
        stats.blank_lines = read.blank_lines
        if stats.blank_lines:
            logger.warning(
                "%s: skipped %d blank line(s): %s",
                path_or_dataset,
                stats.num_blank,
                _lines(stats.blank_lines),
            )
        return stats
    if hasattr(path_or_dataset, "column_names") and hasattr(path_or_dataset, "__iter__"):
        return _collect(dataset_rows(path_or_dataset, "<datasets.Dataset>"), "<datasets.Dataset>", fields)
    raise TypeError(
        f"load_examples: expected a path or a datasets.Dataset, got {type(path_or_dataset).__name__}"
    )


def _collect(rows: Iterable[Row], source: str, fields: Fields) -> LoadStats:
    stats = LoadStats(examples=[], source=source)
    for row in rows:

        def fail(name: str | None, problem: str, row: Row = row) -> DataError:
            if row.line is None:  # columnar: "FILE:row N" is the whole location
                return DataError(row.where, None, name, problem)
            return DataError(row.path, row.line, name, problem)

        parsed = parse_record(row.record, fields, fail)
        stats.examples.append(Example(parsed.query, parsed.responses, parsed.scores, parsed.meta))
        stats.where.append(row.where)
        stats.formats[parsed.format] = stats.formats.get(parsed.format, 0) + 1
    return stats


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples as UTF-8 JSONL, one per line, atomically."""
    write_text_atomically(path, "".join(_dumps(ex) + "\n" for ex in examples))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """A temporary file beside `path`, fsynced, then renamed over it: a crash leaves the old file
    or the new one, never half of one. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lines(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def _dumps(ex: Example) -> str:
    clash = {"query", "responses", "scores"} & set(ex.meta)
    if clash:
        raise ValueError(f"write_examples: meta keys {sorted(clash)} would overwrite the example's fields")
    record = {"query": ex.query, "responses": list(ex.responses), "scores": [float(s) for s in ex.scores]}
    record.update(ex.meta)
    return json.dumps(record, ensure_ascii=False, allow_nan=False)
