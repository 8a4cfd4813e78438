"""GGUF files as models: `--model FILE.gguf` (and --base, --scorer reward-model:FILE.gguf, ...).

transformers reads a GGUF with the `gguf` package: `from_pretrained(folder, gguf_file=name)` builds
the config from the file's metadata, the tokenizer from its vocabulary, merges, special ids and chat
template, and the model from its tensors. We ask for every weight dequantised
(`GgufConfig(dequantize=True)`): training and the fused log-prob kernel need plain tensors, and
transformers >= 5.25 would otherwise keep quantised blocks in GgufLinear modules where a matmul
kernel exists. The loaded model still carries the GGUF quantizer and a `quantization_config`,
which make save_pretrained refuse it; `plain_model` drops both, so checkpoints and merged models
are ordinary safetensors folders that load without the `gguf` package.

`loading.py` is the only caller: every command's model, config and tokenizer come through it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from unittest import mock

from rrhf_fast.errors import UserError

SUFFIX = ".gguf"
_MAGIC = b"GGUF"
# The metadata a model card quotes (llama.cpp's general.* keys).
_CARD_KEYS = ("general.name", "general.license", "general.file_type", "general.base_model.0.repo_url",
              "general.source.repo_url", "general.source.huggingface.repository")  # fmt: skip


def is_gguf(path: Any) -> bool:
    """Whether `path` names a GGUF file (by its suffix; the file is checked by `check_file`)."""
    return str(path).lower().endswith(SUFFIX)


def check_file(path: str, named: str) -> None:
    """A GGUF path that is no file, a missing `gguf` package, or a file without the GGUF magic is a
    UserError before transformers is asked; `named` is how the error quotes the flag and path."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{named}: no such file; give a .gguf file, a save_pretrained directory or a hub id")
    if not _gguf_installed():
        raise UserError(
            f"{named}: reading a GGUF file needs the gguf package, which is not installed; "
            "install it with `pip install 'rrhf-fast[gguf]'` (or `pip install gguf`)"
        )
    with file.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise UserError(f"{named}: not a GGUF file (it does not start with the GGUF magic bytes)")


def _gguf_installed() -> bool:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def source(path: str) -> tuple[str, dict[str, Any]]:
    """What from_pretrained takes for the config and tokenizer of a GGUF file: its folder and
    `gguf_file=` its name."""
    file = Path(path).expanduser().resolve()
    return str(file.parent), {"gguf_file": file.name}


def model_kwargs() -> dict[str, Any]:
    """from_pretrained's extra arguments for the weights: all dequantised, none left in GGUF blocks."""
    from transformers import GgufConfig

    return {"quantization_config": GgufConfig(dequantize=True)}


def plain_model(model: Any, path: str) -> Any:
    """The model without its GGUF quantizer and quantization_config (the weights are plain already),
    named after the file it came from, so that save_pretrained writes an ordinary model."""
    model.hf_quantizer = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        vars(config).pop("_model_name_or_path", None)  # general.name, which the reader files there
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    return model


@contextlib.contextmanager
def quiet_dequantising():
    """transformers' GGUF reader draws a tqdm bar of its own ("Converting and de-quantizing GGUF
    tensors"), which its progress-bar switch does not reach: noise around our output."""
    from transformers import modeling_gguf_pytorch_utils as legacy

    with mock.patch.object(legacy, "tqdm", lambda iterable, **_: iterable):
        yield


def card_metadata(path: str) -> dict[str, Any]:
    """The general.* metadata a model card quotes: {key: value} of those the file has; {} when it
    cannot be read (the card is written after training: no reason to fail there)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(Path(path).expanduser())).fields
        return {k: fields[k].contents() for k in _CARD_KEYS if k in fields}
    except Exception:
        return {}


def hub_id(metadata: dict[str, Any]) -> str | None:
    """The Hugging Face repository the GGUF says it was converted from, if it says so."""
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url",
                "general.source.repo_url"):  # fmt: skip
        value = str(metadata.get(key) or "")
        prefix = "https://huggingface.co/"
        if value.startswith(prefix):
            value = value[len(prefix) :]
        if value.count("/") == 1 and not value.startswith(("http", "/")):
            return value.strip("/")
    return None
