"""checkpointing.checkpoint: atomic, rotated, verified checkpoints that never unpickle arbitrary objects."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from training_runs import reseal

import rrhf_fast.checkpointing.checkpoint as ckpt
from rrhf_fast.checkpointing.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_trainer_state,
    remove_partial_saves,
    save_checkpoint,
)
from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer
from rrhf_fast.optimizers.optim import build_optimizer


def _setup(seed=0, tie=False, optim="adamw"):
    model = build_tiny_model("llama", seed=seed, tie_word_embeddings=tie).train()
    opt = build_optimizer(model.named_parameters(), optim, lr=1e-2)
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(out, step, model, opt, keep=None, **state):
    config = TrainConfig(model="m", data="d", output_dir=str(out))
    return save_checkpoint(out, step, model=model, tokenizer=build_tokenizer(), optimizer=opt,
                           trainer_state={"epoch": 0, **state}, config=config, keep=keep)  # fmt: skip


def load_checkpoint(path, *, model, optimizer):
    """What `rrhf-fast train --resume` runs, in its order: the verified trainer state
    (setup.plan_schedule), the weights (train._train, before any wrapping), then the optimizer and
    RNGs (setup.resume); returns the trainer state."""
    read_trainer_state(path)
    load_weights(model, path)
    return load_training_state(path, model=model, optimizer=optimizer)


def _equal_models(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_restores_weights_optimizer_and_rngs(tmp_path, optim, tie):
    model, opt = _setup(tie=tie, optim=optim)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = _save(tmp_path, 7, model, opt, position=5)
    expected = (random.random(), np.random.rand(), torch.rand(1))

    other, other_opt = _setup(seed=1, tie=tie, optim=optim)
    assert not _equal_models(model, other)
    state = load_checkpoint(path, model=other, optimizer=other_opt)
    assert state["step"] == 7 and state["position"] == 5
    assert _equal_models(model, other)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert str(other_opt.state_dict()) == str(opt.state_dict())
    # a save_pretrained directory: transformers loads it as it is
    from transformers import AutoModelForCausalLM

    assert _equal_models(model, AutoModelForCausalLM.from_pretrained(path))


def test_rotation_keeps_the_newest(tmp_path):
    model, opt = _setup()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert latest_checkpoint(tmp_path / "absent") is None


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["crash", "ctrl-c"])
def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, error):
    model, opt = _setup()
    _save(tmp_path, 1, model, opt)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # the weights are written; fail at the optimizer
        real_save(obj, f, *args, **kwargs)
        raise error

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(type(error)):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # no half-written directory left
    other, other_opt = _setup(seed=1)
    assert load_checkpoint(latest_checkpoint(tmp_path), model=other, optimizer=other_opt)["step"] == 1
    assert _equal_models(model, other)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 760989056 vs 760988944"),
            id="torch-zip-writer-enospc",
        ),  # what torch.save raised on a full disk (make demo-real)
        pytest.param(OSError(28, "No space left on device"), id="oserror-enospc"),
    ],
)
def test_a_full_disk_is_one_sentence_and_the_last_checkpoint_stays(tmp_path, monkeypatch, error):
    model, opt = _setup()
    _save(tmp_path, 1, model, opt)

    def full_disk(obj, f, *args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(UserError) as caught:
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    message = str(caught.value)
    assert "could not write checkpoint-2" in message and "no space left on the device" in message
    assert f"{tmp_path / 'checkpoint-1'} is intact" in message and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_partial_directory_is_ignored_and_cleaned(tmp_path):
    model, opt = _setup()
    _save(tmp_path, 1, model, opt)
    partial = tmp_path / "checkpoint-2"  # a checkpoint's files without its marker: a killed delete
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    foreign = tmp_path / "checkpoint-5"  # a Hugging Face Trainer checkpoint: not ours, kept
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-3-abc").mkdir()
    (tmp_path / ".deleting-checkpoint-0").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    removed = [p.name for p in remove_partial_saves(tmp_path)]
    assert removed == [".deleting-checkpoint-0", ".tmp-checkpoint-3-abc", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-5"]


@pytest.mark.parametrize("kill_after", [0, 1, 3, 4, 6, 9])
def test_a_rotation_killed_anywhere_leaves_no_orphan_at_the_next_start(tmp_path, monkeypatch, kill_after):
    """rmtree deletes the marker 4th of 11 files; the kill comes after `kill_after` deletions
    (0: between the rename aside and the delete)."""
    model, opt = _setup()
    _save(tmp_path, 1, model, opt, keep=1)
    real_unlink, done = ckpt.os.unlink, []

    def unlink(path, *args, **kwargs):
        if len(done) == kill_after:
            raise KeyboardInterrupt  # stands for the kill: nothing after it runs
        done.append(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda p, ignore_errors=False: _rmtree(p, unlink))
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, keep=1)
    monkeypatch.undo()
    remove_partial_saves(tmp_path)  # the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert load_checkpoint(tmp_path / "checkpoint-2", model=model, optimizer=opt)["step"] == 2


def _rmtree(path, unlink):
    """shutil.rmtree with every file deletion through `unlink`, in the order os.scandir gives."""
    import os

    if not os.path.exists(path):
        return
    for entry in sorted(os.scandir(path), key=lambda e: e.is_dir()):
        if entry.is_dir(follow_symlinks=False):
            _rmtree(entry.path, unlink)
        else:
            unlink(entry.path)
    os.rmdir(path)


def test_a_file_deleted_during_a_save_is_never_marked_complete(tmp_path, monkeypatch):
    """What a second run's cleanup did to a save in progress: the marker listed what was left."""
    model, opt = _setup()
    real = model.save_pretrained

    def save_then_lose_weights(directory, **kwargs):
        real(directory, **kwargs)
        (directory / "model.safetensors").unlink()

    monkeypatch.setattr(model, "save_pretrained", save_then_lose_weights)
    with pytest.raises(UserError, match="model.safetensors vanished while the checkpoint was written"):
        _save(tmp_path, 1, model, opt)
    assert list(tmp_path.iterdir()) == []


