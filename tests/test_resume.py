"""Resume safety and run provenance: other data refused, the checkpoint's learning-rate schedule kept
unless asked, parked re-saves put back, run.json, errors that name the record, the pure-bf16 warning
and the per-rank dropout seed (checkpointing.resume, checkpointing.provenance, checkpointing.checkpoint)."""

import copy
import json
import logging
import os
import re
import shutil

import pytest
import torch
import transformers
from training_runs import config, metrics, write_data

import rrhf_fast.objectives.base as objective_base
import rrhf_fast.parallel.distributed as distributed
from rrhf_fast.checkpointing.checkpoint import (
    CONFIG_FILE,
    latest_checkpoint,
    read_trainer_state,
    remove_partial_saves,
    save_checkpoint,
    verify_checkpoint,
)
from rrhf_fast.checkpointing.resume import data_fingerprint
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import TokenizedExample, tokenize_example
from rrhf_fast.data.records import load_examples, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.attention import resolve_backend
from rrhf_fast.models.loading import load_model, load_tokenizer
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer, save_tiny_model
from rrhf_fast.optimizers.optim import build_optimizer, default_warmup, lr_at
from rrhf_fast.step.steps import epoch_order
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=32, layers=1)


def resumed(cfg, **overrides):
    return TrainConfig(**{**cfg.to_dict(), "resume": True, **overrides})


def write_jsonl(path, records):
    """One JSON record per line; None writes a blank line (line numbers still count it)."""
    lines = ["" if r is None else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(query, responses=("12", "21"), scores=(1.0, 0.0)):
    return {"query": query, "responses": list(responses), "scores": list(scores)}


# -------------------------------------------------------------------------------------------------
# the data fingerprint: a resumed run must continue on the data it was trained on


def _rescored(data, path):
    examples = load_examples(data)
    examples[2].scores = [0.0, 0.5, 1.0]  # same tokens, same lengths: only the hash can tell
    write_examples(path, examples)
    return path


@pytest.mark.parametrize("other", ["other-queries", "one-query-rescored"])
def test_resume_on_other_data_is_refused(tmp_path, model_dir, other):
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    train(cfg)
    moved = tmp_path / "other.jsonl"
    moved = write_data(moved, 4, seed=1) if other == "other-queries" else _rescored(data, moved)
    start = re.escape(f"--data {moved} is not the data {tmp_path / 'run' / 'checkpoint-1'} was trained on")
    with pytest.raises(UserError, match=f"^{start}"):
        train(resumed(cfg, data=str(moved), max_steps=2))
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint-1"  # refused before any step
    assert train(resumed(cfg, max_steps=2)).step == 2  # the run's own data resumes


A = ([256, 1, 2], [[3, 4, 257], [5, 257]], [1.0, 0.0])  # (prompt, responses, scores)
B = ([256, 7], [[8, 257], [9, 9, 257]], [0.5, 0.25])
CHANGED = {
    "score": [A, (B[0], B[1], [0.5, 0.3])],
    "token": [A, (B[0], [[8, 257], [10, 9, 257]], B[2])],
    "response-order": [(A[0], A[1][::-1], A[2][::-1]), B],  # each response keeps its score
    "query-order": [B, A],
    "prompt-response-boundary": [([256, 1], [[2, 3, 4, 257], [5, 257]], A[2]), B],  # same token stream
    "ref-logps": [(*A, [-3.0, -2.0]), (*B, [-2.5, -4.0])],  # --loss dpo: a reference model's log-probs
}


def _items(queries):
    return [TokenizedExample(*copy.deepcopy(q)) for q in queries]


def test_data_fingerprint_changes_with_any_score_token_or_order():
    fingerprint = data_fingerprint(_items([A, B]))
    assert fingerprint == data_fingerprint(_items([A, B]))
    assert (fingerprint["queries"], fingerprint["tokens"]) == (2, 3 + 3 + 2 + 2 + 2 + 3)
    hashes = {name: data_fingerprint(_items(queries))["sha256"] for name, queries in CHANGED.items()}
    assert fingerprint["sha256"] not in hashes.values()
    assert len(set(hashes.values())) == len(hashes), hashes


# -------------------------------------------------------------------------------------------------
# the learning-rate schedule of a resumed run


def test_resume_with_another_step_size_keeps_the_checkpoints_schedule(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 8)
    cfg = config(tmp_path, model_dir, data, queries_per_step=2, save_every=2, keep_checkpoints=2)  # 4 steps
    train(cfg)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")  # as if killed before the last save
    capsys.readouterr()
    result = train(resumed(cfg, queries_per_step=4))  # on its own: a 2-step epoch, a 2-step schedule
    out = capsys.readouterr().out
    assert "these flags would make a 2-step schedule, the checkpoint's has 4; keeping the checkpoint's" in out
    assert result.step == 4
    old = dict(lr=cfg.lr, total_steps=4, warmup_steps=0, min_lr=0.0)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, **old) for s in range(4)], rel=1e-12)


