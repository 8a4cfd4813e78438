"""Files of records: JSONL, a JSON array, parquet, CSV, arrow, a folder of shards, a saved dataset.

`read_rows(path, split)` yields `Row`s: one record (a dict) and where it is, "FILE:LINE" for JSONL
and JSON (the line the record starts on) or "FILE:row N" (1-based) for columnar files, so that every
error about a record names it. What the record *means* (which columns) is schemas.py's concern.

JSONL and JSON are read here, line by line: the `datasets` JSON builder gives no line numbers and
casts every row to one Arrow schema, so a string score on line 900 surfaces as an ArrowInvalid
about a column, not as a line. The columnar files (parquet, CSV, arrow) and saved datasets go
through the `datasets` library, a file at a time so that a row is named by its shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rrhf_fast.errors import DataError

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that reads it.
COLUMNAR = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
TEXT = (".jsonl", ".json")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")
# What `datasets` skips in a data folder (datasets/data_files.py FILES_TO_IGNORE): its metadata.
FILES_TO_IGNORE = ("README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip",
                   "dataset_dict.json")  # fmt: skip


@dataclass
class Row:
    record: Any  # normally a dict; anything else is the record's error
    where: str  # "FILE:LINE" or "FILE:row N"
    path: str
    line: int | None  # JSONL/JSON line, None for columnar rows
    columnar: bool = False  # CSV cells are text: list fields arrive JSON-encoded


@dataclass
class ReadStats:
    """Per file read: the blank JSONL lines skipped (1-based)."""

    blank_lines: list[int]


def read_rows(path: str | Path, split: str = "train", stats: ReadStats | None = None) -> Iterator[Row]:
    """Every record of `path` (a file, a folder of shards, a saved Dataset or DatasetDict)."""
    path = Path(path)
    if path.is_dir():
        yield from _read_folder(path, split, stats)
    elif not path.exists():
        raise DataError(
            str(path), None, None, "no such file; give a JSONL/JSON/parquet/CSV/arrow file or a folder"
        )
    else:
        yield from _read_file(path, stats)


def _read_file(path: Path, stats: ReadStats | None) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix in COLUMNAR:
        yield from _read_columnar(path, COLUMNAR[suffix])
    elif suffix == ".json" and _first_char(path) == "[":
        yield from _read_json_array(path)
    else:  # .jsonl, or any other name: JSON Lines, as before
        yield from _read_jsonl(path, stats)


# ----------------------------------------------------------------------------------------------
# JSON Lines and JSON arrays


def _read_jsonl(path: Path, stats: ReadStats | None) -> Iterator[Row]:
    blank = stats.blank_lines if stats is not None else []
    for lineno, raw in _numbered_lines(path):
        text = _decode(raw, path, lineno)
        if not text.strip():
            blank.append(lineno)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                str(path), lineno, None, f"invalid JSON ({err.msg} at column {err.colno}); fix the line"
            ) from None
        yield Row(record, f"{path}:{lineno}", str(path), lineno)


def _read_json_array(path: Path) -> Iterator[Row]:
    """A JSON array of records; each record is named by the line its object starts on."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        problem = f"invalid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        raise DataError(str(path), line, None, problem) from None
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(str(path), err.lineno, None, f"invalid JSON ({err.msg}); fix the file") from None
        yield Row(record, f"{path}:{line}", str(path), line)
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(
                str(path), line, None, "invalid JSON (expected ',' or ']' after a record); fix the file"
            )


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", errors="replace")


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


# ----------------------------------------------------------------------------------------------
# Columnar files and saved datasets, through `datasets`


def _read_columnar(path: Path, builder: str) -> Iterator[Row]:
    dataset = _load_builder(builder, path)
    for i, record in enumerate(dataset, start=1):
        record = {k: v for k, v in record.items() if v is not None}  # a column absent in this row
        yield Row(record, f"{path}:row {i}", str(path), None, columnar=builder == "csv")


