"""The model card (README.md) of every checkpoint, read by huggingface_hub.ModelCard.load: its front
matter (base_model, library_name, tags, license, datasets), its command line (which parses back to
the run's flags), its numbers (the data fingerprint, the packing summary, the last metrics rows,
the versions), and its loading snippet, executed. The card breaks neither resume nor
from_pretrained; `merge` and `train-rm` write one too.
"""

import argparse
import json
import re
import shlex

import pytest
import torch
from huggingface_hub import ModelCard
from training_runs import config, metrics, write_data

from rrhf_fast import cli
from rrhf_fast.checkpointing.checkpoint import read_trainer_state
from rrhf_fast.checkpointing.merge import merge
from rrhf_fast.config import TrainConfig
from rrhf_fast.models.tiny import save_tiny_model
from rrhf_fast.reporting import model_card
from rrhf_fast.training.train import train

TORCH_THREADS = 1
BASE_CARD = "---\nbase_model: someorg/tiny-base\nlicense: apache-2.0\n---\n\n# tiny base\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model = save_tiny_model(root / "model")
    (model / "README.md").write_text(BASE_CARD)  # a base with its own card: base_model and license pass on
    return model, write_data(root / "data.jsonl", n=6)


def code_block(text: str, lang: str) -> str:
    (block,) = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    return block


def test_every_checkpoint_has_a_card_the_hub_reads(files, tmp_path):
    model, data = files
    run = tmp_path / "run"
    train(config(tmp_path, model, data, max_steps=2, save_every=1, keep_checkpoints=5, eval_data=str(data)))
    rows = {r["step"]: r for r in metrics(run)}
    for step in (1, 2):
        path = run / f"checkpoint-{step}" / "README.md"
        card = ModelCard.load(path)
        assert card.data.library_name == "rrhf-fast" and card.data.base_model == "someorg/tiny-base"
        assert card.data.license == "apache-2.0" and card.data.tags == ["rrhf-fast", "rrhf"]
        assert f"## Metrics at step {step}" in card.text
        assert f"| loss | {rows[step]['loss']:.6g} |" in card.text
    card = ModelCard.load(run / "checkpoint-2" / "README.md")
    assert f"| eval_loss | {rows[2]['eval_loss']:.6g} |" in card.text
    fingerprint = read_trainer_state(run / "checkpoint-2")["data"]
    assert fingerprint["sha256"] in card.text and "packed/unshared" in card.text
    assert f"| transformers | {__import__('transformers').__version__} |" in card.text
    assert "| rank_weight | 1 |" in card.text and "| lr | 0.01 |" in card.text


def test_the_card_command_line_parses_back_to_the_run_flags(files, tmp_path):
    model, data = files
    ran = config(tmp_path, model, data, max_steps=1, rank_weight=0.5, chat_template=True, report_to=())
    train(ran)
    text = (tmp_path / "run" / "checkpoint-1" / "README.md").read_text()
    argv = shlex.split(code_block(text, "bash"))[1:]
    parser, _ = cli.build_parser(argv)
    assert TrainConfig.from_args(parser.parse_args(argv)) == ran


def test_the_loading_snippet_loads_the_trained_model_and_resume_ignores_the_card(files, tmp_path):
    model, data = files
    result = train(config(tmp_path, model, data, max_steps=1))
    text = (result.checkpoint / "README.md").read_text()
    scope: dict = {}
    exec(code_block(text, "python"), scope)
    trained = result.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in scope["model"].state_dict().items())
    assert scope["tokenizer"].eos_token_id is not None
    resumed = train(config(tmp_path, model, data, max_steps=2, resume=True))  # the card is in the marker
    assert resumed.step == 2 and (resumed.checkpoint / "README.md").is_file()


def test_lora_merge_and_reward_model_cards(files, tmp_path):
    model, data = files
    result = train(config(tmp_path, model, data, max_steps=1, lora_r=2))
    card = ModelCard.load(result.checkpoint / "README.md")
    assert card.data.tags == ["rrhf-fast", "rrhf", "lora", "peft"] and "AutoPeftModelForCausalLM" in card.text
    scope: dict = {}
    exec(code_block(card.text, "python"), scope)  # peft loads the base the adapter names, then the adapter
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
    out = merge(result.checkpoint, tmp_path / "merged")
    merged = ModelCard.load(out / "README.md")
    assert merged.data.tags == ["rrhf-fast", "rrhf", "merged"]
    assert merged.data.base_model == "someorg/tiny-base"
    assert "## Merge" in merged.text and "## Command line" in merged.text
    exec(code_block(merged.text, "python"), scope)
    assert type(scope["model"]).__name__.endswith("ForCausalLM")

    rm = train(config(tmp_path, model, data, name="rm", max_steps=1, loss="rm"))
    card = ModelCard.load(rm.checkpoint / "README.md")
    assert card.data.tags == ["rrhf-fast", "reward-model"] and card.data.pipeline_tag == "text-classification"
    assert "rrhf-fast train-rm" in card.text and "AutoModelForSequenceClassification" in card.text


def test_datasets_and_base_model_only_as_hub_names(tmp_path):
    local = TrainConfig(model=str(tmp_path), data=str(tmp_path / "d.jsonl"), output_dir="o")
    expected = {"library_name": "rrhf-fast", "tags": ["rrhf-fast", "rrhf"], "pipeline_tag": "text-generation"}
    assert model_card.metadata(local, adapter=False) == expected
    hub = argparse.Namespace(**{**local.to_dict(), "model": "org/base", "data": "org/prefs", "loss": "dpo",
                                "eval_data": "org/prefs-test"})  # fmt: skip
    meta = model_card.metadata(hub, adapter=False)
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["org/prefs", "org/prefs-test"]
    assert meta["tags"] == ["rrhf-fast", "dpo"]
    json.dumps(meta)
