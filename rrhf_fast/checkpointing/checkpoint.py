"""Checkpoints that survive crashes and resume a run bit for bit.

A checkpoint is `OUTPUT_DIR/checkpoint-STEP/`: a `save_pretrained` directory (safetensors weights,
model config, tokenizer; a LoRA run: the peft adapter) plus `optimizer.pt` (8-bit states included),
`trainer_state.pt` (step, scheduler, data order and fingerprint, counters, every RNG),
`train_config.json` (the flags), `run.json` (what they resolved to, library versions, the GPU) and
`README.md` (a Hugging Face model card, reporting/model_card.py).
Under torchrun, ranks other than 0 add `rng-rankN.pt`, and an FSDP2 run keeps its optimizer as
torch.distributed.checkpoint shards in `optimizer/` (resharded on load, so a run resumes on another
world size; its weights are saved whole, loadable by from_pretrained). It is written into a
temporary directory beside it, every file hashed (SHA-256, from the page cache) and fsynced, a
`COMPLETE.json` marker (the size and hash of every file, and the files every checkpoint of this run
must hold: a checkpoint lacking one is never complete) written last, and only then renamed into
place: a crash or Ctrl-C
at any moment leaves the previous checkpoints untouched and at worst a `.tmp-*` directory, removed
at the next start. A re-save of an existing step parks the old copy as `.parked-checkpoint-STEP`
for the moment between two renames; the next start puts it back if the new copy never arrived.
Rotation (and any other delete of a checkpoint) first renames it to `.deleting-checkpoint-STEP`, so
a kill during the delete never leaves a part of a checkpoint under a checkpoint's name. Loading
never unpickles arbitrary objects: safetensors for the weights, `torch.load(weights_only=True)`
for the rest, and an FSDP2 run's sharded optimizer through safe_dcp (JSON metadata, not DCP's
pickle). Before anything is read, every file is checked against the marker (integrity.py), and
before the first step the optimizer state against the model and --optim (state_check.py).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rrhf_fast.checkpointing.provenance import RUN_FILE, write_run_info
from rrhf_fast.checkpointing.state_check import (
    STATELESS_KEY,
    check_loaded_state,
    check_saved_state,
    stateless_positions,
)
from rrhf_fast.errors import UserError
from rrhf_fast.integrity import (
    FORMAT,
    HASH,
    MARKER,
    VERSION,
    read_marker,
    seal_files,
    verify_contents,
)
from rrhf_fast.models.loading import quiet_progress_bars
from rrhf_fast.parallel import distributed
from rrhf_fast.parallel.distributed import Dist

OPTIMIZER_FILE = "optimizer.pt"
OPTIMIZER_DIR = "optimizer"  # FSDP2: torch.distributed.checkpoint shards, one file per rank
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
ADAPTER_CONFIG = "adapter_config.json"
CARD_FILE = "README.md"  # the Hugging Face model card
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_PARKED_PREFIX = ".parked-"  # + checkpoint-STEP; must not match _TMP_PREFIX: it may be the only copy
_DELETING_PREFIX = ".deleting-"  # + a directory being deleted (rotation, a replaced parked copy)
# What a checkpoint directory may hold (save_pretrained's files, the tokenizer's, ours): a
# `checkpoint-N` without a marker is removed at start only if it holds nothing else, so that, e.g.,
# a Hugging Face Trainer checkpoint (trainer_state.json, scheduler.pt) is never deleted.
_OWN_FILES = re.compile(
    r"^(COMPLETE\.json|trainer_state\.pt|train_config\.json|run\.json|optimizer\.pt|rng-rank\d+\.pt|"
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
    r"adapter_config\.json|adapter_model\.safetensors|README\.md|tokenizer(_config)?\.json|"
    r"special_tokens_map\.json|chat_template\.(jinja|json)|vocab\.json|merges\.txt|tokenizer\.model|"
    r"added_tokens\.json|optimizer/.*)$"
)


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config: Any,
    keep: int | None = None,
    dist: Dist | None = None,
    sharded: bool = False,
    run_info: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write checkpoint-STEP atomically, then delete all but the `keep` newest complete ones.

    Under torchrun every rank calls this: rank 0 writes the weights (FSDP2: gathered whole), the
    optimizer (FSDP2, `sharded`: each rank its shard, torch.distributed.checkpoint) and the trainer
    state; every other rank its RNG state. Rank 0 renames the directory once all have written.
    `run_info` (JSON-able: the run's resolved settings) is written as run.json, `card` (the model
    card, reporting/model_card.py) as README.md, which from_pretrained and resume ignore.
    """
    dist = dist or Dist()
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    made = _make_tmp_dir(output_dir, step) if dist.main else None
    tmp = Path(distributed.broadcast(made))
    try:
        _write_parts(tmp, step, model, tokenizer, optimizer, trainer_state, config, dist, sharded)
        if dist.main and run_info is not None:
            write_run_info(tmp / RUN_FILE, run_info)
        if dist.main and card is not None:  # replaces the card peft's save_pretrained writes
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        distributed.barrier()  # every rank's files are written
        if dist.main:
            _write_marker(tmp, step, _required_files(tmp, dist.world, sharded, run_info is not None))
            _fsync_dirs(tmp)
            _replace_dir(tmp, final)
            _fsync_dir(output_dir)
    except BaseException as err:
        if dist.main:  # the directory is shared; a failed save is removed once (or at the next start)
            shutil.rmtree(tmp, ignore_errors=True)
        if _write_failed(err):
            raise _save_error(output_dir, step, err) from err
        raise
    distributed.barrier()  # no rank reads or rotates checkpoints before this one is in place
    if keep is not None and dist.main:
        for old in complete_checkpoints(output_dir)[:-keep]:
            _remove_dir(old)
    return final


