"""The trainer on CUDA: bf16 autocast, the auto attention backend and the Triton kernels against
the dense attention + torch reference path, on the same tiny model and data (GPU only)."""

import json

import pytest
import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.models.logprobs import check_logit_parity, prepare_model
from rrhf_fast.models.tiny import ARCHS, build_tiny_model, build_tokenizer
from rrhf_fast.training.train import train

pytestmark = pytest.mark.gpu


def examples(n=16):
    return [
        Example(f"sort {i * 7919 % 9973}:", [str(sorted(str(i))), "no", f"{i} {i}"], [1.0, 0.0, 0.5])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-train")
    build_tiny_model("llama", seed=0).save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    write_examples(root / "train.jsonl", examples())
    return root


def run(root, name, **flags):
    config = TrainConfig(
        model=str(root / "model"), data=str(root / "train.jsonl"), output_dir=str(root / name),
        max_steps=3, queries_per_step=8, micro_batch_tokens=512, lr=1e-3, optim="adamw", seed=0,
        plot=False, log_every=0, device="cuda", **flags,
    )  # fmt: skip
    train(config)
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def test_auto_backends_and_triton_match_dense_torch(model_dir):
    fast = run(model_dir, "auto", attn="auto", kernels="auto")
    slow = run(model_dir, "dense", attn="dense", kernels="torch")
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow, strict=True):
        assert torch.isfinite(torch.tensor(a["loss"]))
        # bf16 autocast on both sides; the paths differ by rounding only.
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_parity_on_cuda_bf16(arch):
    model = prepare_model(build_tiny_model(arch, seed=1).cuda().to(torch.bfloat16))
    assert check_logit_parity(model, attn="auto", impl="auto") < 0.05