def _record_steps(monkeypatch):
    """The query indices of every step the trainer takes, in order."""
    steps, real = [], distributed.my_microbatches

    def record(step, here):
        steps.append(sorted(i for group in step for i in group))
        return real(step, here)

    monkeypatch.setattr(distributed, "my_microbatches", record)
    return steps


def test_resume_with_another_step_size_trains_the_rest_of_the_epoch(tmp_path, model_dir, monkeypatch):
    """2 queries per step, killed after step 2, resumed with 4 per step: the next step takes the 4
    queries of the epoch not yet trained (a position counted in steps would skip to the next epoch)."""
    data = write_data(tmp_path / "d.jsonl", 8)
    cfg = config(tmp_path, model_dir, data, max_steps=4, queries_per_step=2, save_every=2)
    before = _record_steps(monkeypatch)
    train(cfg)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")  # as if killed before the last save
    after = _record_steps(monkeypatch)
    assert train(resumed(cfg, queries_per_step=4)).step == 4  # the checkpoint's 4-step schedule
    order = [epoch_order(8, cfg.seed, e) for e in (0, 1)]
    assert before[:2] == [sorted(order[0][:2]), sorted(order[0][2:4])]
    assert after == [sorted(order[0][4:]), sorted(order[1][:4])]


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 8)
    cfg = config(tmp_path, model_dir, data, max_steps=2, queries_per_step=2)
    train(cfg)
    capsys.readouterr()
    result = train(resumed(cfg, max_steps=4))
    out = capsys.readouterr().out
    old = dict(lr=cfg.lr, total_steps=2, warmup_steps=0, min_lr=0.0)
    new = {**old, "total_steps": 4}
    assert (
        "note: --max-steps changed, so the learning-rate schedule changes: steps 4 instead of 2; "
        f"lr at step 2: {lr_at(2, **new):.4g} (the old schedule's: {lr_at(2, **old):.4g})"
    ) in out
    assert result.step == 4
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    expected = [lr_at(0, **old), lr_at(1, **old), lr_at(2, **new), lr_at(3, **new)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lr_at(2, **new) > 0 == lr_at(2, **old)  # the two schedules differ where the run resumed


# -------------------------------------------------------------------------------------------------
# a re-save of an existing step parks the old copy between two renames


@pytest.fixture
def saver(tmp_path):
    """save(step, tag) writes a tiny checkpoint into tmp_path whose trainer state carries `tag`."""
    model = build_tiny_model("llama", hidden_size=16, num_layers=1)
    optimizer = build_optimizer(model.named_parameters(), "adamw", lr=1e-3)
    cfg = TrainConfig(model="m", data="d", output_dir=str(tmp_path))

    def save(step, tag):
        return save_checkpoint(tmp_path, step, model=model, tokenizer=None, optimizer=optimizer,
                               trainer_state={"tag": tag}, config=cfg)  # fmt: skip

    return save


def _tag(path):
    verify_checkpoint(path)
    return read_trainer_state(path)["tag"]


def test_a_resave_killed_between_its_renames_is_put_back(tmp_path, saver, monkeypatch):
    saver(3, "old")
    real_rename = os.rename

    def rename(src, dst):  # the old copy is parked; the kill lands before the new one moves in
        if os.path.basename(src).startswith(".tmp-checkpoint-"):
            raise KeyboardInterrupt
        real_rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            saver(3, "new")
    assert latest_checkpoint(tmp_path) is None and (tmp_path / ".parked-checkpoint-3").is_dir()
    remove_partial_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert _tag(tmp_path / "checkpoint-3") == "old"


@pytest.mark.parametrize("final, kept", [("missing", "old"), ("incomplete", "old"), ("complete", "new")])
def test_a_parked_copy_is_put_back_only_where_its_checkpoint_never_arrived(tmp_path, saver, final, kept):
    os.rename(saver(3, "old"), tmp_path / ".parked-checkpoint-3")
    if final == "incomplete":
        (tmp_path / "checkpoint-3").mkdir()
        (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"half")  # no marker
    elif final == "complete":
        saver(3, "new")  # the second rename happened; the kill came before the parked copy was removed
    partial = tmp_path / ".tmp-checkpoint-4-x1y2"  # and a save of step 4 killed half-way
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    assert remove_partial_saves(tmp_path) == [partial]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert _tag(tmp_path / "checkpoint-3") == kept


def test_a_resave_of_a_step_leaves_one_checkpoint(tmp_path, saver):
    saver(5, "first")
    saver(5, "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert _tag(tmp_path / "checkpoint-5") == "second"


def test_train_resumes_from_a_parked_checkpoint(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=1)
    train(cfg)
    run = tmp_path / "run"
    os.rename(run / "checkpoint-1", run / ".parked-checkpoint-1")  # a re-save of step 1 was killed
    with pytest.raises(UserError, match="already holds checkpoint-1; pass --resume"):
        train(cfg)
    capsys.readouterr()
    assert train(resumed(cfg, max_steps=2)).step == 2
    assert f"resumed from {run / 'checkpoint-1'} (step 1)" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------
# run.json: what the flags resolved to


def test_run_json_records_what_the_flags_resolved_to(tmp_path, model_dir):
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=2, queries_per_step=2, warmup_steps=None)
    result = train(cfg)
    tokenizer = load_tokenizer(str(model_dir))
    fingerprint = data_fingerprint([tokenize_example(e, tokenizer) for e in load_examples(data)])
    schedule = dict(lr=cfg.lr, total_steps=2, warmup_steps=default_warmup(2), min_lr=0.0)
    for path in (tmp_path / "run" / "run.json", result.checkpoint / "run.json"):
        info = json.loads(path.read_text(encoding="utf-8"))
        assert info["attn"] == resolve_backend("auto", torch.device("cpu")) == "dense", path
        assert info["kernels"] == "torch"
        assert (info["world_size"], info["device"], info["gpu"]) == (1, "cpu", None)
        assert info["weight_dtype"] == "float32" and info["trainable_dtypes"] == ["float32"]
        assert info["schedule"] == schedule and schedule["warmup_steps"] == 1
        assert info["data"] == fingerprint
        assert info["versions"]["torch"] == torch.__version__
        assert info["versions"]["transformers"] == transformers.__version__
    assert "run.json" in verify_checkpoint(result.checkpoint)["files"]  # covered by the marker's sizes
    assert read_trainer_state(result.checkpoint)["data"] == fingerprint
    assert TrainConfig.load(tmp_path / "run" / "config.json").attn == "auto"  # the flags as given


# -------------------------------------------------------------------------------------------------
# errors about one record name its FILE:LINE


def test_a_query_over_the_token_budget_names_its_line(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [record("sort 21:"), None, record("sort 31:"),
                                               record("sort " + "9" * 40 + ":")])  # fmt: skip
    cfg = config(tmp_path, model_dir, data, max_steps=1, micro_batch_tokens=40)
    start = re.escape(f"{data}:4: the query packs to 53 tokens")  # BOS + 46 bytes, then 3 + 3
    with pytest.raises(UserError, match=f"^{start}.*over the micro-batch budget --micro-batch-tokens 40;"):
        train(cfg)
    assert latest_checkpoint(cfg.output_dir) is None


@pytest.mark.parametrize("where", ["query", "response"])
def test_token_ids_outside_the_model_vocabulary_name_the_record(tmp_path, where):
    model = save_tiny_model(tmp_path / "model", hidden_size=16, layers=1)  # 259 embedding rows
    tokenizer = build_tokenizer()
    assert tokenizer.add_tokens(["<extra>"]) == 1  # id 259: a tokenizer larger than the weights
    tokenizer.save_pretrained(model)
    odd = record("sort <extra>:") if where == "query" else record("sort 12:", responses=("12<extra>", "21"))
    data = write_jsonl(tmp_path / "d.jsonl", [record("sort 21:"), record("sort 31:"), odd])
    start = re.escape(f"{data}:3: token id 259 is outside the model's vocabulary (259 embedding rows, 259 ")
    with pytest.raises(UserError, match=f"^{start}"):
        train(config(tmp_path, model, data, max_steps=1))


# -------------------------------------------------------------------------------------------------
# --resume without a checkpoint


def _interrupt_at_step(monkeypatch, step):
    """Ctrl-C in the forward of `step` (one micro-batch per step in these runs)."""
    real = objective_base.packed_logprobs
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_base, "packed_logprobs", forward)


