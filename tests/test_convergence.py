"""Convergence parity (Liger-Kernel style): rrhf-fast's trainer and the naive official-style step
train the same tiny model on the same data to the same loss curve and the same weights.

rrhf-fast packs each prompt once with its responses, runs attention through the shared-prompt
function, and never materialises the logits; the naive step (benchmarks/reference_step.py) pads k
copies of prompt + response and takes a full log_softmax. Same initial weights, data order,
learning-rate schedule, clipping and torch AdamW: every step's loss, and the weights after the last
step, must agree to fp32 rounding.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import tokenize_example
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.models.loading import load_tokenizer
from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer
from rrhf_fast.optimizers.optim import lr_at
from rrhf_fast.step.steps import epoch_order, plan_steps
from rrhf_fast.training.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_step import reference_backward  # noqa: E402

STEPS, QUERIES_PER_STEP, LR = 6, 3, 3e-3  # 12 queries: two epochs


def make_examples(n: int = 12) -> list[Example]:
    g = torch.Generator().manual_seed(7)
    words = ["red", "blue", "green", "a cat", "two dogs", "yes", "no", "maybe so", "4", "four"]
    examples = []
    for i in range(n):
        k = 2 + i % 3
        picks = torch.randint(0, len(words), (k, 2), generator=g).tolist()
        responses = [f"{words[a]} {words[b]}" for a, b in picks]
        scores = torch.randint(0, 4, (k,), generator=g).float().tolist()  # ties included
        examples.append(Example(f"question {i}: what now?", responses, scores))
    return examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convergence")
    build_tiny_model("llama", seed=11).save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    write_examples(root / "train.jsonl", make_examples())
    return root


def run_rrhf_fast(root: Path, mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    config = TrainConfig(
        model=str(root / "model"), data=str(root / "train.jsonl"), output_dir=str(root / f"run-{mode}"),
        max_steps=STEPS, queries_per_step=QUERIES_PER_STEP, micro_batch_tokens=160, lr=LR, warmup_steps=1,
        optim="adamw", length_norm=mode, seed=3, plot=False, save_every=0, log_every=0,
    )  # fmt: skip
    result = train(config)
    rows = [json.loads(line) for line in (root / f"run-{mode}" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    return losses, {n: p.detach().clone() for n, p in result.model.named_parameters()}


def run_naive(root: Path, mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same schedule, order and optimizer, around the naive official-style forward/backward."""
    tokenizer = load_tokenizer(str(root / "model"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model").train()
    config = TrainConfig(model="m", data="d", output_dir="o", queries_per_step=QUERIES_PER_STEP,
                         micro_batch_tokens=160)  # fmt: skip
    items = [tokenize_example(ex, tokenizer) for ex in make_examples()]
    lengths = [it.packed_len for it in items]
    steps = [s for epoch in (0, 1) for s in plan_steps(lengths, epoch_order(len(items), 3, epoch), config)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        queries = [items[i] for group in steps[step] for i in group]
        out = reference_backward(model, queries, pad_id=tokenizer.pad_token_id, mode=mode)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=LR, total_steps=STEPS, warmup_steps=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_loss_curves_and_weights_match_the_naive_reference(setup, mode):
    ours, our_weights = run_rrhf_fast(setup, mode)
    naive, naive_weights = run_naive(setup, mode)
    assert len(ours) == len(naive) == STEPS
    assert ours[-1] < ours[0]  # it trains
    for step, (a, b) in enumerate(zip(ours, naive, strict=True)):
        assert a == pytest.approx(b, abs=1e-5), f"step {step + 1}: rrhf-fast {a} vs naive {b}"
    # Adam divides by sqrt(v): weights whose gradients are ~1e-8 turn rounding differences into
    # visible ones, so compare at a thirtieth of one step's update (lr), far below any real bug.
    for name, weight in naive_weights.items():
        torch.testing.assert_close(our_weights[name], weight, rtol=0, atol=LR / 30, msg=name)
