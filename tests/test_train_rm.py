"""`rrhf-fast train-rm`: a reward model trained by the training loop on packed queries.

A synthetic task with a known reward (score = count of "a" minus count of "b" in a response of
a/b/c letters): a tiny Llama starts at chance and must reach >= 0.9 held-out pairwise accuracy.
The checkpoint loads with AutoModelForSequenceClassification.from_pretrained and gives the rewards
the trainer computed; `score --scorer reward-model:` scores with it; resume is bitwise; LoRA trains
the score head whole; the command line offers no RRHF-only flag.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rrhf_fast import cli
from rrhf_fast.checkpointing.merge import merge
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import pack_tokenized, tokenize_example
from rrhf_fast.data.records import Example, load_examples, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.generation.score import ScoreConfig, build_scorer
from rrhf_fast.models.loading import load_tokenizer
from rrhf_fast.models.reward import packed_rewards
from rrhf_fast.pipelines.demo import save_tiny_model
from rrhf_fast.training import train_rm
from rrhf_fast.training.train import train

TORCH_THREADS = 1


def synthetic(n: int, seed: int) -> list[Example]:
    """k = 3 responses of 8 letters from {a, b, c} per query, with distinct known rewards."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        responses, scores = [], []
        while len(responses) < 3:
            text = "".join(rng.choice("abc") for _ in range(8))
            value = float(text.count("a") - text.count("b"))
            if value not in scores:
                responses.append(text)
                scores.append(value)
        prompt = "".join(rng.choice("xyz") for _ in range(rng.randint(2, 5))) + ":"
        out.append(Example(prompt, responses, scores))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    write_examples(root / "train.jsonl", synthetic(128, 0))
    write_examples(root / "eval.jsonl", synthetic(32, 1))
    return save_tiny_model(root / "lm", seed=0), root / "train.jsonl", root / "eval.jsonl"


