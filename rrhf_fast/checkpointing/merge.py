"""`rrhf-fast merge`: fold a LoRA run's adapter into its base model, a plain model for anyone to load.

    rrhf-fast merge --checkpoint runs/x/checkpoint-1000 --out merged/ [--base PATH] [--dtype bfloat16]

The base is the run's `--model` (from the checkpoint's train_config.json, else the adapter's own
config) unless `--base` names another copy of it. It is loaded unquantised even for a QLoRA run:
merging into 4-bit weights would round the sum back to 4 bits, so the merged model is the
adapter's function on the full-precision base (the usual practice for QLoRA adapters). The result,
`model.merge_and_unload()`, is saved with save_pretrained beside the run's tokenizer and a model
card (README.md: the checkpoint's, with a line on the merge and a load snippet for the full model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rrhf_fast.checkpointing.checkpoint import ADAPTER_CONFIG, CONFIG_FILE, MARKER, verify_checkpoint
from rrhf_fast.data.outputs import make_output_dir, remove_created
from rrhf_fast.errors import UserError, first_line
from rrhf_fast.models.loading import (
    import_peft,
    load_tokenizer,
    peft_quietly,
    pretrained,
    quiet_progress_bars,
    reading_model,
)
from rrhf_fast.reporting.model_card import CARD_FILE, merged_card

# auto keeps the dtype the base was saved in (neither inference's nor training's auto).
MERGE_DTYPES = ("auto", "float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="DIR", help="a LoRA run's checkpoint directory")
    add("--out", required=True, metavar="DIR", help="where the merged model goes (a new or empty directory)")
    add("--base", metavar="PATH", help="the base model (default: the run's --model)")
    add(
        "--dtype",
        choices=MERGE_DTYPES,
        default="auto",
        help="merged weights' dtype (auto: the base's saved dtype)",
    )


def main(args: argparse.Namespace) -> int:
    out = merge(args.checkpoint, args.out, base=args.base, dtype=args.dtype)
    print(f"merged model in {out}")
    return 0


def merge(checkpoint: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge the adapter of `checkpoint` into its base model and save model + tokenizer to `out`."""
    if not str(out).strip():  # Path("") is "."
        raise UserError("--out is empty; give a new directory for the merged model")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise UserError(
            f"--checkpoint {checkpoint}: no such directory; give a checkpoint-N directory of a run"
        )
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"--checkpoint {checkpoint} holds no LoRA adapter ({ADAPTER_CONFIG}): it is a full model "
            "already, load it with from_pretrained"
        )
    if (checkpoint / MARKER).is_file():
        verify_checkpoint(checkpoint, "--checkpoint ")
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError:  # a name too long for the file system: make_output_dir says so
        taken = False
    if taken:
        raise UserError(f"--out {out} exists and is not an empty directory; give a new directory")
    base = base or _base_of(checkpoint)
    created = make_output_dir(out, "--out")
    try:
        _merge_into(checkpoint, out, base, dtype)
    except BaseException:
        remove_created(created)
        raise
    return out


def _merge_into(checkpoint: Path, out: Path, base: str, dtype: str) -> None:
    reward = _task_of(checkpoint) == "SEQ_CLS"
    model = _load_base(base, dtype, reward=reward)
    peft = import_peft()
    with reading_model("--checkpoint", str(checkpoint), "its LoRA adapter"):  # a corrupt adapter file
        try:
            with peft_quietly():
                adapted = peft.PeftModel.from_pretrained(model, checkpoint)
        except (ValueError, RuntimeError, KeyError) as err:
            raise UserError(
                f"--checkpoint {checkpoint}: its adapter does not fit --base {base} ({first_line(err)}); "
                "give the base model the run was trained from"
            ) from None
    merged = adapted.merge_and_unload()
    with quiet_progress_bars():
        merged.save_pretrained(out)
    tokenizer_dir = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else Path(base)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(out)
    (out / CARD_FILE).write_text(merged_card(checkpoint, out, base, dtype, reward), encoding="utf-8")


def _base_of(checkpoint: Path) -> str:
    """The run's --model, else the base peft recorded in the adapter config."""
    for name, key in ((CONFIG_FILE, "model"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        try:
            value = json.loads((checkpoint / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            continue
        if value:
            return value
    raise UserError(f"--checkpoint {checkpoint} does not name its base model; pass --base PATH")


def _task_of(checkpoint: Path) -> str | None:
    """peft's task type of the adapter: SEQ_CLS for a `train-rm` run (a reward model)."""
    try:
        return json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError):
        return None


def _load_base(base: str, dtype: str, reward: bool = False):
    """The base the adapter goes on: the causal LM, or for a reward model's adapter the one-label
    sequence-classification model built on it (its score head is in the adapter, trained whole)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    auto, extra, what = AutoModelForCausalLM, {}, "a causal LM"
    if reward:
        auto, extra, what = AutoModelForSequenceClassification, {"num_labels": 1}, "a reward model"
    return pretrained(auto, base, "--base", what, dtype=torch_dtype, **extra)
