"""Where commands write: output directories and files, checked before any work and, when a command
fails, left as they were.

`make_output_dir` is every command's rule for an output directory (train's run directory, iterate's,
merge's): a path under a regular file, under /proc or in a read-only directory is one sentence.
`check_output_file` is the rule for an output file (sample, score, ref-logps): it is called before
a model loads, so a path that cannot be written costs no work; it writes a probe and removes it,
and the directories it made. `remove_created` undoes `make_output_dir` for a command that failed
before it wrote anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rrhf_fast.errors import UserError


def make_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> list[Path]:
    """mkdir -p, returning the directories it created; one sentence if the path cannot be one
    (under a file, under /proc, read-only). Every command's output directory goes through here."""
    path = Path(path)
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is under {blocker}, a file"
        raise UserError(f"{flag} {path} {where}; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create it ({err.strerror or err}); "
                        "give a writable directory") from None  # fmt: skip
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    """Remove the directories `make_output_dir` created, innermost first, as long as they are empty."""
    for made in reversed(created):
        try:
            made.rmdir()
        except OSError:  # something was written there: keep it
            break


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail now, before a model loads, if the output file `path` cannot be written (a directory, a
    path under a file or under /proc, a read-only directory); writes and leaves nothing: a probe file
    is created beside it and removed, and so are the directories made for it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{flag} {path} is under {blocker}, a file; give a path in a directory")
    created: list[Path] = []
    try:
        created = make_output_dir(path.parent)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
    except (OSError, UserError) as err:
        remove_created(created)
        why = getattr(err, "strerror", None) or "cannot create its directory"
        raise UserError(f"{flag} {path}: cannot write there ({why}); "
                        "give a writable directory") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    remove_created(created)
