"""The model card (README.md) of every checkpoint, in Hugging Face's format: YAML front matter that
the Hub and `huggingface_hub.ModelCard.load` read, then what a reader needs to trust and reuse it.

Front matter: `base_model` (the --model hub id; a local --model directory passes on the base_model
of its own card, as a checkpoint of an earlier run or round has one, a GGUF file the repository its
metadata names, else it is left out: a path is not a Hub name; the body names a GGUF file),
`library_name: rrhf-fast`, `tags` (rrhf-fast, the objective: rrhf, dpo or
reward-model; lora and peft for an adapter), `pipeline_tag`, the base model's `license` when its
card says it, and `datasets` when --data / --eval-data are Hub names rather than local paths.
Body: the command line (the flags that differ from the defaults), the loss and hyperparameters,
the data fingerprint and packing summary, the train and eval metrics at this checkpoint, the
library versions, and a transformers snippet that loads it. The load section comes last:
`rrhf-fast merge` replaces it (merged_card) for the merged model.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

from rrhf_fast.data.packing import describe_packing
from rrhf_fast.models import gguf

CARD_FILE = "README.md"
LOAD_HEADING = "## Load it"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OBJECTIVE_TAG = {"rrhf": "rrhf", "dpo": "dpo", "rm": "reward-model"}
# RRHF's own loss flags; every other objective's are the fields named after it (dpo_beta, rm_loss, ...)
_RRHF_FLAGS = ("length_norm", "length_penalty", "rank_weight", "sft_weight", "sft_reduction", "kernels")
_TRAINING_FLAGS = ("lr", "min_lr", "weight_decay", "max_grad_norm", "optim", "epochs", "max_steps",
                   "queries_per_step", "grad_accum", "micro_batch_tokens", "max_prompt_len",
                   "max_response_len", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "load_in_4bit", "load_in_8bit", "seed")  # fmt: skip


def model_card(
    config: Any, run: dict[str, Any], *, train: dict[str, Any], eval: dict[str, Any], step: int, adapter: bool
) -> str:
    """The README.md of checkpoint `step` of the run `config` configured and `run` (run.json) describes."""
    reward = config.loss == "rm"
    where = str(Path(config.output_dir) / f"checkpoint-{step}")
    body = [
        f"# {config.run_name or Path(config.output_dir).resolve().name} (step {step})",
        f"{config.model} trained with rrhf-fast, objective `{config.loss}`"
        + (" (a LoRA adapter)" if adapter else "")
        + ".",
        *([gguf_line(config.model)] if gguf.is_gguf(config.model) else []),
        "## Command line\n\n```bash\n" + command_line(config) + "\n```",
        "## Loss and hyperparameters\n\n" + _table(hyperparameters(config, run)),
        "## Data\n\n" + _data(run),
        f"## Metrics at step {step}\n\n" + _metrics(train, eval),
        "## Library versions\n\n" + _table(run.get("versions", {})),
        load_section(where, reward=reward, adapter=adapter),
    ]
    return _card(metadata(config, adapter), "\n\n".join(body))


def metadata(config: Any, adapter: bool) -> dict[str, Any]:
    base = _base_card(config.model)
    tags = ["rrhf-fast", _OBJECTIVE_TAG.get(config.loss, config.loss), *(["lora", "peft"] if adapter else [])]
    data = {
        "base_model": config.model if _is_hub_name(config.model) else base.get("base_model"),
        "library_name": "rrhf-fast",
        "tags": tags,
        "pipeline_tag": "text-classification" if config.loss == "rm" else "text-generation",
        "license": base.get("license"),
        "datasets": [d for d in (config.data, config.eval_data) if d and _is_hub_name(d)] or None,
    }
    return {k: v for k, v in data.items() if v is not None}


def gguf_line(path: str) -> str:
    """The card's line on a GGUF base: the file, and what its metadata calls the model."""
    meta = gguf.card_metadata(path)
    name = f" ({meta['general.name']})" if meta.get("general.name") else ""
    return (f"Base model: the GGUF file `{Path(path).name}`{name}, its weights dequantised when loaded "
            f"(`{path}`).")  # fmt: skip