def _make_tmp_dir(output_dir: Path, step: int) -> str:
    """mkdtemp's directory (mode 0700), opened up to what the umask allows, as mkdir would make it:
    the checkpoint's files follow the umask, and a team sharing the output directory reads both."""
    made = tempfile.mkdtemp(dir=output_dir, prefix=f"{_TMP_PREFIX}{step}-")
    os.chmod(made, 0o777 & ~_umask())
    return made


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving a part of it under its own name: renamed
    aside first (atomic), the rest deleted; a kill during the delete leaves a `.deleting-*`
    directory that the next start removes (remove_partial_saves)."""
    aside = path.with_name(f"{_DELETING_PREFIX}{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    _fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


class NonFiniteWeights(UserError):
    """Weights holding NaN or inf: never saved as a checkpoint."""


def check_finite_weights(model: torch.nn.Module, step: int, device: torch.device, last: Path | None) -> None:
    """Refuse to save weights that hold NaN or inf. (A finite step can also overflow the model: --lr
    1e30 leaves finite weights near 1e30 whose logits are inf; the training loop never saves after
    such a skipped step, and names the checkpoint from before it: train._diverged.) Under torchrun
    every rank calls it (each counts its own FSDP2 shards)."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not _local(p).isfinite().all()]
    total = int(distributed.sum_over_ranks([float(len(bad))], device)[0])
    where = f"the last complete checkpoint is {last}" if last else "no checkpoint was saved"
    if total:
        example = bad[0] if bad else "on another rank"
        raise NonFiniteWeights(
            f"the weights hold NaN or inf after step {step} ({total} tensor(s), e.g. {example}); they were "
            f"not saved; lower --lr and start again; {where}"
        )


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param  # FSDP2: this rank's shard


# How the writers report a full or failing disk: OSError from plain writes, torch.save's zip writer
# as "unexpected pos N vs M" (measured: ENOSPC during make demo-real), safetensors as "I/O error".
_WRITE_FAILURES = ("No space left", "unexpected pos", "I/O error", "file write failed")


def _write_failed(err: BaseException) -> bool:
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError | SafetensorError) and any(m in str(err) for m in _WRITE_FAILURES)
    )


