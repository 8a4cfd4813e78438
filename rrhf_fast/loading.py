"""Load the model and tokenizer a run trains, from `--model` (a save_pretrained directory or hub id).

`load_model` is the one place that decides how the weights come in (dtype, device, gradient
checkpointing); adapters and 4-bit quantisation (`--lora-r`, `--load-in-4bit`) plug in here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} but this machine has no CUDA GPU (torch sees none); use --device cpu"
        )
    return device


def weight_dtype(name: str) -> torch.dtype:
    """auto -> float32: master weights in fp32, bf16 only inside autocast on CUDA."""
    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    _check_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model}: cannot load its tokenizer ({_first_line(err)})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {model}: the tokenizer has no EOS token; responses need one to end")
    return tokenizer


def load_model(config: Any, device: torch.device) -> torch.nn.Module:
    """The causal LM of `config.model` on `device`, in training mode, ready for packed_logprobs."""
    from transformers import AutoModelForCausalLM

    if config.lora_r or config.load_in_4bit:
        raise UserError(
            "--lora-r and --load-in-4bit are not supported yet; train the full model without them"
        )
    _check_model_path(config.model)
    try:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=weight_dtype(config.dtype))
    except (OSError, ValueError) as err:
        raise UserError(
            f"--model {config.model}: cannot load a causal LM ({_first_line(err)}); give a directory "
            "saved with save_pretrained or a hub id this machine can download"
        ) from None
    model.to(device)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        # Non-reentrant: works with inputs that need no grad and with autocast (PyTorch's advice).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def _check_model_path(model: str) -> None:
    """A path-looking --model that does not exist is a typo, not a hub id: say so at once."""
    looks_local = (
        model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1
    )
    if looks_local and not Path(model).expanduser().is_dir():
        raise UserError(f"--model {model}: no such directory; give a save_pretrained directory or a hub id")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


@contextlib.contextmanager
def quiet_progress_bars():
    """from_pretrained / save_pretrained draw progress bars: noise around our own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