def command_line(config: Any) -> str:
    """`rrhf-fast train` (train-rm for --loss rm) with the flags that differ from the defaults."""
    command = ["rrhf-fast", "train-rm" if config.loss == "rm" else "train"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in ("resume",) or (f.name == "loss" and value == "rm") or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            command += [flag, *map(str, value)] if value else []
        else:
            command += [flag, str(value)]
    return shlex.join(command)


def hyperparameters(config: Any, run: dict[str, Any]) -> dict[str, Any]:
    own = _RRHF_FLAGS if config.loss == "rrhf" else [f.name for f in dataclasses.fields(config)
                                                      if f.name.startswith(f"{config.loss}_")]  # fmt: skip
    schedule = run.get("schedule", {})
    values = {"loss": config.loss, **{n: getattr(config, n) for n in own}}
    values.update({n: getattr(config, n) for n in _TRAINING_FLAGS})
    values.update({f"schedule: {k}": v for k, v in schedule.items() if k in ("total_steps", "warmup_steps")})
    return values


def load_section(path: str, *, reward: bool, adapter: bool) -> str:
    head = "SequenceClassification" if reward else "CausalLM"
    if adapter:
        code = (f"from peft import AutoPeftModelFor{head}\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelFor{head}.from_pretrained({path!r})\n")  # fmt: skip
    else:
        code = (f"from transformers import AutoModelFor{head}, AutoTokenizer\n\n"
                f"model = AutoModelFor{head}.from_pretrained({path!r})\n")  # fmt: skip
    return f"{LOAD_HEADING}\n\n```python\n{code}tokenizer = AutoTokenizer.from_pretrained({path!r})\n```"


def merged_card(checkpoint: Path, out: Path, base: str, dtype: str, reward: bool) -> str:
    """`rrhf-fast merge`'s card: the adapter checkpoint's card (its front matter without the lora
    and peft tags, plus `merged`), a line on the merge, and a load section for the full model."""
    from huggingface_hub import ModelCard

    source = checkpoint / CARD_FILE
    card = ModelCard.load(source) if source.is_file() else None
    data = card.data.to_dict() if card is not None else {"library_name": "rrhf-fast", "tags": ["rrhf-fast"]}
    data["tags"] = [t for t in data.get("tags") or [] if t not in ("lora", "peft")] + ["merged"]
    if _is_hub_name(base):
        data["base_model"] = base
    text = card.text.split(f"\n{LOAD_HEADING}")[0].strip() if card is not None else f"# {out.name}"
    merged = f"## Merge\n\nThe LoRA adapter of `{checkpoint}` folded into `{base}` (dtype {dtype})."
    return _card(data, "\n\n".join([text, merged, load_section(str(out), reward=reward, adapter=False)]))


# -------------------------------------------------------------------------------------------------


def _card(data: dict[str, Any], body: str) -> str:
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body}\n"


def _base_card(model: str) -> dict[str, Any]:
    """The front matter of the base model's own card: a local directory's README.md, or for a Hub id
    the copy in the local Hugging Face cache (nothing is downloaded), or what a GGUF file's metadata
    says (its license, the Hub repository it was converted from); {} when there is none."""
    if gguf.is_gguf(model):
        meta = gguf.card_metadata(model)
        found = {"base_model": gguf.hub_id(meta), "license": meta.get("general.license")}
        return {k: v for k, v in found.items() if v}
    path = Path(model).expanduser() / CARD_FILE
    if not path.is_file() and _is_hub_name(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, CARD_FILE)
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a card that is not one (a plain README.md) has no metadata to pass on
        return {}


def _is_hub_name(name: str) -> bool:
    return bool(_HUB_NAME.match(name)) and not Path(name).expanduser().exists()


def _data(run: dict[str, Any]) -> str:
    data, packing = run.get("data", {}), run.get("packing")
    lines = [f"Fingerprint: {data.get('queries')} queries, {data.get('tokens')} packed tokens, "
             f"SHA-256 `{data.get('sha256')}`."]  # fmt: skip
    if packing:
        text = describe_packing(packing)
        lines.append(text[0].upper() + text[1:] + ".")
    return "\n\n".join(lines)


def _metrics(train: dict[str, Any], eval: dict[str, Any]) -> str:
    parts = [("train", train), (f"eval (step {eval.get('step')})", eval)]
    shown = [f"{name}:\n\n" + _table({k: v for k, v in row.items() if k != "step"})
             for name, row in parts if row]  # fmt: skip
    return "\n\n".join(shown) or "No metrics yet."


def _table(values: dict[str, Any]) -> str:
    rows = [f"| {k} | {_value(v)} |" for k, v in values.items()]
    return "\n".join(["| name | value |", "|---|---|", *rows])


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")
