"""Multi-process training on CPU (gloo), launched as users launch it: `torchrun -m rrhf_fast.cli train`.

Two ranks must give the one-process update with the same micro-batches accumulated (DDP and FSDP2,
fp32, torch AdamW), and a resumed run must equal the uninterrupted one bit for bit on the same world
size; an FSDP2 checkpoint also resumes on another world size (its optimizer shards are resharded).
Each launch costs a few seconds of interpreter start-up on two cores: one DDP test stays in the
default suite, the others are marked slow.
"""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_runs import on_two_gloo_ranks, reseal, tree_digest

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.parallel.distributed import Dist, my_microbatches, sum_over_ranks
from rrhf_fast.training.train import train

# micro_batch_tokens 60 holds 1-3 of these queries: a step of grad_accum micro-batches splits
# unevenly over two ranks, so one rank also runs a zero-weight filler micro-batch.
BASE = dict(optim="adamw", lr=1e-3, min_lr=1e-3, warmup_steps=0, micro_batch_tokens=60, device="cpu",
            log_every=0, plot=False, save_every=2, keep_checkpoints=5)  # fmt: skip


TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    examples = []
    for _ in range(16):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        gold = "".join(sorted(digits))
        examples.append(Example(f"sort {digits}:", [gold, digits + "0", gold[::-1]], [1.0, 0.5, 0.0]))
    write_examples(root / "d.jsonl", examples)
    return save_tiny_model(root / "model", seed=0), root / "d.jsonl"


def flags(files, out, **overrides):
    model, data = files
    cfg = TrainConfig(model=str(model), data=str(data), output_dir=str(out), **{**BASE, **overrides})
    return cfg


