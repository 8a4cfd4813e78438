"""A damaged checkpoint is refused before it is trained on: `train --resume`, `merge` and a command
whose --model is a checkpoint exit 2 with one sentence naming the file or the parameter, no
traceback, and the run directory byte for byte as it was.

Two kinds of damage: bytes that differ from what was saved (the marker's hashes catch them,
integrity.py), and a consistent checkpoint (its marker rewritten to match, as a buggy or hostile
writer would leave it: training_runs.reseal) whose optimizer state or weights this run cannot
continue from (state_check.py): a parameter's state or fp32 master missing, a tensor of another
shape or dtype, NaN, a master that does not round to its weight. Each optimizer layout is covered:
torch AdamW, bitsandbytes' 8-bit AdamW, --offload-optimizer, a LoRA run, and the per-parameter
optimizers of --bf16-update and --optim-in-backward. FSDP2's sharded checkpoints: test_distributed.py.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import argv
from training_runs import config, reseal, tree_digest, write_data

from rrhf_fast.cli import main
from rrhf_fast.integrity import HASH, MARKER
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)

KINDS = {
    "adamw": dict(),
    "adamw8bit": dict(optim="adamw8bit"),
    "offload-bf16": dict(offload_optimizer=True, dtype="bfloat16"),
    "lora": dict(lora_r=4, lora_dropout=0.0),
    "kahan": dict(dtype="bfloat16", bf16_update="kahan"),  # paramwise.py's fp32 stand-ins
    "in-backward": dict(optim_in_backward=True, max_grad_norm=0.0),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kind -> (its config, a run directory holding checkpoint-2), trained once per module."""
    root = tmp_path_factory.mktemp("damage")
    model = save_tiny_model(root / "model", seed=0)
    data = write_data(root / "d.jsonl")
    made = {}

    def get(kind):
        if kind not in made:
            cfg = config(root, model, data, name=kind, max_steps=2, **KINDS[kind])
            train(cfg)
            made[kind] = cfg
        return made[kind]

    return get


def _copy(runs, kind, tmp_path):
    cfg = runs(kind)
    out = tmp_path / "run"
    shutil.copytree(cfg.output_dir, out)
    return dataclasses.replace(cfg, output_dir=str(out), max_steps=3, resume=True), out / "checkpoint-2"


