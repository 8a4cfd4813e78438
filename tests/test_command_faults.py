"""Every command against one table of bad inputs: a crafted .bin, empty / truncated / corrupt
safetensors, a config.json that is not JSON, an output path under a regular file and under /proc,
a lone surrogate in every field of every record shape, a folder of mixed files, and a GGUF --model
that is truncated, not a GGUF, of an unknown architecture, missing, or met without the gguf package.

Each case runs the CLI in-process (`rrhf_fast.cli.main`) and asserts what a user sees: exit code 2,
one line on stderr naming the file (with its line and field where there is one), no traceback,
and nothing written anywhere under the test's directory (not even an empty output directory).
A fault reaches only the commands that read that input: `plan` reads a model's config.json alone,
`inspect` its tokenizer and config, `sample` and `iterate` read prompt files (never folders).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rrhf_fast.cli import main
from rrhf_fast.models.tiny import save_tiny_gguf, save_tiny_model

TORCH_THREADS = 1  # tiny models (conftest.module_torch_threads)


# -------------------------------------------------------------------------------------------------
# the inputs: a good one of each kind, copied per case and then damaged


class _Payload:
    def __reduce__(self):
        return (open, (os.environ["RRHF_FAST_TEST_MARKER"], "w"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny model, a LoRA adapter for it, a python scorer: shared by every case, never written."""
    root = tmp_path_factory.mktemp("good")
    model = save_tiny_model(root / "model", seed=0, hidden_size=32, layers=1)
    import peft
    from transformers import AutoModelForCausalLM

    from rrhf_fast.models.loading import peft_quietly

    with peft_quietly():
        adapter = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model), peft.LoraConfig(r=2))
    adapter.save_pretrained(root / "adapter")
    (root / "scorer.py").write_text("def length(query, response):\n    return float(len(response))\n")
    save_tiny_gguf(root / "tiny.gguf")
    return root


RECORD = {"query": "sort 31:", "responses": ["13", "31"], "scores": [1.0, 0.0]}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # ensure_ascii
    return path


class Case:
    """One run: the files of a command's flags under `tmp`, damaged by a fault."""

    def __init__(self, tmp: Path, good: Path):
        self.tmp, self.model, self.out = tmp, tmp / "model", tmp / "out"
        shutil.copytree(good / "model", self.model)
        self.adapter, self.scorer, self.gguf = good / "adapter", good / "scorer.py", good / "tiny.gguf"
        self.data = _write_jsonl(tmp / "d.jsonl", [RECORD, RECORD])
        self.prompts = _write_jsonl(tmp / "p.jsonl", [{"query": "sort 21:"}, {"query": "sort 12:"}])

    def argv(self, command: str) -> list[str]:
        m, d, p, o = str(self.model), str(self.data), str(self.prompts), str(self.out)
        cpu = ["--device", "cpu"]
        train = ["--model", m, "--data", d, "--output-dir", o, *cpu, "--max-steps", "1", "--log-every", "0",
                 "--no-plot"]  # fmt: skip
        return {
            "train": ["train", *train],
            "train-rm": ["train-rm", *train],
            "ref-logps": ["ref-logps", "--model", m, "--in", d, "--out", str(self.out / "r.jsonl"), *cpu],
            "sample": ["sample", "--model", m, "--prompts", p, "-k", "2", "--max-new-tokens", "2",
                       "--out", str(self.out / "s.jsonl"), *cpu],
            "score": ["score", "--in", d, "--scorer", f"reward-model:{m}", "--overwrite",
                      "--out", str(self.out / "s.jsonl"), *cpu],
            "iterate": ["iterate", "--output-dir", o, "--prompts", p, "--scorer",
                        f"python:{self.scorer}:length", "--model", m, "--rounds", "1",
                        "--num-candidates", "2", "--sample-max-new-tokens", "2", *cpu],
            "merge": ["merge", "--checkpoint", str(self.adapter), "--base", m, "--out", o],
            "inspect": ["inspect", "--model", m, "--data", d],
            "plan": ["plan", "--model", m],
        }[command]  # fmt: skip