def test_a_marker_without_a_required_file_is_refused(tmp_path):
    model, opt = _setup()
    path = _save(tmp_path, 1, model, opt)
    (path / "model.safetensors").unlink()
    marker = json.loads((path / "COMPLETE.json").read_text())
    del marker["files"]["model.safetensors"], marker["required"]  # as an older rrhf-fast wrote it
    (path / "COMPLETE.json").write_text(json.dumps(marker))
    with pytest.raises(UserError, match="lacks model.safetensors, which every checkpoint holds"):
        load_checkpoint(path, model=model, optimizer=opt)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_directories_follow_the_umask(tmp_path, umask):
    import os

    model, opt = _setup()
    old = os.umask(umask)
    try:
        path = _save(tmp_path, 1, model, opt)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes them, not mkdtemp's 0700


def test_truncated_file_is_one_clear_error(tmp_path):
    model, opt = _setup()
    path = _save(tmp_path, 1, model, opt)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"model.safetensors is 100 bytes, expected \d+ bytes \(truncated"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_foreign_marker_is_one_clear_error(tmp_path):
    model, opt = _setup()
    path = _save(tmp_path, 1, model, opt)
    (path / "COMPLETE.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not an rrhf-fast checkpoint"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    model, opt = _setup()
    path = _save(tmp_path, 1, model, opt)
    wider = build_tiny_model("llama", hidden_size=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(UserError):
        load_checkpoint(path, model=wider, optimizer=build_optimizer(wider.named_parameters(), "adamw", lr=1))


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/rrhf_fast_pwned", "w"))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    model, opt = _setup()
    path = _save(tmp_path, 1, model, opt)
    target = path / "trainer_state.pt"
    torch.save({"step": 1, "evil": _Payload()}, target, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    reseal(path)  # a consistent, hostile checkpoint: its marker matches the pickle's size and hash
    import os

    if os.path.exists("/tmp/rrhf_fast_pwned"):
        os.remove("/tmp/rrhf_fast_pwned")
    with pytest.raises(UserError, match="refused: it holds pickled objects") as info:
        load_checkpoint(path, model=model, optimizer=opt)
    assert not os.path.exists("/tmp/rrhf_fast_pwned")
    message = str(info.value)  # what was refused, why, and no advice to turn the protection off
    assert "would run the code they name" in message and "weights_only" not in message