def rm_config(files, out, **overrides):
    model, data, eval_data = files
    base = dict(model=str(model), data=str(data), eval_data=str(eval_data), output_dir=str(out), loss="rm",
                device="cpu", optim="adamw", lr=3e-3, queries_per_step=8, warmup_steps=0, log_every=0,
                plot=False, save_every=0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "rm"
    start = time.perf_counter()
    result = train(rm_config(files, out, epochs=1, eval_every=8, plot=True))
    return result, out, time.perf_counter() - start


def test_a_tiny_reward_model_learns_a_known_reward(trained):
    result, out, seconds = trained
    metrics = rows(out)
    assert metrics[0]["step"] == 0 and metrics[0]["eval_accuracy"] < 0.7  # chance at the start
    last = metrics[-1]
    assert last["step"] == result.step == 16
    assert last["eval_accuracy"] >= 0.9, [r.get("eval_accuracy") for r in metrics]
    assert last["eval_margin"] > metrics[0]["eval_margin"] + 0.5
    assert last["eval_top1"] >= 0.8
    assert {"rm_loss", "center_loss", "margin", "accuracy", "top1"} <= last.keys()
    assert (out / "curves.png").stat().st_size > 1000
    assert seconds < 60  # "well under a minute": ~4 s alone on one core of the 2-core CI machine


def test_checkpoint_loads_with_from_pretrained_and_gives_the_trained_rewards(trained, files):
    result, out, _ = trained
    checkpoint = out / "checkpoint-16"
    loaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tok = load_tokenizer(str(checkpoint))
    examples = load_examples(files[2])[:6]
    items = [tokenize_example(ex, tok) for ex in examples]
    with torch.no_grad():
        packed = packed_rewards(result.model.eval(), pack_tokenized(items)).tolist()
        alone = [loaded(input_ids=torch.tensor([it.prompt_ids + r])).logits[0, 0].item()
                 for it in items for r in it.response_ids]  # fmt: skip
        scored = build_scorer(f"reward-model:{checkpoint}", ScoreConfig(device="cpu")).score(
            [ex.query for ex in examples], [ex.responses for ex in examples]
        )
    assert packed == pytest.approx(alone, abs=1e-5)
    assert [s for row in scored for s in row] == pytest.approx(alone, abs=1e-5)
    assert max(alone) - min(alone) > 1.0  # trained rewards, not a constant


def test_resume_is_bitwise(files, tmp_path):
    # A constant learning rate: the run cut at step 3 follows the same schedule as the whole one.
    kw = dict(max_steps=6, save_every=3, rm_center=0.01, min_lr=3e-3)
    whole = train(rm_config(files, tmp_path / "whole", **kw))
    cut = rm_config(files, tmp_path / "cut", **kw)
    train(TrainConfig(**{**cut.to_dict(), "max_steps": 3}))  # stops at step 3 as if killed after its save
    resumed = train(TrainConfig(**{**cut.to_dict(), "resume": True}))
    assert whole.step == resumed.step == 6
    a = load_file(tmp_path / "whole" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("loss", "rm_loss", "center_loss", "margin", "accuracy", "grad_norm", "lr")
    strip = [{k: r.get(k) for k in keep} for r in rows(tmp_path / "whole")]
    assert strip == [{k: r.get(k) for k in keep} for r in rows(tmp_path / "cut")]


def test_listwise_with_lora_trains_the_score_head_and_merges(files, tmp_path):
    cfg = rm_config(files, tmp_path / "lora", max_steps=2, rm_loss="listwise", lora_r=4, lora_dropout=0.0,
                    eval_data=None, gradient_checkpointing=True)  # fmt: skip
    result = train(cfg)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    merged = merge(tmp_path / "lora" / "checkpoint-2", tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    item = tokenize_example(load_examples(files[1])[0], load_tokenizer(str(merged)))
    with torch.no_grad():
        packed = packed_rewards(result.model.eval(), pack_tokenized([item])).tolist()
        alone = [loaded(input_ids=torch.tensor([item.prompt_ids + r])).logits[0, 0].item()
                 for r in item.response_ids]  # fmt: skip
    assert packed == pytest.approx(alone, abs=1e-5)


def test_data_without_any_pair_is_refused(files, tmp_path):
    data = tmp_path / "ties.jsonl"
    write_examples(data, [Example("q:", ["a", "b"], [1.0, 1.0]), Example("r:", ["c"], [0.0])])
    with pytest.raises(UserError, match="no query has two responses with different scores"):
        train(rm_config(files, tmp_path / "out", data=str(data), eval_data=None, max_steps=1))


def test_command_line_offers_the_rm_flags_and_not_rrhf_ones(files, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_rm.add_arguments(parser)
    flags = parser._option_string_actions
    assert {
        "--rm-loss",
        "--rm-margin",
        "--rm-margin-scale",
        "--rm-center",
        "--lora-r",
        "--fsdp",
    } <= flags.keys()
    unwanted = {"--loss", "--rank-weight", "--sft-weight", "--length-penalty", "--dpo-beta", "--kernels",
                "--loss-impl", "--length-norm", "--mode"}  # fmt: skip
    assert not unwanted & flags.keys()
    model, data, _ = files
    common = ["train-rm", "--model", str(model), "--data", str(data), "--device", "cpu"]
    code = cli.main([*common, "--output-dir", str(tmp_path / "c"), "--optim", "adamw", "--max-steps", "1",
                     "--rm-loss", "bt", "--rm-margin", "0.5", "--rm-margin-scale", "--no-plot"])  # fmt: skip
    assert code == 0
    saved = TrainConfig.load(tmp_path / "c" / "config.json")
    assert (saved.loss, saved.rm_margin, saved.rm_margin_scale) == ("rm", 0.5, True)
    code = cli.main(
        [*common, "--output-dir", str(tmp_path / "d"), "--rm-loss", "listwise", "--rm-margin", "0.5"]
    )
    assert code == 2 and "apply to --rm-loss bt only" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(files, tmp_path, fsdp):
    """torchrun, 2 gloo ranks, 2 steps of 3 micro-batches (rank 1 runs a zero-weight filler): the
    weights and metrics of the 1-process run with the same micro-batches accumulated."""
    from test_distributed import max_diff, weights

    kw = dict(max_steps=2, queries_per_step=None, grad_accum=3, micro_batch_tokens=90, save_every=2,
              min_lr=3e-3, eval_every=1)  # fmt: skip
    train(rm_config(files, tmp_path / "one", **kw))
    flags = argv_rm(rm_config(files, tmp_path / "two", fsdp=fsdp, **kw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rrhf_fast.cli", "train-rm", *flags]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    start = load_file(files[0] / "model.safetensors")
    two, one = weights(tmp_path / "two", 2), weights(tmp_path / "one", 2)
    assert max_diff(two, one) <= 1e-5
    assert max((two[k] - start[k]).abs().max().item() for k in start if k in two) > 1e-4  # it trained
    a, b = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "rm_loss", "margin", "accuracy", "grad_norm", "eval_loss", "eval_accuracy"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def argv_rm(cfg: TrainConfig) -> list[str]:
    """`rrhf-fast train-rm` flags that give `cfg` (its fields but those train-rm does not take)."""
    args = []
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if key in train_rm.NOT_FOR_RM or value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):  # a repeatable flag (--report-to): once per value
            args += [part for item in value for part in (flag, str(item))]
        else:
            args += [flag, str(value)]
    return args


def test_qlora_keeps_the_score_head_whole_and_trains_it(files, tmp_path):
    from test_lora import bnb_cpu

    bnb_cpu(4)
    result = train(rm_config(files, tmp_path / "q", max_steps=3, lora_r=4, load_in_4bit=True, eval_data=None))
    base = result.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert type(base.score.original_module) is torch.nn.Linear  # not quantised: trained whole
    head = [p for n, p in result.model.named_parameters() if "score" in n and p.requires_grad]
    assert len(head) == 1 and head[0].dtype == torch.float32
    losses = [r["loss"] for r in rows(tmp_path / "q")]
    assert losses[-1] < losses[0]