# -------------------------------------------------------------------------------------------------
# the faults: each damages a Case and says what the sentence must name


def _weights(case: Case) -> Path:
    return case.model / "model.safetensors"


def empty_safetensors(case):
    _weights(case).write_bytes(b"")
    return [f"{case.model}: model.safetensors cannot be read", "corrupt, truncated or empty"]


def truncated_safetensors(case):
    data = _weights(case).read_bytes()
    _weights(case).write_bytes(data[: len(data) // 2])
    return [f"{case.model}: model.safetensors cannot be read", "corrupt, truncated or empty"]


def corrupt_safetensors(case):
    data = bytearray(_weights(case).read_bytes())
    data[8:40] = b"x" * 32
    _weights(case).write_bytes(bytes(data))
    return [f"{case.model}: model.safetensors cannot be read", "corrupt, truncated or empty"]


def crafted_bin(case):
    state = {"model.embed_tokens.weight": _Payload()}
    _weights(case).unlink()
    torch.save(state, case.model / "pytorch_model.bin")
    return [f"{case.model}: pytorch_model.bin cannot be read", "refused without running it"]


def corrupt_adapter(case):
    case.adapter = shutil.copytree(case.adapter, case.tmp / "adapter")
    (case.adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return [f"--checkpoint {case.adapter}: adapter_model.safetensors cannot be read", "corrupt, truncated"]


def config_not_json(case):
    (case.model / "config.json").write_text("{not json", encoding="utf-8")
    return [str(case.model)]


def _gguf(case, name: str, data: bytes) -> list[str]:
    """--model (--base, reward-model:) a damaged copy of a good tiny GGUF file."""
    case.model = case.tmp / name
    case.model.write_bytes(data)
    return [str(case.model)]


def gguf_truncated(case):
    return _gguf(case, "cut.gguf", case.gguf.read_bytes()[:64]) + ["from this GGUF file", "unpack"]


def gguf_tensors_cut(case):
    data = case.gguf.read_bytes()
    return _gguf(case, "short.gguf", data[: len(data) - 3000]) + ["from this GGUF file"]


def gguf_not_gguf(case):
    return _gguf(case, "fake.gguf", b"PK\x03\x04" + case.gguf.read_bytes()[4:]) + ["not a GGUF file"]


def gguf_unknown_architecture(case):
    import gguf

    writer = gguf.GGUFWriter(case.tmp / "arch.gguf", "no-such-arch")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_eos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    case.model = case.tmp / "arch.gguf"
    return [str(case.model), "from this GGUF file", "architecture no-such-arch is not supported"]


def gguf_missing(case):
    case.model = case.tmp / "absent.gguf"
    return [str(case.model), "no such file"]


def gguf_without_the_package(case):
    import sys

    case.model = shutil.copy(case.gguf, case.tmp / "tiny.gguf")
    case.monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    return [str(case.model), "needs the gguf package", "pip install 'rrhf-fast[gguf]'"]


GGUF_FAULTS = (gguf_truncated, gguf_tensors_cut, gguf_not_gguf, gguf_unknown_architecture, gguf_missing,
               gguf_without_the_package)  # fmt: skip


def out_under_a_file(case):
    blocker = case.tmp / "a-file"
    blocker.write_text("x")
    case.out = blocker / "out"
    return [f"under {blocker}, a file"]


def out_under_proc(case):
    case.out = Path("/proc/rrhf-fast-no-such/out")
    return [str(case.out)]


def mixed_folder(case):
    folder = case.tmp / "shards"
    folder.mkdir()
    case.data.rename(folder / "train.jsonl")
    (folder / "README.md").write_text("# notes\n")  # skipped, as datasets skips it
    (folder / "meta.json").write_text('{"source": "x"}\n')
    case.data = folder
    return [str(folder / "meta.json"), "a folder of shards holds one format"]


def surrogate(record: dict, field: str | None, words: str = "lone UTF-16 surrogate"):
    """A record whose `field` holds a lone surrogate, on line 2 of the data and of the prompts."""

    def fault(case):
        text = json.dumps(record)  # ensure_ascii: the file holds the escape "\ud800", as JSON allows
        assert "\\ud800" in text
        for path in (case.data, case.prompts):
            first = path.read_text(encoding="utf-8").splitlines()[0]
            path.write_text(first + "\n" + text + "\n", encoding="utf-8")
        return [f"{{file}}:2: field {field!r}" if field else "{file}:2:", words]

    return fault


S = "a\ud800"
SURROGATES = {
    "rrhf-query": surrogate({**RECORD, "query": S}, "query"),
    "rrhf-response": surrogate({**RECORD, "responses": ["x", S]}, "responses"),
    "rrhf-message": surrogate({**RECORD, "query": [{"role": "user", "content": S}]}, "query"),
    "rrhf-role": surrogate({**RECORD, "query": [{"role": S, "content": "x"}]}, "query", "message 0 has role"),
    "rrhf-meta": surrogate({**RECORD, "meta": S}, "meta"),
    "rrhf-meta-nested": surrogate({**RECORD, "meta": {"tags": ["ok", S]}}, "meta"),
    "rrhf-field-name": surrogate({**RECORD, S: 1}, None),
    "pair-prompt": surrogate({"prompt": S, "chosen": "b", "rejected": "c"}, "prompt"),
    "pair-chosen": surrogate({"prompt": "a", "chosen": S, "rejected": "c"}, "chosen"),
    "pair-rejected-message": surrogate(
        {"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": S}]}, "rejected"
    ),
    "implicit-chosen": surrogate(
        {"chosen": "\n\nHuman: x\n\nAssistant: " + S, "rejected": "\n\nHuman: x\n\nAssistant: b"}, "chosen"
    ),  # fmt: skip
    "implicit-meta": surrogate(
        {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b", "id": S}, "id"
    ),  # fmt: skip
    "ranked-completion": surrogate({"prompt": "a", "completions": ["b", S], "scores": [1, 0]}, "completions"),
    "prompt-only": surrogate({"prompt": S}, "prompt"),
}

WEIGHTS = ("train", "train-rm", "ref-logps", "sample", "score", "iterate", "merge")
OUTPUTS = ("train", "train-rm", "ref-logps", "sample", "score", "iterate", "merge")
DATA = ("train", "train-rm", "ref-logps", "score", "inspect")
PROMPTS = ("sample", "iterate")
# Which prompt-file shapes the prompt-reading commands see: every record shape is also a prompt
# record (its prompt is sampled from), and TRL's prompt-only shape is one too.
TABLE = (
    [(c, f) for f in (empty_safetensors, truncated_safetensors, corrupt_safetensors, crafted_bin)
     for c in WEIGHTS]
    + [(c, config_not_json) for c in (*WEIGHTS, "inspect", "plan")]
    + [("merge", corrupt_adapter)]
    + [(c, f) for f in GGUF_FAULTS for c in (*WEIGHTS, "inspect", "plan")]
    + [(c, f) for f in (out_under_a_file, out_under_proc) for c in OUTPUTS]
    + [(c, mixed_folder) for c in DATA]
    + [(c, name) for name in SURROGATES for c in (*DATA, *PROMPTS)
       if name != "prompt-only" or c in PROMPTS]
)  # fmt: skip


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize(
    "command, fault",
    [pytest.param(c, f, id=f"{c}-{f if isinstance(f, str) else f.__name__}") for c, f in TABLE],
)
def test_every_command_turns_every_bad_input_into_one_sentence(
    tmp_path, good, capsys, monkeypatch, command, fault
):
    monkeypatch.setenv("RRHF_FAST_TEST_MARKER", str(tmp_path / "pwned"))
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path, good)
    case.monkeypatch = monkeypatch
    damage = SURROGATES[fault] if isinstance(fault, str) else fault
    file = case.prompts if command in PROMPTS else case.data
    names = [name.replace("{file}", str(file)) for name in damage(case)]
    before = _files(tmp_path)
    capsys.readouterr()
    code = main(case.argv(command))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"rrhf-fast {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    assert _files(tmp_path) == before  # nothing written, nothing created, no crafted pickle run