def test_resume_without_a_checkpoint_starts_again_at_step_0(tmp_path, model_dir, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl", 8)
    cfg = config(tmp_path, model_dir, data, max_steps=2, queries_per_step=2)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at_step(patch, 2)  # killed before any checkpoint: metrics.jsonl holds step 1
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert [r["step"] for r in metrics(run)] == [1] and latest_checkpoint(run) is None
    capsys.readouterr()
    result = train(resumed(cfg))
    assert f"no checkpoint in {run}, starting from step 0" in capsys.readouterr().out
    assert result.step == 2
    assert [r["step"] for r in metrics(run)] == [1, 2]  # the stale row is gone, not appended to


# -------------------------------------------------------------------------------------------------
# pure-bf16 full fine-tuning warns


@pytest.mark.parametrize(
    "flags, warns",
    [
        (dict(dtype="bfloat16"), True),
        (dict(dtype="bfloat16", lora_r=4), False),
        (dict(dtype="auto"), False),
        (dict(dtype="bfloat16", bf16_update="stochastic"), False),
    ],
    ids=["bf16-full", "bf16-lora", "auto", "bf16-stochastic"],
)
def test_pure_bf16_full_fine_tuning_warns(model_dir, caplog, flags, warns):
    cfg = TrainConfig(model=str(model_dir), data="d", output_dir="o", **flags)
    with caplog.at_level(logging.WARNING, logger="rrhf_fast.models.loading"):
        load_model(cfg, torch.device("cpu"))
    said = [r.getMessage() for r in caplog.records if r.name == "rrhf_fast.models.loading"]
    assert any("--dtype bfloat16 without --lora-r trains the bf16 weights" in m for m in said) == warns
    assert all("--bf16-update stochastic" in m for m in said)  # the warning names the remedy


# -------------------------------------------------------------------------------------------------
# dropout masks differ across ranks


class _FirstForward(Exception):
    pass


def _first_forward_of_rank(tmp_path, model_dir, monkeypatch, rank):
    """Run rank `rank` of 2 up to its first forward; return the torch RNG state there and the LoRA
    weights. Without torchrun there is no process group, so the model runs unwrapped."""
    data = write_data(tmp_path / "d.jsonl", 4)
    cpu = torch.device("cpu")
    seen = {}

    def first_forward(model, *args, **kwargs):
        seen["rng"] = torch.get_rng_state()
        seen["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        raise _FirstForward

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "init", lambda device, fsdp=False: (distributed.Dist(rank, 2), cpu))
        patch.setattr(distributed, "wrap", lambda model, dist, fsdp, unit: model)
        patch.setattr(objective_base, "packed_logprobs", first_forward)
        with pytest.raises(_FirstForward):
            train(config(tmp_path, model_dir, data, f"rank{rank}", max_steps=1, seed=7, lora_r=2))
    return seen["rng"], seen["lora"]


def test_each_rank_seeds_torch_with_seed_plus_rank_after_loading(tmp_path, model_dir, monkeypatch):
    """Dropout masks must differ across ranks, LoRA's random initialisation must not: the generator at
    the first forward is exactly a fresh one seeded with seed + rank, set after the adapters exist."""
    (rng0, lora0), (rng1, lora1) = (
        _first_forward_of_rank(tmp_path, model_dir, monkeypatch, r) for r in (0, 1)
    )
    assert torch.equal(rng0, torch.Generator().manual_seed(7).get_state())
    assert torch.equal(rng1, torch.Generator().manual_seed(8).get_state())
    assert lora0 and lora0.keys() == lora1.keys()
    assert all(torch.equal(lora0[n], lora1[n]) for n in lora0)


# -------------------------------------------------------------------------------------------------
# a run saved before --loss-impl became --kernels and --mode became --length-norm


def test_a_checkpoint_with_the_old_field_names_resumes_without_changed_flags(tmp_path, model_dir, monkeypatch,
                                                                             capsys):  # fmt: skip
    """config.json and the checkpoint's train_config.json as an older rrhf-fast wrote them: keys
    `loss_impl` and `mode`. The resumed run reads them as --kernels and --length-norm, unchanged."""
    data = write_data(tmp_path / "d.jsonl", 4)
    cfg = config(tmp_path, model_dir, data, max_steps=2, queries_per_step=2, save_every=1,
                 kernels="torch", length_norm="official")  # fmt: skip
    new_to_dict = TrainConfig.to_dict
    old_names = {"kernels": "loss_impl", "length_norm": "mode"}
    monkeypatch.setattr(
        TrainConfig, "to_dict", lambda self: {old_names.get(k, k): v for k, v in new_to_dict(self).items()}
    )
    train(cfg)
    monkeypatch.setattr(TrainConfig, "to_dict", new_to_dict)
    saved = json.loads((tmp_path / "run" / "checkpoint-1" / CONFIG_FILE).read_text(encoding="utf-8"))
    assert (saved["loss_impl"], saved["mode"]) == ("torch", "official") and "kernels" not in saved
    assert TrainConfig.load(tmp_path / "run" / "config.json") == cfg
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")  # as if killed before the last save
    capsys.readouterr()
    result = train(resumed(cfg))
    out = capsys.readouterr().out
    assert "resumed from" in out and "changed flags" not in out, out
    assert result.step == 2
