"""What a run's flags resolved to, saved beside them (docs/DESIGN.md §10: every run saves its
resolved config).

config.json keeps the flags as given, `auto` included, so that `--resume` and `iterate` can pass
them on unchanged. run.json (in the run directory and in every checkpoint) says what actually ran:
the attention backend and kernel that `auto` picked, the weight and autocast dtypes, the device and
world size, the learning-rate schedule (total and warmup steps), a fingerprint of the training
data, and the versions of torch, triton, transformers and rrhf-fast, with the GPU's name.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rrhf_fast import __version__
from rrhf_fast.kernels import auto as kernels_auto
from rrhf_fast.models import attention
from rrhf_fast.models.wrapping import unwrap

RUN_FILE = "run.json"
_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "torchao", "flash-attn")


def resolved_settings(
    config: Any, model: Any, device: torch.device, world: int, schedule: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """The values a run uses for the flags that leave a choice (JSON-able)."""
    base = unwrap(model)
    text = base.config.get_text_config()
    softcapped = getattr(text, "attn_logit_softcapping", None) is not None
    trainable = sorted({_name(p.dtype) for p in model.parameters() if p.requires_grad})
    head = base.get_output_embeddings() or getattr(base, "score", None)  # a reward model: its score head
    return {
        "attn": attention.resolve_backend(config.attn, device, softcapped),
        "kernels": kernels_auto.describe(config.kernels, device),
        "weight_dtype": _name(base.get_input_embeddings().weight.dtype),
        "lm_head_dtype": _name(head.weight.dtype),
        "trainable_dtypes": trainable,
        "quantization": "4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None,
        "autocast_dtype": "bfloat16" if device.type == "cuda" else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "world_size": world,
        "schedule": dict(schedule),
        "data": dict(data),
        "versions": versions(),
    }


def versions() -> dict[str, str | None]:
    """Installed versions of rrhf-fast and the libraries a run's numbers depend on (None: absent)."""
    found: dict[str, str | None] = {"rrhf_fast": __version__, "torch": torch.__version__}
    for name in _PACKAGES[1:]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_run_info(path: str | os.PathLike, info: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def save_run_config(out: str | os.PathLike, kind: str, settings: dict[str, Any]) -> Path:
    """Write `settings` with the versions and the time beside `out` as `<stem>.<kind>.json` (what
    `rrhf-fast sample` and `score` ran with)."""
    path = Path(out).with_suffix(f".{kind}.json")
    record = {
        "command": f"rrhf-fast {kind}",
        "settings": settings,
        "versions": {**versions(), "python": platform.python_version()},
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