def _load_builder(builder: str, path: Path) -> Any:
    import datasets

    # In memory, its cache in a folder that goes away: reading data must not write beside it.
    with tempfile.TemporaryDirectory() as cache, quiet_datasets():
        try:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as err:  # pyarrow / pandas raise many types for one cause: an unreadable file
            problem = f"cannot be read as {builder} ({type(err).__name__}: {str(err)[:160]}); check the file"
            raise DataError(str(path), None, None, problem) from None


def _read_folder(path: Path, split: str, stats: ReadStats | None) -> Iterator[Row]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        yield from _read_saved(path, split)
        return
    for file in _files_of_split(path, data_files(path), split):
        yield from _read_file(file, stats)


def data_files(folder: Path) -> list[Path]:
    """The data files of a folder of shards, by one rule (that of `datasets`' folder loading): files
    and folders named ".*" or "__*" and datasets' metadata files (README.md, dataset_info.json, ...)
    are skipped; the rest must be data files of ONE format. Other suffixes (notes, scripts) are
    skipped with one log line naming them; a second data format (a meta.json beside .jsonl shards)
    is an error naming both files, never read as records."""
    data, other = [], []
    for p in sorted(folder.rglob("*")):
        parts = p.relative_to(folder).parts
        if not p.is_file() or p.name in FILES_TO_IGNORE or any(s.startswith((".", "__")) for s in parts):
            continue
        (data if p.suffix.lower() in (*COLUMNAR, *TEXT) else other).append(p)
    if not data:
        raise DataError(
            str(folder), None, None, "holds no saved dataset and no .jsonl/.json/.parquet/.csv/.arrow files"
        )
    counts = Counter(p.suffix.lower() for p in data)
    # The shards' format is the most common one; on a tie not .json, the usual suffix of metadata.
    shard = max(counts, key=lambda s: (counts[s], s != ".json"))
    odd = next((p for p in data if p.suffix.lower() != shard), None)
    if odd is not None:
        example = next(p for p in data if p.suffix.lower() == shard)
        raise DataError(
            str(odd), None, None,
            f"is a {odd.suffix} file among {shard} shards (e.g. {example.name}) in {folder}: "
            "a folder of shards holds one format; move it out, or give the data file itself",
        )  # fmt: skip
    if other:
        names = ", ".join(p.name for p in other[:5]) + (" ..." if len(other) > 5 else "")
        logger.info("%s: reading the %s files; skipped %d other file(s): %s", folder, shard,
                    len(other), names)  # fmt: skip
    return data


def _files_of_split(folder: Path, files: list[Path], split: str) -> list[Path]:
    """The shards of `split` when their names say which split they hold (train-00000.parquet,
    data/test/...), else every file."""
    named = {f: _split_of(f.relative_to(folder)) for f in files}
    if all(s is None for s in named.values()):
        return files
    chosen = [f for f, s in named.items() if s == split]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise DataError(
            str(folder), None, None, f"holds splits {found}, not {split!r}; choose one with --data-split"
        )
    return chosen


def _split_of(relative: Path) -> str | None:
    for part in relative.parts:
        match = re.match(r"([a-z]+)(?:[-_.]|$)", part.lower())
        if match and match.group(1) in SPLIT_NAMES:
            return match.group(1)
    return None


def _read_saved(path: Path, split: str) -> Iterator[Row]:
    import datasets

    try:
        with quiet_datasets():
            loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(path), None, None, f"is not a saved dataset ({err}); give a data file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            problem = f"holds splits {sorted(loaded)}, not {split!r}; choose one with --data-split"
            raise DataError(str(path), None, None, problem)
        loaded, path = loaded[split], path / split
    yield from dataset_rows(loaded, str(path))


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """`datasets` draws a "Generating train split" bar for every file read: noise on every load."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def dataset_rows(dataset: Any, name: str) -> Iterator[Row]:
    """The rows of an in-memory `datasets.Dataset`, named "NAME:row N" (1-based)."""
    for i, record in enumerate(dataset, start=1):
        record = {k: v for k, v in record.items() if v is not None}
        yield Row(record, f"{name}:row {i}", name, None)