def _refused(cfg, capsys, words):
    """`train --resume` on a damaged checkpoint: exit 2, one line naming it, nothing changed."""
    run = cfg.output_dir
    before = tree_digest(Path(run))
    capsys.readouterr()
    assert main(["train", *argv(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("rrhf-fast train: error: ") and "checkpoint-2" in err and words in err, err
    assert tree_digest(Path(run)) == before  # nothing trained, nothing written, nothing renamed
    return err


# -------------------------------------------------------------------------------------------------
# damage the hashes catch


def _flip(file, at=None):
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    file.write_bytes(bytes(data))


def _weights_file(ckpt):
    adapter = ckpt / "adapter_model.safetensors"
    return adapter if adapter.is_file() else ckpt / "model.safetensors"


FAST = ("adamw", "offload-bf16")  # the default suite; the other layouts are slow


def _kinds(fast=FAST):
    return [pytest.param(k, marks=() if k in fast else pytest.mark.slow) for k in KINDS]


@pytest.mark.parametrize("kind", _kinds(fast=("adamw", "lora")))
def test_one_flipped_byte_in_the_weights_is_refused_naming_the_file(tmp_path, runs, kind, capsys):
    cfg, ckpt = _copy(runs, kind, tmp_path)
    weights = _weights_file(ckpt)
    _flip(weights)
    _refused(cfg, capsys, f"{weights.name} differs from what was saved")


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.pt", "train_config.json"])
def test_one_flipped_byte_in_any_file_is_refused_naming_it(tmp_path, runs, name, capsys):
    cfg, ckpt = _copy(runs, "adamw", tmp_path)
    _flip(ckpt / name, at=-2 if name.endswith(".json") else None)  # a byte inside the JSON's last value
    _refused(cfg, capsys, f"{name} differs from what was saved")


def test_the_cli_prints_one_line_and_exits_2(tmp_path, runs):
    """The real process: its whole stderr is the one sentence (no library chatter, no traceback)."""
    cfg, ckpt = _copy(runs, "adamw8bit", tmp_path)
    _flip(ckpt / "model.safetensors")
    before = tree_digest(ckpt.parent)
    proc = subprocess.run([sys.executable, "-m", "rrhf_fast.cli", "train", *argv(cfg)], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors differs from what was saved" in lines[0], proc.stderr
    assert tree_digest(ckpt.parent) == before


def test_a_checkpoint_without_hashes_still_resumes_after_one_note(tmp_path, runs, caplog):
    cfg, ckpt = _copy(runs, "adamw", tmp_path)
    marker = json.loads((ckpt / MARKER).read_text())
    del marker[HASH]  # as an rrhf-fast before hashes wrote it
    (ckpt / MARKER).write_text(json.dumps(marker))
    with caplog.at_level("WARNING"):
        assert train(cfg).step == 3
    notes = [r.getMessage() for r in caplog.records if "without content hashes" in r.getMessage()]
    assert len(notes) == 1 and str(ckpt) in notes[0]


def test_a_marker_hash_of_another_content_names_the_file(tmp_path, runs, capsys):
    """The marker is the trusted side: a hash changed in it is the same refusal as a changed file."""
    cfg, ckpt = _copy(runs, "adamw", tmp_path)
    marker = json.loads((ckpt / MARKER).read_text())
    marker[HASH]["config.json"] = "0" * 64
    (ckpt / MARKER).write_text(json.dumps(marker))
    _refused(cfg, capsys, "config.json differs from what was saved")


def test_merge_and_a_checkpoint_as_model_verify_first(tmp_path, runs, capsys):
    cfg, ckpt = _copy(runs, "lora", tmp_path)
    _flip(ckpt / "adapter_model.safetensors")
    assert main(["merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rrhf-fast merge: error: --checkpoint {ckpt}: adapter_model.safetensors differs from "
                   "what was saved (its sha256 is not the one COMPLETE.json recorded: damaged on disk or "
                   "modified since); delete this checkpoint to resume from the one before, or restore the "
                   "file")  # fmt: skip
    assert not (tmp_path / "merged").exists()

    full_cfg, full = _copy(runs, "adamw", tmp_path / "full")
    _flip(full / "model.safetensors")
    out = tmp_path / "ref.jsonl"
    code = main(
        ["ref-logps", "--model", str(full), "--in", full_cfg.data, "--out", str(out), "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--model {full}: model.safetensors differs from what was saved" in err
    assert not out.exists()


# -------------------------------------------------------------------------------------------------
# consistent checkpoints (marker rewritten to match) whose state this run cannot continue from


def _edit_optimizer(ckpt, edit):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    edit(state)
    torch.save(state, ckpt / "optimizer.pt")
    reseal(ckpt)


def _first(state):
    """The first parameter's saved state, and the dict its tensors are in (bitsandbytes nests them)."""
    entry = state["state"][min(state["state"])]
    return entry, entry.get("__bnb_optimizer_quant_state__", entry)


def _moment(kind):
    return "state1" if kind == "adamw8bit" else "exp_avg"


def _drop_state(kind):
    return lambda s: s["state"].pop(min(s["state"]))


def _nan(kind):
    """NaN in the first parameter's first moment (8-bit: in its block scale; its codes are uint8)."""
    key = "absmax1" if kind == "adamw8bit" else "exp_avg"
    return lambda s: _first(s)[1][key].view(-1)[:1].fill_(float("nan"))


def _shape(kind):
    def edit(s):
        tensors = _first(s)[1]
        tensors[_moment(kind)] = tensors[_moment(kind)][..., :-1].clone()

    return edit


def _float64(kind):
    def edit(s):
        tensors = _first(s)[1]
        tensors[_moment(kind)] = tensors[_moment(kind)].double()

    return edit


DAMAGE = {  # name: (edit of optimizer.pt for a kind, words of the error)
    "state-removed": (_drop_state, "the optimizer state has no entry for"),
    "nan-in-a-moment": (_nan, "NaN or inf value(s) in"),
    "moment-of-another-shape": (_shape, "of shape"),
    "moment-in-float64": (_float64, "in float64, the optimizer keeps it in"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", _kinds())
def test_a_damaged_optimizer_state_is_refused_naming_the_parameter(tmp_path, runs, kind, damage, capsys):
    cfg, ckpt = _copy(runs, kind, tmp_path)
    edit, words = DAMAGE[damage]
    _edit_optimizer(ckpt, edit(kind))
    first = "lora_A" if kind == "lora" else "model.embed_tokens.weight"  # the first parameter saved
    assert first in _refused(cfg, capsys, words)


def test_the_sentence_names_the_parameter_and_what_to_do(tmp_path, runs, capsys):
    cfg, ckpt = _copy(runs, "adamw", tmp_path)
    _edit_optimizer(ckpt, _nan("adamw"))
    assert main(["train", *argv(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rrhf-fast train: error: {ckpt}: the optimizer state of model.embed_tokens.weight has 1 "
                   "NaN or inf value(s) in exp_avg, which no saved step leaves there; delete this checkpoint "
                   "to resume from the one before")  # fmt: skip
    assert "lower --lr" not in err


OFFLOAD = {
    "master-removed": (
        lambda s: [e.pop("offload_master") for e in s["state"].values()],
        "lacks offload_master",
    ),
    "master-in-float64": (
        lambda s: _first(s)[0].update(offload_master=_first(s)[0]["offload_master"].double()),
        "has offload_master in float64",
    ),
    "master-of-another-step": (
        lambda s: _first(s)[0]["offload_master"].mul_(1.5),
        "has an fp32 master that does not round to the saved weight",
    ),
}


@pytest.mark.parametrize("damage", list(OFFLOAD))
def test_an_offloaded_master_that_is_missing_or_wrong_is_refused(tmp_path, runs, damage, capsys):
    cfg, ckpt = _copy(runs, "offload-bf16", tmp_path)
    edit, words = OFFLOAD[damage]
    _edit_optimizer(ckpt, edit)
    _refused(cfg, capsys, words)


def test_8bit_state_without_its_quantisation_map_is_refused(tmp_path, runs, capsys):
    cfg, ckpt = _copy(runs, "adamw8bit", tmp_path)
    _edit_optimizer(ckpt, lambda s: _first(s)[1].pop("qmap2"))
    _refused(cfg, capsys, "in its 8-bit state, where bitsandbytes keeps absmax1, absmax2, qmap1, qmap2")


def test_a_state_of_another_optimizer_is_refused_naming_both(tmp_path, runs, capsys):
    """An adamw8bit checkpoint resumed with --optim adamw: not a traceback at the first step."""
    cfg, ckpt = _copy(runs, "adamw8bit", tmp_path)
    _refused(
        dataclasses.replace(cfg, optim="adamw"), capsys, "where --optim adamw keeps exp_avg, exp_avg_sq, step"
    )


@pytest.mark.parametrize("kind", _kinds(fast=("adamw",)))
def test_nan_in_the_weights_of_a_consistent_checkpoint_is_refused(tmp_path, runs, kind, capsys):
    cfg, ckpt = _copy(runs, kind, tmp_path)
    file = _weights_file(ckpt)
    weights = load_file(file)
    name = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, file, metadata={"format": "pt"})
    reseal(ckpt)
    _refused(cfg, capsys, f"the weights hold NaN or inf ({name})")


@pytest.mark.parametrize("kind", _kinds())
def test_every_layout_resumes_when_nothing_is_damaged(tmp_path, runs, kind):
    """The checks refuse damage only: each layout's own checkpoint resumes."""
    cfg, _ = _copy(runs, kind, tmp_path)
    assert train(cfg).step == 3
