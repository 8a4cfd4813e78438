"""A checkpoint's content hashes: recorded when it is saved, verified before anything reads it.

COMPLETE.json (checkpoint.py's marker) records, beside each file's size, its SHA-256 under
`"sha256"`. A save hashes each file right after it was written, in the same open as its fsync, so
the bytes come from the page cache, not a second read of the disk (the writers are save_pretrained,
torch.save and DCP's: they take a path, not a stream to hash as it goes). SHA-256 because it is the
fastest strong hash in hashlib on a CPU with SHA instructions (x86 SHA-NI, ARMv8 crypto): 1.6 s/GB
against BLAKE2b's 2.9 s/GB on the shared 2-core machine of benchmarks/results/checkpoint_hash.md.

`verify_marker` is every reader's check (resume, `merge`, any command whose --model is a
checkpoint): sizes first (cheap), then each file's hash; the first file that differs is one
sentence. A checkpoint written before hashes were kept still loads, after one note. A process
that verifies the same unchanged files again (resume reads the checkpoint in three calls) hashes
them once: a verified checkpoint is remembered by every file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from rrhf_fast.errors import UserError

FORMAT = "rrhf-fast-checkpoint"
VERSION = 1
MARKER = "COMPLETE.json"
HASH = "sha256"  # the marker's key and hashlib's name
_BLOCK = 1 << 22  # bytes read at a time

_verified: dict[str, tuple] = {}  # checkpoint -> the stat of its files when they were last verified
_noted: set[str] = set()  # checkpoints without hashes, already noted


def file_digest(path: Path, fd: int | None = None) -> str:
    """SHA-256 of the file (of `fd`, an open descriptor of it, when given) as hex."""
    digest = hashlib.new(HASH)
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            n = os.readv(fd, [buffer])
            if not n:
                break
            digest.update(view[:n])
    finally:
        if own:
            os.close(fd)
    return digest.hexdigest()


def seal_files(directory: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Every file under `directory`: its size and hash, each file fsynced in the same open (the hash
    reads what was just written, from the page cache). Returns (sizes, hashes) by relative path."""
    sizes, hashes = {}, {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(directory).as_posix()
        fd = os.open(path, os.O_RDONLY)
        try:
            hashes[name] = file_digest(path, fd)
            sizes[name] = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)
    return sizes, hashes


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of checkpoint `path`, checked to be one of ours in a version this reads."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path}: not a complete rrhf-fast checkpoint ({err}); delete it or pick another"
        ) from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise UserError(f"{path}: {MARKER} is not an rrhf-fast checkpoint marker; delete the directory")
    if marker.get("version") != VERSION:
        raise UserError(
            f"{path}: checkpoint format version {marker.get('version')}, this rrhf-fast reads {VERSION}"
        )
    if not isinstance(marker.get("files", {}), dict) or not isinstance(marker.get(HASH, {}), dict):
        raise UserError(f"{path}: {MARKER} is not an rrhf-fast checkpoint marker; delete the directory")
    return marker


def verify_contents(path: Path, marker: dict[str, Any], flag: str = "") -> None:
    """Every file the marker lists has its recorded size and hash (a marker without hashes: sizes,
    and one note). `flag` ("--checkpoint ", ...) is put before the path in the error."""
    where = f"{flag}{path}"
    files, hashes = marker.get("files", {}), marker.get(HASH)
    stats = []
    for name, size in files.items():
        file = path / name
        try:
            stat = file.stat() if file.is_file() else None
        except OSError:
            stat = None
        if stat is None or stat.st_size != size:
            found = "missing" if stat is None else f"{stat.st_size} bytes"
            raise UserError(
                f"{where}: {name} is {found}, expected {size} bytes (truncated or modified checkpoint); "
                "delete this checkpoint to resume from the one before"
            )
        stats.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    key = str(path.resolve())
    if hashes is None:
        if key not in _noted:
            _noted.add(key)
            logging.getLogger(__name__).warning(
                f"note: {where} was written by an older rrhf-fast without content hashes: only its files' "
                "sizes were checked, not their contents"
            )
        return
    if _verified.get(key) == tuple(stats):
        return
    unhashed = [name for name in files if name not in hashes]
    if unhashed:
        raise UserError(f"{where}: {MARKER} records no {HASH} for {unhashed[0]} (a modified marker); "
                        "delete this checkpoint to resume from the one before")  # fmt: skip
    for name in files:
        if file_digest(path / name) != hashes[name]:
            raise UserError(
                f"{where}: {name} differs from what was saved (its {HASH} is not the one {MARKER} "
                "recorded: damaged on disk or modified since); delete this checkpoint to resume from "
                "the one before, or restore the file"
            )
    _verified[key] = tuple(stats)


def verify_if_checkpoint(model: str, prefix: str) -> None:
    """A command's model directory that is an rrhf-fast checkpoint (it holds the marker) is verified
    before it is read: a damaged file is one sentence naming the flag (`prefix`: "--model ") and the
    file."""
    path = Path(model).expanduser()
    try:
        is_checkpoint = (path / MARKER).is_file()
    except OSError:
        return
    if is_checkpoint:
        verify_contents(path, read_marker(path), prefix)
