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

import errno
import os
import tempfile
from pathlib import Path

from rrhf_fast.errors import UserError


def make_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> list[Path]:
    """mkdir -p, returning the directories it created; one sentence if the path cannot be one
    (empty, a name longer than the file system allows, under a file, under /proc, read-only).
    Every command's output directory goes through here."""
    if not str(path).strip():  # Path("") is ".": the run would write into whatever directory it ran in
        raise UserError(f"{flag} is empty; give a directory (e.g. {flag} runs/my-run)")
    path = Path(path)
    try:
        return _make_dir(path, flag)
    except OSError as err:  # Path.exists() raises, not returns False, for a name over NAME_MAX
        if err.errno == errno.ENAMETOOLONG:
            raise UserError(f"{flag} {_shown(path)}: {_too_long(path)}; give a shorter name") from None
        raise UserError(f"{flag} {_shown(path)}: cannot create it ({err.strerror or err}); "
                        "give a writable directory") from None  # fmt: skip


def _make_dir(path: Path, flag: str) -> list[Path]:
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is under {blocker}, a file"
        raise UserError(f"{flag} {path} {where}; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # its own name is too long
        return False


def _shown(path: Path) -> str:
    """A path as an error quotes it: a very long one cut in the middle."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]} ({len(text)} characters)"


def _too_long(path: Path) -> str:
    """Which limit a path exceeds: a name over the file system's NAME_MAX, or the whole over PATH_MAX."""
    existing = next((p for p in path.absolute().parents if _is_dir(p)), Path("/"))
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > name_max:
        return (f"a name of {len(os.fsencode(longest))} bytes, the file system allows {name_max} "
                "per name")  # fmt: skip
    return f"{len(os.fsencode(str(path.absolute())))} bytes in all, the file system allows {path_max}"


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
    if not str(path).strip():
        raise UserError(f"{flag} is empty; give a file name")
    path = Path(path)
    try:
        _check_output_file(path, flag)
    except OSError as err:  # a name over NAME_MAX: Path.is_dir() and exists() raise it
        if err.errno != errno.ENAMETOOLONG:
            raise
        raise UserError(f"{flag} {_shown(path)}: {_too_long(path)}; give a shorter name") from None


def _check_output_file(path: Path, flag: str) -> None:
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
        if getattr(err, "errno", None) == errno.ENAMETOOLONG:
            raise
        why = getattr(err, "strerror", None) or "cannot create its directory"
        raise UserError(f"{flag} {path}: cannot write there ({why}); "
                        "give a writable directory") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    remove_created(created)
