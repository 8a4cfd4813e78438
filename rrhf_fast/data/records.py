"""RRHF examples: load them from JSONL or a Hugging Face dataset, validate them, write them back.

The format (docs/DESIGN.md §2) is one query per line:
`{"query": str, "responses": [str, ...], "scores": [float, ...]}`. Any other field is kept in
`Example.meta` and written back unchanged. Every malformed record raises `DataError` naming the
file, the line and the field; nothing is silently dropped. Blank lines are skipped, counted and
logged once per file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_fast.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One query with its k candidate responses and their reward scores (`[]` before scoring)."""

    query: str
    responses: list[str]
    scores: list[float]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadStats:
    """What `load_examples_with_stats` read: the examples and the blank lines it skipped."""

    examples: list[Example]
    source: str
    blank_lines: list[int] = field(default_factory=list)  # 1-based line numbers

    @property
    def num_blank(self) -> int:
        return len(self.blank_lines)

    def locations(self) -> list[str]:
        """Where each example is: "FILE:LINE" (JSONL, blank lines counted), else "SOURCE row I"."""
        if not Path(self.source).is_file():
            return [f"{self.source} row {i}" for i in range(len(self.examples))]
        blank, found, line = set(self.blank_lines), [], 0
        for _ in self.examples:
            line += 1
            while line in blank:
                line += 1
            found.append(f"{self.source}:{line}")
        return found


def load_examples(
    path_or_dataset: Any,
    *,
    query_field: str = "query",
    responses_field: str = "responses",
    scores_field: str = "scores",
    require_scores: bool = True,
) -> list[Example]:
    """Read examples from a JSONL file, a `save_to_disk` directory or a `datasets.Dataset`."""
    return load_examples_with_stats(
        path_or_dataset,
        query_field=query_field,
        responses_field=responses_field,
        scores_field=scores_field,
        require_scores=require_scores,
    ).examples


def load_examples_with_stats(
    path_or_dataset: Any,
    *,
    query_field: str = "query",
    responses_field: str = "responses",
    scores_field: str = "scores",
    require_scores: bool = True,
) -> LoadStats:
    """`load_examples`, also reporting the blank lines that were skipped."""
    fields = _Fields(query_field, responses_field, scores_field, require_scores)
    if isinstance(path_or_dataset, (str, os.PathLike)):
        path = Path(path_or_dataset)
        if path.is_dir():
            return _load_dataset(_load_from_disk(path), str(path), fields)
        if not path.exists():
            raise DataError(str(path), None, None, "no such file; give a JSONL file or a dataset directory")
        return _load_jsonl(path, fields)
    if hasattr(path_or_dataset, "column_names") and hasattr(path_or_dataset, "__iter__"):
        return _load_dataset(path_or_dataset, "<datasets.Dataset>", fields)
    raise TypeError(
        f"load_examples: expected a path or a datasets.Dataset, got {type(path_or_dataset).__name__}"
    )


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


# ----------------------------------------------------------------------------------------------
# Readers


@dataclass(frozen=True)
class _Fields:
    query: str
    responses: str
    scores: str
    require_scores: bool


def _load_jsonl(path: Path, fields: _Fields) -> LoadStats:
    stats = LoadStats(examples=[], source=str(path))
    for lineno, raw in _numbered_lines(path):
        text = _decode(raw, path, lineno)
        if not text.strip():
            stats.blank_lines.append(lineno)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                str(path), lineno, None, f"invalid JSON ({err.msg} at column {err.colno}); fix the line"
            ) from None
        stats.examples.append(_parse_record(record, fields, str(path), lineno))
    if stats.blank_lines:
        logger.warning("%s: skipped %d blank line(s): %s", path, stats.num_blank, _lines(stats.blank_lines))
    return stats


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write
            yield lineno, raw


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = _field_with_bad_bytes(raw)
        raise DataError(
            str(path),
            lineno,
            where,
            f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save the file as UTF-8",
        ) from None


def _field_with_bad_bytes(raw: bytes) -> str | None:
    """Name the top-level field holding the undecodable bytes, when the line is otherwise JSON."""
    try:
        record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        if any(0xDC80 <= ord(c) <= 0xDCFF for c in json.dumps(value, ensure_ascii=False) + key):
            return key
    return None


def _load_from_disk(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            str(path), None, None, "is a directory; reading datasets needs `pip install rrhf-fast[datasets]`"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(str(path), None, None, f"is not a saved dataset ({err}); give a JSONL file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(str(path), None, None, f"holds splits {list(loaded)}; load one split and pass it")
        loaded = next(iter(loaded.values()))
    return loaded


def _load_dataset(dataset: Any, name: str, fields: _Fields) -> LoadStats:
    stats = LoadStats(examples=[], source=name)
    for row, record in enumerate(dataset):
        record = {k: v for k, v in record.items() if v is not None}  # a column absent in this row
        stats.examples.append(_parse_record(record, fields, f"{name} row {row}", None))
    return stats


# ----------------------------------------------------------------------------------------------
# Validation


def _parse_record(record: Any, fields: _Fields, path: str, line: int | None) -> Example:
    def fail(name: str | None, problem: str) -> DataError:
        return DataError(path, line, name, problem)

    if not isinstance(record, dict):
        raise fail(None, f"expected a JSON object, got {_json_type(record)}")
    for name in (fields.query, fields.responses):
        if name not in record:
            raise fail(name, f"missing; present fields are {sorted(record)}")
    query = record[fields.query]
    if not isinstance(query, str):
        raise fail(fields.query, f"must be a string, got {_json_type(query)}")
    responses = _parse_responses(record[fields.responses], lambda p: fail(fields.responses, p))
    scores = _parse_scores(record.get(fields.scores), fields, lambda p: fail(fields.scores, p))
    if scores and len(scores) != len(responses):
        raise fail(
            fields.scores, f"has {len(scores)} scores for {len(responses)} responses; give one per response"
        )
    meta = {k: v for k, v in record.items() if k not in (fields.query, fields.responses, fields.scores)}
    return Example(query=query, responses=responses, scores=scores, meta=meta)


def _parse_responses(value: Any, fail) -> list[str]:
    if not isinstance(value, list):
        raise fail(f"must be a list of strings, got {_json_type(value)}")
    if not value:
        raise fail("is empty; every query needs at least one response")
    for i, resp in enumerate(value):
        if not isinstance(resp, str):
            raise fail(f"item {i} must be a string, got {_json_type(resp)}")
        if not resp:
            raise fail(f"item {i} is an empty string; drop it (and its score) or give text")
    return list(value)


def _parse_scores(value: Any, fields: _Fields, fail) -> list[float]:
    if value is None or (isinstance(value, list) and not value):
        if fields.require_scores:
            what = "missing" if value is None else "empty"
            raise fail(f"{what}; score the responses first with `rrhf-fast score`")
        return []
    if not isinstance(value, list):
        raise fail(f"must be a list of numbers, got {_json_type(value)}")
    scores = []
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise fail(f"item {i} must be a number, got {_json_type(s)} {s!r}")
        try:
            s = float(s)
        except OverflowError:
            s = math.inf
        if not math.isfinite(s):
            raise fail(f"item {i} is {s}; scores must be finite numbers")
        scores.append(s)
    return scores


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


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
