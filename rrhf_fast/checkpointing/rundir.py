"""The output directory of a training run: checked before anything loads, held by one run at a time.

`claim_output_dir` runs first in `train`: it creates the directory (an error there, e.g. a path
under a file, under /proc or in a read-only directory, is one sentence before the model loads),
then takes an exclusive `flock` on `OUTPUT_DIR/.rrhf-fast.lock` before it deletes or writes
anything. A second run on the same directory is refused, naming the holder's pid; the OS drops the
lock when the holder exits, however it dies, so a crash never leaves a stale lock. Only then are
the leftovers of interrupted saves and rotations removed (checkpoint.remove_partial_saves). Under
torchrun rank 0 alone holds the lock (flock locks are per open file, so the ranks of one run
would refuse each other) and every rank raises the error it broadcasts, an unexpected one included
(rank 0 re-raises it, the others exit with one sentence naming it). A run that fails before it
wrote anything removes the directory it created (say, a data check that fails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rrhf_fast.checkpointing.checkpoint import latest_checkpoint, remove_partial_saves
from rrhf_fast.data.outputs import make_output_dir, remove_created
from rrhf_fast.errors import UserError
from rrhf_fast.parallel import distributed
from rrhf_fast.parallel.distributed import Dist
from rrhf_fast.reporting.plot import METRICS_FILE

LOCK_FILE = ".rrhf-fast.lock"


@dataclass
class RunDir:
    """A claimed output directory; `release()` when the run ends (the OS does it on a crash)."""

    path: Path
    created: list[Path] = field(default_factory=list)  # the directories this run made, outermost first
    fd: int | None = None

    def release(self) -> None:
        """Unlock; remove the directories this run created if it never wrote into them."""
        if self.created and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # before the unlock: never a lock on a lost file
            remove_created(self.created)
            self.created = []
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the pid goes with the lock: a run that changed nothing leaves
            os.close(self.fd)  # the directory byte for byte as it found it
            self.fd = None


def claim_output_dir(output_dir: str | os.PathLike, resume: bool, dist: Dist) -> RunDir:
    """Create and lock `output_dir` (rank 0), clean what interrupted saves left, and refuse a
    directory holding a checkpoint unless `resume`. Every rank gets the same error, if any."""
    run = RunDir(Path(output_dir))
    error, unexpected = None, None
    if dist.main:
        try:
            run.created = make_output_dir(output_dir)  # the flag as given: Path('') would be '.'
            run.fd = _lock(run.path)  # before anything in the directory is deleted or written
            remove_partial_saves(run.path)  # first: it puts back a checkpoint a crashed re-save had parked
        except UserError as err:
            error = str(err)
        except Exception as err:  # any other failure still reaches the broadcast: no rank waits forever
            unexpected = err
            error = f"--output-dir {run.path}: rank 0 failed while claiming it ({type(err).__name__}: {err})"
    error = distributed.broadcast(error)
    if error is not None:
        run.release()
        if unexpected is not None:
            raise unexpected  # rank 0 keeps its traceback; the other ranks exit with the sentence
        raise UserError(error)
    found = latest_checkpoint(run.path)
    if found is not None and not resume:
        run.release()
        raise UserError(
            f"--output-dir {run.path} already holds {found.name}; pass --resume to continue that run "
            "or choose a new --output-dir"
        )
    if dist.main and found is None and (run.path / METRICS_FILE).exists():
        (run.path / METRICS_FILE).unlink()  # a run that never reached a checkpoint starts again
    distributed.barrier()
    return run


def _lock(path: Path) -> int | None:
    """An exclusive flock on the directory's lock file, holding this process's pid."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per directory is then up to the user
        return None
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"--output-dir {path}: cannot write into it ({err.strerror or err}); "
                        "give a writable directory") from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"--output-dir {path} is in use by another rrhf-fast run (pid {holder}); wait for it to end "
            "or choose another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
