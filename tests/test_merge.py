"""rrhf-fast merge: the merged model computes what the base model with the adapter computes."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrhf_fast.checkpointing.merge import merge
from rrhf_fast.cli import main
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.models.loading import import_peft
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.training.train import train

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, and a LoRA run on it that moved its adapter well away from zero."""
    root = tmp_path_factory.mktemp("merge")
    model_dir = save_tiny_model(root / "model", seed=0)
    rng = random.Random(0)
    answers = [["".join(rng.choice("abc") for _ in range(4)) for _ in range(3)] for _ in range(6)]
    examples = [Example(f"q{i}", answers[i], [1.0, 0.5, 0.0]) for i in range(6)]
    write_examples(root / "d.jsonl", examples)
    cfg = TrainConfig(model=str(model_dir), data=str(root / "d.jsonl"), output_dir=str(root / "run"),
                      optim="adamw", lr=5e-2, device="cpu", log_every=0, plot=False, warmup_steps=0,
                      max_steps=3, lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                      queries_per_step=6)  # fmt: skip
    return model_dir, train(cfg).checkpoint


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.tensor([[256, 5, 17, 99, 3, 42, 200, 7]])


def test_merged_logits_equal_the_adapter_models(run, tmp_path, capsys):
    model_dir, checkpoint = run
    assert main(["merge", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model in" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = import_peft().PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), checkpoint
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in name for name in merged.state_dict())
    assert (logits(merged, IDS) - logits(adapted, IDS)).abs().max().item() <= 1e-5
    assert (logits(merged, IDS) - logits(base, IDS)).abs().max().item() > 1e-3  # the adapter mattered
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_base_can_be_given_and_dtype_chosen(run, tmp_path):
    model_dir, checkpoint = run
    out = merge(checkpoint, tmp_path / "merged", base=str(model_dir), dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "what, problem",
    [
        pytest.param("full", "holds no LoRA adapter", id="full-checkpoint"),
        pytest.param("busy-out", "not an empty directory", id="out-not-empty"),
        pytest.param("wrong-base", "does not fit --base", id="wrong-base"),
        pytest.param("missing", "no such directory", id="no-checkpoint"),
    ],
)
def test_user_errors_are_one_sentence(run, tmp_path, capsys, what, problem):
    model_dir, checkpoint = run
    argv = ["merge", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    if what == "full":
        argv[2] = str(model_dir)
    elif what == "busy-out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x.txt").write_text("x")
    elif what == "wrong-base":
        argv += ["--base", str(save_tiny_model(tmp_path / "other", hidden_size=32))]
    else:
        argv[2] = str(tmp_path / "nothing")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err and err.count("\n") == 1