def _save_error(output_dir: Path, step: int, err: BaseException) -> UserError:
    """One sentence for a save the disk refused; the half-written directory is already removed."""
    last = latest_checkpoint(output_dir)
    kept = (
        f"{last} is intact: free space and resume with --resume" if last else "no earlier checkpoint exists"
    )
    reason = (
        "no space left on the device"
        if "No space left" in str(err) or "unexpected pos" in str(err)
        else (str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    )
    return UserError(f"could not write checkpoint-{step} in {output_dir} ({reason}); {kept}")


def _write_parts(tmp, step, model, tokenizer, optimizer, trainer_state, config, dist: Dist, sharded: bool):
    weights = distributed.gather_weights(model, dist) if sharded else None  # collective
    if dist.main:
        with quiet_progress_bars():
            model.save_pretrained(tmp, **({"state_dict": weights} if sharded else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save({**trainer_state, "step": step, "rng": rng_state(), "world_size": dist.world,
                    "sharded": sharded, STATELESS_KEY: stateless_positions(optimizer)},
                   tmp / STATE_FILE)  # fmt: skip
        config.save(tmp / CONFIG_FILE)
    else:
        torch.save(rng_state(), tmp / _rng_file(dist.rank))
    if sharded:
        distributed.save_sharded_optimizer(model, optimizer, tmp / OPTIMIZER_DIR)  # collective


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints with a marker (written last), oldest first."""
    found = []
    root = Path(output_dir)
    if not root.is_dir():
        return []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def remove_partial_saves(output_dir: str | os.PathLike) -> list[Path]:
    """What interrupted saves and rotations left, deleted (returned): `.tmp-*` saves, `.deleting-*`
    directories, and `checkpoint-N` directories without a marker that hold only files a checkpoint
    holds; a copy a re-save parked is put back where its checkpoint never arrived, else deleted.
    Run under the output directory's lock only (rundir.claim_output_dir): another run's save in
    progress looks the same."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    for parked in sorted(root.glob(f"{_PARKED_PREFIX}checkpoint-*")):
        final = root / parked.name.removeprefix(_PARKED_PREFIX)
        if (parked / MARKER).is_file() and not (final / MARKER).is_file():
            if final.exists():
                _remove_dir(final)
            os.rename(parked, final)
        else:
            _remove_dir(parked)
    stale = [p for p in root.iterdir() if p.is_dir() and _is_leftover(p)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(stale)


def _is_leftover(path: Path) -> bool:
    if path.name.startswith((_TMP_PREFIX, _DELETING_PREFIX)):
        return True
    if not _NAME.match(path.name) or (path / MARKER).is_file():
        return False
    return all(_OWN_FILES.match(str(f.relative_to(path))) for f in path.rglob("*") if not f.is_dir())


# ----------------------------------------------------------------------------------------------
# Loading


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The verified checkpoint's trainer state (step, schedule, data fingerprint, ...), restoring
    nothing: what a resumed run checks before it loads the model. `train --resume` then runs
    `load_weights` (before DDP / FSDP2 wrap the model) and `load_training_state` (once the optimizer
    holds the wrapped parameters)."""
    path = Path(path)
    verify_checkpoint(path)
    return _read_state(path)


def _read_state(path: Path) -> dict[str, Any]:
    state = _torch_load(path / STATE_FILE)
    if not isinstance(state, dict) or "step" not in state or "rng" not in state:
        raise UserError(f"{path / STATE_FILE}: not an rrhf-fast trainer state; delete the checkpoint")
    return state


def load_training_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dist: Dist | None = None,
    sharded: bool = False,
    optim: str = "",
) -> dict[str, Any]:
    """Everything but the weights: optimizer (FSDP2 `sharded`: resharded to this world size), this
    rank's RNGs (a rank the saving run did not have takes rank 0's); returns the trainer state.
    The checkpoint is verified (hashes) and its optimizer state checked against the model and
    --optim `optim` before it is loaded (state_check.py): a damaged one is a UserError, and then
    nothing of this run has changed but the optimizer's own state."""
    dist = dist or Dist()
    verify_checkpoint(path)
    state = _read_state(path)
    if state.get("sharded", False) != sharded:
        was, now = ("with", "without") if state.get("sharded") else ("without", "with")
        raise UserError(f"{path}: written by a run {was} --fsdp, resumed {now} it; resume with the flags of "
                        "that run")  # fmt: skip
    if sharded:
        distributed.load_sharded_optimizer(model, optimizer, path / OPTIMIZER_DIR)
    else:
        _load_optimizer(path, optimizer, model, optim, state.get(STATELESS_KEY))
    check_loaded_state(optimizer, model, path, sharded)
    own = path / _rng_file(dist.rank)
    set_rng_state(_torch_load(own) if dist.rank > 0 and own.is_file() else state["rng"])
    return state


def _load_optimizer(
    path: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module, optim: str, stateless: Any
) -> None:
    opt_state = _torch_load(path / OPTIMIZER_FILE)
    check_saved_state(opt_state, optimizer, model, path, optim or "of this run", stateless)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"{path}: the optimizer state does not fit this model and --optim ({err}); resume with the "
            "flags of the run that wrote it"
        ) from None


def verify_checkpoint(path: Path, flag: str = "") -> dict[str, Any]:
    """Check the marker, every file's size and content hash (integrity.py): a truncated, damaged or
    foreign checkpoint is a UserError naming the file. `flag` ("--checkpoint ") precedes the path."""
    marker = read_marker(path)
    files = marker.get("files", {})
    missing = [name for name in _minimum(files) + list(marker.get("required", [])) if name not in files]
    if missing:
        raise UserError(
            f"{flag}{path}: lacks {missing[0]}, which every checkpoint holds (an incomplete save marked "
            "complete); delete this checkpoint to resume from the one before"
        )
    verify_contents(path, marker, flag)
    return marker


def _minimum(files: dict[str, int]) -> list[str]:
    """What any checkpoint holds, whatever its marker lists (one written before markers listed their
    required files included): the trainer state, the flags, weights and the optimizer."""
    needed = [STATE_FILE, CONFIG_FILE]
    if not any(name.endswith(".safetensors") for name in files):
        needed.append("model.safetensors")
    if OPTIMIZER_FILE not in files and not any(name.startswith(f"{OPTIMIZER_DIR}/") for name in files):
        needed.append(OPTIMIZER_FILE)
    return needed


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the safetensors weights of a save_pretrained directory into `model` (a LoRA run: the adapter)."""
    if (path / MARKER).is_file():
        verify_checkpoint(path)  # once per process and unchanged files (integrity.py)
    adapter = (path / ADAPTER_CONFIG).is_file()
    if adapter != hasattr(model, "peft_config"):
        saved, wanted = ("a LoRA adapter", "the full model") if adapter else ("full weights", "LoRA adapters")
        raise UserError(
            f"{path}: holds {saved} but this run trains {wanted}; resume with the --lora-r of that run"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors weights; not an rrhf-fast checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: unreadable weights ({err}); delete this checkpoint") from None
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # an adapter's file: all of it
    bad = next((k for k, v in state.items() if (adapter or k in trained) and v.is_floating_point()
                and not v.isfinite().all()), None)  # fmt: skip
    if bad is not None:  # never saved so (check_finite_weights): written elsewhere or damaged
        raise UserError(f"{path}: the weights hold NaN or inf ({bad}); a run never saves such weights, "
                        "so the checkpoint is damaged: delete it to resume from the one before")  # fmt: skip
    if adapter:
        _load_adapter(model, path, state)
        return
    own = model.state_dict()
    _check_shapes(path, state, own)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(
            f"{path}: the weights do not match this model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); resume with the --model of that run"
        )


def _load_adapter(model: Any, path: Path, state: dict[str, torch.Tensor]) -> None:
    """The adapter weights as peft saves them (adapter name dropped from the keys), exactly."""
    from rrhf_fast.models.loading import import_peft

    peft = import_peft()
    own = peft.get_peft_model_state_dict(model)
    _check_shapes(path, state, own)
    if set(state) != set(own):
        odd = sorted(set(state) ^ set(own))
        raise UserError(
            f"{path}: the adapter does not match this model ({len(odd)} differing names, e.g. {odd[:2]}); "
            "resume with the --model, --lora-r and --lora-target-modules of that run"
        )
    peft.set_peft_model_state_dict(model, state)


def _check_shapes(path: Path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(
            f"{path}: the weights do not match this model ({wrong[0]} is {tuple(state[wrong[0]].shape)}, the "
            f"model's is {tuple(own[wrong[0]].shape)}); resume with the flags of that run"
        )


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters sharing their tensor with another name (save_pretrained keeps one)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {name for names in by_tensor.values() if len(names) > 1 for name in names}


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{file}: missing; the checkpoint is incomplete, delete it") from None
    except pickle.UnpicklingError:
        # torch's own message goes on to advise weights_only=False: that is the protection turned off.
        raise UserError(
            f"{file}: refused: it holds pickled objects other than tensors and plain values, and loading "
            "it would run the code they name (rrhf-fast never writes such a file, so it was altered or "
            "comes from elsewhere); delete this checkpoint"
        ) from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad input
        raise UserError(
            f"{file}: cannot be read safely ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "delete this checkpoint"
        ) from None


# ----------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch, cuda) as plain tensors and tuples: weights_only-loadable


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Durable writes


def _required_files(directory: Path, world: int, sharded: bool, run_info: bool) -> list[str]:
    """The files checkpoint `directory` must hold, known before looking at what it holds (a file
    deleted under a save is then missing, never left out of the marker)."""
    required = [STATE_FILE, CONFIG_FILE, *(_rng_file(r) for r in range(1, world))]
    required += [RUN_FILE] if run_info else []
    if (directory / ADAPTER_CONFIG).is_file():
        required += [ADAPTER_CONFIG, "adapter_model.safetensors"]
    else:
        required += ["config.json"]
        index = directory / "model.safetensors.index.json"  # weights save_pretrained split in shards
        if index.is_file():
            shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
            required += [index.name, *sorted(set(shards))]
        else:
            required += ["model.safetensors"]
    if sharded:
        from rrhf_fast.parallel.safe_dcp import METADATA_JSON, shard_files

        required += [f"{OPTIMIZER_DIR}/{METADATA_JSON}"]
        required += [f"{OPTIMIZER_DIR}/{name}" for name in shard_files(directory / OPTIMIZER_DIR)]
    else:
        required += [OPTIMIZER_FILE]
    return required


def _write_marker(directory: Path, step: int, required: list[str]) -> None:
    """The marker: every file's size and content hash (each file hashed and fsynced in one open,
    right after it was written: integrity.seal_files), written last and fsynced."""
    files, hashes = seal_files(directory)
    missing = [name for name in required if name not in files]
    if missing:
        raise UserError(
            f"{directory}: {missing[0]} vanished while the checkpoint was written (is another program "
            "deleting files in this --output-dir?); the checkpoint was not completed"
        )
    marker = {"format": FORMAT, "version": VERSION, "step": step, "files": files, "required": required,
              HASH: hashes}  # fmt: skip
    with open(directory / MARKER, "w", encoding="utf-8") as f:
        f.write(json.dumps(marker, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dirs(directory: Path) -> None:
    """fsync every directory of the tree, innermost first (the files were, by _write_marker)."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir():
            _fsync_dir(path)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final (a re-save of the same step) is swapped out first."""
    if not final.exists():
        os.rename(tmp, final)
        return
    # Between the two renames the parked copy is the only complete one: remove_partial_saves
    # puts it back after a crash there, and never deletes it as a partial save.
    parked = final.with_name(f"{_PARKED_PREFIX}{final.name}")
    if parked.exists():
        _remove_dir(parked)
    os.rename(final, parked)
    _fsync_dir(final.parent)
    os.rename(tmp, final)
    _remove_dir(parked)