def argv(cfg: TrainConfig) -> list[str]:
    args = []
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):  # a repeatable flag (--report-to): once per value
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def torchrun(cfg: TrainConfig, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node N -m rrhf_fast.cli train ...`; returns its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rrhf_fast.cli", "train", *argv(cfg)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def weights(run_dir, step):
    (file,) = (run_dir / f"checkpoint-{step}").glob("*.safetensors")
    return load_file(file)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(run_dir):
    drop = ("tokens_per_s", "mem_mib")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def assert_rows_close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.get("queries") == y.get("queries") and x.get("tokens") == y.get("tokens")
        assert x.keys() == y.keys()
        for key in ("loss", "rank_loss", "sft_loss", "grad_norm", "accuracy", "top1", "best_reward",
                    "eval_loss", "eval_accuracy"):  # fmt: skip
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


# -------------------------------------------------------------------------------------------------
# equivalence: 2 ranks == 1 process with the same micro-batches accumulated


def test_ddp_two_ranks_equal_one_process(tmp_path, files):
    """2 steps of 3 micro-batches: rank 0 runs two, rank 1 one and a zero-weight filler; held-out
    evaluation (through the DDP module) before, after step 1 and at the end."""
    kw = dict(max_steps=2, grad_accum=3, eval_data=str(files[1]), eval_every=1)
    one = train(flags(files, tmp_path / "one", **kw))
    out = torchrun(flags(files, tmp_path / "two", **kw))

    start = load_file(files[0] / "model.safetensors")
    assert max_diff(weights(tmp_path / "two", 2), weights(tmp_path / "one", 2)) <= 1e-5
    assert max_diff(weights(tmp_path / "two", 2), start) > 1e-4  # it did train
    assert_rows_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    assert [("eval_loss" in r) for r in metrics(tmp_path / "two")] == [True, True, True]
    assert sum(r.get("queries", 0) for r in metrics(tmp_path / "two")) > 6  # every rank's queries count
    assert out.count("done: step 2") == 1  # rank 0 alone prints
    saved = sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").iterdir())
    assert "rng-rank1.pt" in saved and "optimizer.pt" in saved and "model.safetensors" in saved
    assert one.step == 2


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
@pytest.mark.parametrize("loss", ["simpo", "pro"])
def test_ddp_two_ranks_equal_one_process_for_the_ranking_losses(tmp_path, files, loss, wrap):
    """The same equivalence for a loss averaged over the queries with a pair (simpo) and one with an
    SFT term (pro), under DDP and FSDP2: the step's normaliser is global, a filler micro-batch adds
    nothing."""
    kw = dict(max_steps=2, grad_accum=3, loss=loss)
    train(flags(files, tmp_path / "one", **kw))
    torchrun(flags(files, tmp_path / "two", fsdp=wrap == "fsdp2", **kw))
    assert max_diff(weights(tmp_path / "two", 2), weights(tmp_path / "one", 2)) <= 1e-5
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert_rows_close(a, b)
    assert [r["margin"] for r in a] == pytest.approx([r["margin"] for r in b], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "extra",
    [pytest.param(dict(), id="full"),  # default suite: held-out evaluation under FSDP2 left the root
     # group unsharded, and its gradients then went unreduced (evaluate._reshard)
     pytest.param(dict(lora_r=4, lora_dropout=0.0, gradient_checkpointing=True), id="lora-checkpointing",
                  marks=pytest.mark.slow)],
)  # fmt: skip
def test_fsdp2_two_ranks_equal_one_process(tmp_path, files, extra):
    kw = dict(max_steps=2, grad_accum=2, eval_data=str(files[1]), **extra)  # evaluated before and after
    one = train(flags(files, tmp_path / "one", **kw))
    torchrun(flags(files, tmp_path / "two", fsdp=True, **kw))
    assert max_diff(weights(tmp_path / "two", 2), weights(tmp_path / "one", 2)) <= 1e-5
    assert_rows_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    assert (tmp_path / "two" / "checkpoint-2" / "optimizer" / ".metadata").is_file()  # sharded
    assert one.step == 2


# -------------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_ddp_resume_is_bitwise(tmp_path, files):
    """4 steps (crossing an epoch) == 2 steps, then --resume to 4; the lr is constant, so the first
    run's shorter schedule is the same schedule."""
    kw = dict(grad_accum=3)
    torchrun(flags(files, tmp_path / "whole", max_steps=4, **kw))
    torchrun(flags(files, tmp_path / "part", max_steps=2, **kw))
    torchrun(flags(files, tmp_path / "part", max_steps=4, resume=True, **kw))
    a, b = weights(tmp_path / "whole", 4), weights(tmp_path / "part", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt = [
        torch.load(tmp_path / d / "checkpoint-4" / "optimizer.pt", weights_only=True)
        for d in ("whole", "part")
    ]
    assert str(opt[0]) == str(opt[1])
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "part")


@pytest.mark.slow
def test_fsdp2_resume_same_world_is_bitwise_and_another_world_reshards(tmp_path, files):
    kw = dict(grad_accum=3, fsdp=True)
    torchrun(flags(files, tmp_path / "whole", max_steps=4, **kw))
    torchrun(flags(files, tmp_path / "part", max_steps=2, **kw))
    shutil.copytree(tmp_path / "part" / "checkpoint-2", tmp_path / "part1" / "checkpoint-2")
    torchrun(flags(files, tmp_path / "part", max_steps=4, resume=True, **kw))
    out = torchrun(flags(files, tmp_path / "part1", max_steps=4, resume=True, **kw), nproc=1)

    a, b = weights(tmp_path / "whole", 4), weights(tmp_path / "part", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "part")
    # One rank: the two optimizer shards are resharded into one; the sums run in another order.
    assert "saved by 2 processes, resumed on 1" in out
    assert 0 < max_diff(weights(tmp_path / "part1", 4), a) <= 1e-5
    with pytest.raises(UserError, match="written by a run with --fsdp, resumed without it"):
        train(flags(files, tmp_path / "part1", max_steps=6, resume=True, grad_accum=3))


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_fsdp2_resume_never_unpickles_a_crafted_metadata(tmp_path, files):
    """DCP's FileSystemReader would unpickle optimizer/.metadata: a pickle whose __reduce__ writes a
    file, in a checkpoint whose marker was made consistent with it, must not run."""
    torchrun(flags(files, tmp_path / "run", max_steps=2, grad_accum=3, fsdp=True))
    path = tmp_path / "run" / "checkpoint-2"
    (path / "optimizer" / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    (path / "optimizer" / "metadata.json").unlink()  # as a checkpoint from elsewhere would be
    marker = json.loads((path / "COMPLETE.json").read_text())
    marker["required"].remove("optimizer/metadata.json")
    (path / "COMPLETE.json").write_text(json.dumps(marker))
    reseal(path)  # sizes and hashes of what the checkpoint now holds

    cfg = flags(files, tmp_path / "run", max_steps=4, grad_accum=3, fsdp=True, resume=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rrhf_fast.cli", "train", *argv(cfg)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode != 0
    assert "rrhf-fast train: error: " in proc.stderr and "pickled .metadata could run code" in proc.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_fsdp2_with_torchao_adamw8bit(tmp_path, files):
    pytest.importorskip("torchao")
    torchrun(flags(files, tmp_path / "two", max_steps=2, grad_accum=2, fsdp=True, optim="adamw8bit"))
    assert max_diff(weights(tmp_path / "two", 2), load_file(files[0] / "model.safetensors")) > 1e-4


# -------------------------------------------------------------------------------------------------
# pieces, in one process


def test_fsdp_needs_torchrun(tmp_path, files):
    with pytest.raises(UserError, match="launch with `torchrun --nproc_per_node N"):
        train(flags(files, tmp_path / "run", max_steps=1, fsdp=True))


def test_fsdp_adamw8bit_without_torchao_is_an_error_not_32_bit_states(monkeypatch):
    from rrhf_fast.optimizers.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # as if torchao were not installed
    params = [("w", torch.nn.Parameter(torch.zeros(4, 4)))]
    with pytest.raises(UserError, match="needs torchao's DTensor-aware 8-bit AdamW"):
        build_optimizer(params, "adamw8bit", lr=1e-3, sharded=True)
    assert type(build_optimizer(params, "adamw8bit", lr=1e-3)).__module__.startswith("bitsandbytes")


def test_fsdp_with_paged_optimizer_is_refused(tmp_path, files):
    with pytest.raises(UserError, match="paged-adamw8bit cannot step FSDP2"):
        flags(files, tmp_path / "run", fsdp=True, optim="paged-adamw8bit").validate()


@pytest.mark.parametrize(
    "step, world, expected",
    [
        pytest.param([[0], [1, 2], [3]], 2, [([[0], [3]], 2), ([[1, 2], [0]], 1)], id="3-on-2-filler"),
        pytest.param([[0], [1]], 2, [([[0]], 1), ([[1]], 1)], id="2-on-2"),
        pytest.param([[5, 6]], 3, [([[5, 6]], 1), ([[5, 6]], 0), ([[5, 6]], 0)], id="1-on-3"),
    ],
)
def test_each_rank_takes_its_share_and_fillers_keep_ranks_in_step(step, world, expected):
    got = [my_microbatches(step, Dist(rank, world)) for rank in range(world)]
    assert got == expected
    real = [mb for rank in range(world) for mb in got[rank][0][: got[rank][1]]]
    assert sorted(real) == sorted(step)  # every micro-batch trains exactly once


def test_sums_over_ranks_in_one_process_are_the_values():
    assert sum_over_ranks([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]


@pytest.mark.slow
def test_fsdp2_optim_in_backward_equals_the_ordinary_step_and_resumes(tmp_path, files):
    """Two ranks, one micro-batch each per step (--grad-accum 2), clipped: the hooks fire on each
    rank's shards after the reduce-scatter; a resume through the sharded optimizer checkpoint."""
    kw = dict(grad_accum=2, fsdp=True, max_grad_norm=0.05)
    torchrun(flags(files, tmp_path / "plain", max_steps=4, **kw))
    torchrun(flags(files, tmp_path / "whole", max_steps=4, optim_in_backward=True, **kw))
    torchrun(flags(files, tmp_path / "part", max_steps=2, optim_in_backward=True, **kw))
    torchrun(flags(files, tmp_path / "part", max_steps=4, resume=True, optim_in_backward=True, **kw))
    plain, whole, part = (weights(tmp_path / d, 4) for d in ("plain", "whole", "part"))
    assert max_diff(plain, whole) <= 1e-7
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "part")


# -------------------------------------------------------------------------------------------------
# DDP's memory


def _ddp_gradients(rank: int) -> tuple[int, int, bool]:
    """One of two gloo ranks: the trainer's DDP wrapper around a tiny model, two backward passes
    (the second after zero_grad(set_to_none=True), as the loop does)."""
    from rrhf_fast.data.packing import pack
    from rrhf_fast.models.logprobs import prepare_model
    from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer
    from rrhf_fast.parallel.distributed import wrap

    model = prepare_model(build_tiny_model("llama").train())
    ddp = wrap(model, Dist(rank=rank, world=2), fsdp=False)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = pack([Example("sort 31:", ["13", "31"], [1.0, 0.0])], build_tokenizer())
    for _ in range(2):
        for p in params:
            p.grad = None
        ddp(batch, attn="dense", impl="torch").sum().backward()
    buckets = {p.grad.untyped_storage().data_ptr() for p in params}
    return len(params), len(buckets), all(p.grad._base is not None for p in params)


def test_ddp_gradients_are_views_of_its_buckets(tmp_path):
    """Under DDP each .grad is a view into the all-reduce buckets (gradient_as_bucket_view), also
    after the loop's zero_grad(set_to_none=True): no second copy of every gradient beside them, so
    a rank holds what `rrhf-fast plan` counts for one process."""
    results = on_two_gloo_ranks(_ddp_gradients, tmp_path)
    assert len(results) == 2
    for params, storages, views in results.values():
        assert views and storages < params / 4, (params, storages)  # a few buckets hold them all


def _nan_in_a_shard(checkpoint) -> str:
    """NaN written into the first parameter's exp_avg inside its DCP shard file (each value is a
    torch.save blob at the offset metadata.json records: its tensor bytes are patched in place);
    the marker is then made to match, as a buggy writer would leave it. Returns the parameter."""
    import io

    meta = json.loads((checkpoint / "optimizer" / "metadata.json").read_text())
    entry = next(s for s in meta["storage"] if s["fqn"].endswith(".exp_avg"))
    file = checkpoint / "optimizer" / entry["file"]
    data = bytearray(file.read_bytes())
    blob = bytes(data[entry["start"] : entry["start"] + entry["length"]])
    raw = torch.load(io.BytesIO(blob), weights_only=True).contiguous().numpy().tobytes()
    at = entry["start"] + blob.index(raw)  # the whole tensor's bytes: where its first value is
    data[at : at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    file.write_bytes(bytes(data))
    reseal(checkpoint)
    return entry["fqn"].removeprefix("optimizer.state.").removesuffix(".exp_avg")


def _flip_a_shard(checkpoint) -> str:
    file = checkpoint / "optimizer" / "__1_0.distcp"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    return "optimizer/__1_0.distcp differs from what was saved"


@pytest.mark.slow
def test_fsdp2_damaged_checkpoint_is_refused_on_every_rank(tmp_path, files):
    """A flipped byte in rank 1's optimizer shard (the hashes) and NaN in a sharded moment of a
    consistent checkpoint (each rank checks its shards; the ranks agree on the sentence): every
    rank exits with the same one sentence, nothing of ours raises a traceback, and the run
    directory is byte for byte as it was."""
    torchrun(flags(files, tmp_path / "run", max_steps=2, grad_accum=3, fsdp=True))
    for case in ("flip", "nan"):
        run = tmp_path / case
        shutil.copytree(tmp_path / "run", run)
        checkpoint = run / "checkpoint-2"
        if case == "flip":
            words = _flip_a_shard(checkpoint)
        else:
            words = (
                f"the optimizer state of {_nan_in_a_shard(checkpoint)} has 1 NaN or inf value(s) in exp_avg"
            )
        before = tree_digest(run)
        cfg = flags(files, run, max_steps=4, grad_accum=3, fsdp=True, resume=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "rrhf_fast.cli", "train", *argv(cfg)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "rrhf-fast train: error: " in line]
        assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
        assert words in errors[0] and str(checkpoint) in errors[0], errors[0]
        assert "rrhf_fast/" not in proc.stderr, proc.stderr[-3000:]  # no traceback through our code
        assert tree_digest(run) == before
