"""TrainConfig: the single source of `rrhf-fast train`'s flags, saved as JSON with every run.

Each dataclass field is one kebab-case flag (`micro_batch_tokens` -> `--micro-batch-tokens`); its
`help` and `choices` live in the field's metadata, so the parser, the saved JSON and the code that
reads the config cannot drift apart. Fields without a default are required flags. A renamed field
keeps its old flag as an alias (metadata `aliases`) and its old JSON key readable (RENAMED_FIELDS),
so old command lines, config.json files and checkpoints keep working.

The fields are grouped in sections (SECTIONS: data, batching, optimizer, loss, model, distributed,
run), as torchtitan's config is: `train --help` lists each section as an argument group,
`config.sections.optimizer` is that section as a dataclass of its own (OptimizerSection), and
`TrainConfig.from_sections(...)` builds a config from sections. TrainConfig itself stays one flat
dataclass (docs/DESIGN.md §10 says why): `TrainConfig(lr=...)`, `config.lr`,
`dataclasses.replace(config, lr=...)` and the flat config.json of every earlier release work as
they did; a config.json in sections loads too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_fast.errors import UserError
from rrhf_fast.kernels.constants import IMPLS, MODES, SFT_REDUCTIONS

OPTIMIZERS = ("adamw8bit", "paged-adamw8bit", "adamw")
# The attention backends (models/attention.py reads this tuple): defined here, where parsing the
# flags needs it without importing transformers.
ATTN_BACKENDS = ("auto", "varlen", "flex", "dense")
# Training's --dtype: auto keeps fp32 master weights (models.loading.INFERENCE_DTYPES is another set).
WEIGHT_DTYPES = ("auto", "float32", "bfloat16")
BF16_UPDATES = ("nearest", "stochastic", "kahan")  # optimizers/bf16_update.py
LOSSES = ("rrhf", "dpo", "dpo-pl", "lipo", "pro", "simpo", "orpo", "rm")
REFERENCE_LOSSES = ("dpo", "dpo-pl", "lipo")  # need ref_logps in the data (`rrhf-fast ref-logps`)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")  # = objectives.ranking.DPO_LOSSES, TRL's loss_type names
PAIRS = ("all", "best")  # = objectives.ranking.PAIRS
RM_LOSSES = ("bt", "listwise")  # = objectives.reward.RM_LOSSES (the math lives there)
# --report-to: Hugging Face Trainer's names of the trackers we report to (reporting/tracking.py), with
# its `none` (the default of transformers >= 5, and ours) and `all` (every installed one).
REPORT_TO = ("none", "all", "tensorboard", "wandb", "trackio", "mlflow")
# Old JSON key -> field, for config.json / train_config.json written before the rename.
RENAMED_FIELDS = {"loss_impl": "kernels", "mode": "length_norm"}


# The sections of TrainConfig, in `train --help`'s order: name -> (what it holds, its fields). A
# table beside the class, not a reordering of it: the field order is TrainConfig's signature
# (tests/api_snapshot.json) and config.json's key order. tests/test_config.py checks that every
# field is in exactly one section; a field in none would still get its flag, under "other".
SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "data": ("what to train and evaluate on, and how its records become tokens", (
        "data", "eval_data", "data_split", "eval_split", "query_field", "responses_field", "scores_field",
        "max_prompt_len", "max_response_len", "chat_template")),
    "batching": ("how long and how big: steps, epochs, micro-batches", (
        "max_steps", "epochs", "micro_batch_tokens", "grad_accum", "queries_per_step")),
    "optimizer": ("the optimizer, its learning-rate schedule and its update", (
        "lr", "min_lr", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "max_bad_steps",
        "optim_in_backward", "offload_optimizer", "bf16_update")),
    "loss": ("the objective and its weights (docs/losses.md; docs/DESIGN.md §4)", (
        "loss", "dpo_beta", "dpo_loss", "dpo_label_smoothing", "lipo_beta", "pro_sft_weight",
        "pro_temperature", "simpo_beta", "simpo_gamma", "orpo_lambda", "pairs", "length_norm",
        "length_penalty", "rank_weight", "sft_weight", "sft_reduction", "rm_loss", "rm_margin",
        "rm_margin_scale", "rm_center")),
    "model": ("the model, its kernels and memory: dtype, LoRA, quantisation, checkpointing, fit check", (
        "model", "attn", "kernels", "dtype", "device", "gradient_checkpointing", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit", "fit_check")),
    "distributed": ("under torchrun: how the ranks share the model", ("fsdp",)),
    "run": ("the run directory, checkpoints, resume, logging and trackers", (
        "output_dir", "eval_every", "seed", "resume", "save_every", "keep_checkpoints", "log_every", "plot",
        "report_to", "run_name", "project")),
}  # fmt: skip


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field whose flag's help (and optional `choices`, `metavar`) live in its metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def required(help: str, **meta: Any) -> Any:
    """A config field without a default: a required flag."""
    return field(metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every flag of `rrhf-fast train`, one field each; grouped in SECTIONS (`config.sections`)."""

    # ---- inputs and outputs
    model: str = required("model directory saved with save_pretrained, or a hub id", metavar="PATH")
    data: str = required(
        "training data: JSONL/JSON/parquet/CSV/arrow file, folder of shards or saved dataset, of "
        "{query, responses, scores}, {prompt, chosen, rejected}, {chosen, rejected} or "
        "{prompt, completions, scores} records (docs/data.md)",
        metavar="PATH",
    )
    output_dir: str = required("run directory: config, metrics.jsonl, curves.png, checkpoints", metavar="DIR")
    eval_data: str | None = opt(
        None, "held-out data in the training format, for ranking accuracy", metavar="PATH"
    )
    eval_every: int = opt(0, "evaluate every N steps (0: only before and after training)")
    data_split: str = opt("train", "split of a DatasetDict folder (or of shards named by split) for --data")
    eval_split: str = opt(
        "test", "split of a DatasetDict folder (or of shards named by split) for --eval-data"
    )
    query_field: str = opt("query", "column holding the query (a string or a list of messages)")
    responses_field: str = opt("responses", "column holding the list of responses")
    scores_field: str = opt("scores", "column holding the list of scores")
    # ---- how long, how big
    max_steps: int | None = opt(None, "optimizer steps to train (default: --epochs passes over the data)")
    epochs: int = opt(1, "passes over the data when --max-steps is not given")
    micro_batch_tokens: int = opt(4096, "token budget of one packed micro-batch (memory knob)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (when --queries-per-step is not given)")
    queries_per_step: int | None = opt(
        None, "queries per optimizer step, split into micro-batches by --micro-batch-tokens"
    )
    max_prompt_len: int | None = opt(
        None,
        "keep N prompt tokens: its leading special tokens, the end of its text, the generation prompt",
    )
    max_response_len: int | None = opt(
        None, "keep N response tokens: the start of its text and its EOS / end of turn"
    )
    chat_template: bool = opt(
        False,
        "wrap plain-string queries and responses in the tokenizer's chat template (conversations always are)",
    )
    # ---- optimization
    lr: float = opt(2e-5, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int | None = opt(None, "linear warmup steps (default: 3%% of the steps)")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    optim: str = opt("adamw8bit", "optimizer", choices=OPTIMIZERS)
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row (each one is skipped)")
    optim_in_backward: bool = opt(
        False,
        "update each weight in the backward and free its gradient (no whole-model gradient "
        "buffer; with --max-grad-norm, two forward+backward passes a step)",
    )
    offload_optimizer: bool = opt(
        False,
        "keep the optimizer states, fp32 master weights and the step in host memory; gradients leave "
        "the GPU as the backward makes them (one GPU; costs a CPU optimizer step)",
    )
    bf16_update: str = opt(
        "nearest",
        "--dtype bfloat16 full fine-tuning: how fp32 updates round into the bf16 weights "
        "(stochastic: unbiased, no extra memory; kahan: +2 bytes a weight)",
        choices=BF16_UPDATES,
    )
    # ---- the loss (docs/DESIGN.md §4)
    loss: str = opt(
        "rrhf",
        "the objective (docs/losses.md): rrhf; with a reference (data needs ref_logps): dpo (best vs "
        "worst), dpo-pl (listwise DPO), lipo (LiPO-lambda); without: pro, simpo, orpo; rm: train a reward "
        "model (what `rrhf-fast train-rm` runs)",
        choices=LOSSES,
    )
    dpo_beta: float = opt(
        0.1, "--loss dpo / dpo-pl: beta, the pull towards the reference model", losses=("dpo", "dpo-pl")
    )
    dpo_loss: str = opt(
        "sigmoid", "--loss dpo: the pair's loss, as TRL's DPOTrainer loss_type (dpo-pl: sigmoid only)",
        choices=DPO_LOSSES, losses=("dpo",),
    )  # fmt: skip
    dpo_label_smoothing: float = opt(
        0.0,
        "--dpo-loss robust: the probability that a preference label is flipped, in [0, 0.5)",
        losses=("dpo",),
    )
    lipo_beta: float = opt(0.05, "--loss lipo: beta of the rewards beta * log(pi / pi_ref)", losses=("lipo",))
    pro_sft_weight: float = opt(
        0.05,
        "--loss pro: the weight of the SFT term (the best response's log-prob sum) is this times (k - 1)^2",
        losses=("pro",),
    )
    pro_temperature: bool = opt(
        False, "--loss pro: scale the scores by the paper's score-gap temperature", losses=("pro",)
    )
    simpo_beta: float = opt(
        2.0, "--loss simpo: beta, the scale of the length-normalised reward", losses=("simpo",)
    )
    simpo_gamma: float = opt(0.5, "--loss simpo: gamma, the target reward margin", losses=("simpo",))
    orpo_lambda: float = opt(
        0.1, "--loss orpo: lambda, the weight of the odds-ratio loss beside SFT", losses=("orpo",)
    )
    pairs: str = opt(
        "all", "--loss simpo / orpo with k > 2: every pair of different scores, or the best vs each other",
        choices=PAIRS, losses=("simpo", "orpo"),
    )  # fmt: skip
    length_norm: str = opt(
        "paper",
        "length normalisation of response scores and SFT: paper (each response's own length), or "
        "official (the authors' code: prompt + longest response)",
        choices=MODES,
        aliases=("mode",),
    )
    length_penalty: float = opt(1.0, "response score = sum of log-probs / length ** length_penalty")
    rank_weight: float = opt(1.0, "weight of the ranking loss (0: SFT only)")
    sft_weight: float = opt(1.0, "weight of the SFT loss on the best-scored response")
    sft_reduction: str = opt(
        "mean", "SFT loss of the best response: token mean, or the paper's sum", choices=SFT_REDUCTIONS
    )
    # ---- the reward model's loss (train-rm; objectives/reward.py)
    rm_loss: str = opt(
        "bt", "Bradley-Terry over every pair of different scores, or listwise Plackett-Luce (ties grouped)",
        choices=RM_LOSSES, losses=("rm",),
    )  # fmt: skip
    rm_margin: float = opt(
        0.0, "the margin the better response's reward must clear (--rm-loss bt)", losses=("rm",)
    )
    rm_margin_scale: bool = opt(False, "multiply --rm-margin by each pair's score gap", losses=("rm",))
    rm_center: float = opt(
        0.0, "weight of the penalty on each query's mean reward squared (0: none)", losses=("rm",)
    )
    # ---- model and kernels
    attn: str = opt("auto", "attention backend for the shared-prompt packing", choices=ATTN_BACKENDS)
    kernels: str = opt(
        "auto",
        "implementation of the fused token log-prob and RRHF loss kernels",
        choices=IMPLS,
        aliases=("loss-impl",),
    )
    dtype: str = opt(
        "auto",
        "weight dtype; auto: float32 weights (bf16 autocast on CUDA, fp32 on CPU)",
        choices=WEIGHT_DTYPES,
    )
    device: str = opt("auto", "cuda, cpu, cuda:1, ... (auto: cuda when available)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward to save memory")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapter's update is scaled by alpha / r")
    lora_dropout: float = opt(0.05, "dropout on the input of the LoRA adapters")
    lora_target_modules: str = opt(
        "all-linear", "comma-separated module names to adapt (all-linear: every decoder linear, not lm_head)"
    )
    load_in_4bit: bool = opt(False, "load the base model in 4-bit NF4 (QLoRA; needs --lora-r)")
    load_in_8bit: bool = opt(False, "load the base model in 8-bit (LLM.int8; needs --lora-r)")
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimizer states (FSDP2), not DDP")
    fit_check: bool = opt(
        True,
        "on CUDA, plan the step (rrhf-fast plan, seconds) before loading the weights and stop if it "
        "cannot fit the GPU's free memory; --no-fit-check skips it",
    )
    # ---- bookkeeping
    seed: int = opt(0, "seed of the data order and of every random number generator")
    resume: bool = opt(False, "continue from the last complete checkpoint in --output-dir")
    save_every: int = opt(500, "save a checkpoint every N steps (and always at the end; 0: only at the end)")
    keep_checkpoints: int = opt(2, "keep the N newest checkpoints")
    log_every: int = opt(10, "print a metrics line every N steps (metrics.jsonl gets every step)")
    plot: bool = opt(True, "draw curves.png at the end of training")
    report_to: tuple[str, ...] = opt(
        (),
        "experiment trackers to report config, run.json and metrics to, as HF Trainer's report_to: "
        f"{', '.join(REPORT_TO)}; several allowed (default: none)",
        metavar="NAME",
        nargs="+",
    )
    run_name: str | None = opt(None, "the tracked run's name (default: the --output-dir's name)")
    project: str = opt(
        "huggingface", "trackio project and MLflow experiment (wandb: WANDB_PROJECT), as HF Trainer's"
    )

    # ------------------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise UserError on impossible values or flag combinations; return self."""
        for f in dataclasses.fields(self):  # argparse's float() takes "nan" and "inf"
            value = getattr(self, f.name)
            if f.type == "float" and not abs(value) < float("inf"):
                raise UserError(f"--{_flag(f.name)} must be a finite number, got {value}")
        positive = ("micro_batch_tokens", "grad_accum", "epochs", "keep_checkpoints", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "queries_per_step", "max_prompt_len", "max_response_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {value}")
        for name in ("eval_every", "save_every", "log_every", "warmup_steps", "lora_r"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{_flag(name)} must be 0 or more, got {value}")
        non_negative = ("lr", "min_lr", "weight_decay", "max_grad_norm", "rank_weight", "sft_weight")
        for name in (*non_negative, "rm_center"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{_flag(name)} must be a non-negative number, got {getattr(self, name)}")
        choice_fields = ("loss", "optim", "length_norm", "sft_reduction", "attn", "kernels", "dtype")
        for name in (*choice_fields, "rm_loss", "bf16_update", "dpo_loss", "pairs"):
            choices = dataclasses.fields(self)[_index(name)].metadata["choices"]
            if getattr(self, name) not in choices:
                raise UserError(
                    f"--{_flag(name)} must be one of {', '.join(choices)}; got {getattr(self, name)!r}"
                )
        self._validate_ranking()
        if self.loss == "rm" and self.rm_loss == "listwise" and (self.rm_margin or self.rm_margin_scale):
            raise UserError("--rm-margin and --rm-margin-scale apply to --rm-loss bt only; drop them")
        if self.loss == "rrhf" and self.rank_weight == 0 and self.sft_weight == 0:
            raise UserError("--rank-weight and --sft-weight are both 0: there is nothing to train")
        if self.lr == 0:  # every update would be zero: a run that changes nothing, saved as trained
            raise UserError("--lr 0 leaves the weights as they are; give a positive --lr")
        if self.length_penalty < 0:  # the RRHF score would be sum * length ** |p|: not a normalisation
            got = self.length_penalty
            raise UserError(f"--length-penalty must be 0 or more (0: sums, 1: means), got {got}")
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is above --lr {self.lr}; give a smaller --min-lr")
        if self.queries_per_step is not None and self.grad_accum != 1:
            raise UserError(
                "--queries-per-step and --grad-accum both set the step size; give one of them "
                "(--queries-per-step splits its queries into micro-batches by --micro-batch-tokens)"
            )
        if self.eval_every and not self.eval_data:
            raise UserError("--eval-every needs --eval-data FILE (the held-out examples to evaluate on)")
        names = [n.strip() for name in self.report_to for n in str(name).split(",") if n.strip()]
        unknown = [n for n in names if n not in REPORT_TO]
        if unknown:
            raise UserError(f"--report-to {unknown[0]} is not a tracker; give {', '.join(REPORT_TO)}")
        if self.load_in_4bit and not self.lora_r:
            raise UserError("--load-in-4bit trains adapters on a frozen 4-bit model: also give --lora-r N")
        self._validate_scaling()
        self._validate_update()
        return self

    def _validate_ranking(self) -> None:
        """The flags of the ranking losses (objectives/ranking.py, listwise.py, pairwise.py)."""
        for name in ("dpo_beta", "lipo_beta", "simpo_beta"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be a positive number, got {getattr(self, name)}")
        for name in ("pro_sft_weight", "orpo_lambda", "simpo_gamma"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{_flag(name)} must be a non-negative number, got {getattr(self, name)}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            got = self.dpo_label_smoothing
            raise UserError(f"--dpo-label-smoothing must be in [0, 0.5), got {got}")
        if self.dpo_label_smoothing and self.dpo_loss != "robust":
            raise UserError(
                f"--dpo-label-smoothing applies to --dpo-loss robust only (as in TRL's DPOTrainer), not to "
                f"{self.dpo_loss}; drop it or give --dpo-loss robust"
            )
        if self.loss == "dpo-pl" and self.dpo_loss != "sigmoid":
            raise UserError(
                f"--loss dpo-pl is the Plackett-Luce generalisation of the sigmoid loss; --dpo-loss "
                f"{self.dpo_loss} has no listwise form here: drop --dpo-loss or use --loss dpo"
            )

    def _validate_update(self) -> None:
        """--optim-in-backward and --bf16-update."""
        if self.optim_in_backward and self.fsdp and not self.max_grad_norm:
            raise UserError(
                "--fsdp --optim-in-backward needs --max-grad-norm X: without the norm pass each rank "
                "would stop at a non-finite gradient of its own shard and the ranks' weights would differ"
            )
        if self.bf16_update != "nearest" and (self.dtype != "bfloat16" or self.lora_r):
            raise UserError(
                f"--bf16-update {self.bf16_update} rounds updates into bf16 weights trained in full: "
                "give --dtype bfloat16 without --lora-r (fp32 weights and LoRA adapters need no rounding)"
            )
        if self.offload_optimizer and (self.optim_in_backward or self.fsdp or self.bf16_update != "nearest"):
            other = "--optim-in-backward" if self.optim_in_backward else (
                "--fsdp" if self.fsdp else f"--bf16-update {self.bf16_update}")  # fmt: skip
            raise UserError(
                f"--offload-optimizer steps fp32 master weights on the host, which {other} does not "
                "combine with; drop one of them"
            )
        if self.bf16_update != "nearest" and self.fsdp:
            raise UserError(f"--bf16-update {self.bf16_update} is not supported with --fsdp yet; drop --fsdp")

    def _validate_scaling(self) -> None:
        """LoRA, quantisation and FSDP flags."""
        if self.load_in_8bit and not self.lora_r:
            raise UserError("--load-in-8bit trains adapters on a frozen 8-bit model: also give --lora-r N")
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("--load-in-4bit and --load-in-8bit exclude each other; give one of them")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        targets = [t.strip() for t in self.lora_target_modules.split(",")]
        if not all(targets):
            raise UserError(f"--lora-target-modules {self.lora_target_modules!r} has an empty name")
        if any(t.split(".")[-1] == "lm_head" for t in targets):
            raise UserError(
                "--lora-target-modules names lm_head: the fused log-prob kernel reads the lm_head weight "
                "directly and would miss its adapter; leave lm_head out"
            )
        if self.fsdp and (self.load_in_4bit or self.load_in_8bit):
            raise UserError(
                "--fsdp with a quantised base model is not supported; train QLoRA with DDP (drop --fsdp)"
            )
        if self.fsdp and self.optim == "paged-adamw8bit":
            raise UserError(
                "--optim paged-adamw8bit cannot step FSDP2's sharded parameters; with --fsdp use "
                "--optim adamw8bit (torchao's 8-bit AdamW) or --optim adamw"
            )

    def unread_loss_flags(self) -> list[str]:
        """The flags given (a value other than their default) that belong to another --loss than the
        chosen one, which therefore does not read them; each field's metadata `losses` names the
        losses that read it, beside its definition (objectives/ read these fields)."""
        unread = []
        for f in dataclasses.fields(self):
            losses = f.metadata.get("losses")
            if losses and self.loss not in losses and getattr(self, f.name) != f.default:
                unread.append(f"--{_flag(f.name)}" if f.type != "bool" or getattr(self, f.name) else
                              f"--no-{_flag(f.name)}")  # fmt: skip
        return unread

    @property
    def loss_impl(self) -> str:
        """The field's name before it became `kernels` (it picks both kernels, not only the loss's)."""
        return self.kernels

    @property
    def mode(self) -> str:
        """The field's name before it became `length_norm`."""
        return self.length_norm

    def data_options(self, split: str | None = None) -> dict[str, Any]:
        """load_examples' keywords: the column names, and the split (default --data-split)."""
        return dict(query_field=self.query_field, responses_field=self.responses_field,
                    scores_field=self.scores_field, split=split or self.data_split)  # fmt: skip

    def tokenizing(self) -> dict[str, Any]:
        """tokenize_examples' keywords: every flag that decides the tokens."""
        return dict(max_prompt_len=self.max_prompt_len, max_response_len=self.max_response_len,
                    chat_template=self.chat_template)  # fmt: skip

    @property
    def sections(self) -> Sections:
        """The config in its sections: `config.sections.optimizer.lr` is `config.lr`."""
        values = dataclasses.asdict(self)
        return Sections(**{name: cls(**{n: values[n] for n in SECTIONS[name][1]})
                           for name, cls in SECTION_TYPES.items()})  # fmt: skip

    @classmethod
    def from_sections(cls, **sections: Any) -> TrainConfig:
        """A config from sections (section dataclasses or dicts, by section name); a section left out
        keeps its defaults."""
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise UserError(
                f"unknown training config section(s) {unknown}; the sections: {', '.join(SECTIONS)}"
            )
        flat = {}
        for values in sections.values():
            flat.update(values if isinstance(values, dict) else dataclasses.asdict(values))
        return cls(**flat)

    def to_dict(self) -> dict[str, Any]:
        """Flat, as every release wrote config.json (`sections` gives them grouped)."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read the saved training config ({err})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """From config.json's keys: flat, as every release wrote them (renamed fields' old names
        included), or in sections ({"optimizer": {"lr": ...}, ...})."""
        if data and all(k in SECTIONS and isinstance(v, dict) for k, v in data.items()):
            data = {k: v for section in data.values() for k, v in section.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        data = {RENAMED_FIELDS.get(k, k) if k not in names else k: v for k, v in data.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{source}: unknown training config field(s) {unknown}")
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        data = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**data)
        except TypeError as err:
            raise UserError(f"{source}: incomplete training config ({err})") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return config_from_args(args, cls)


def _section_type(name: str) -> type:
    """Section `name` as a frozen dataclass of its own: TrainConfig's fields, defaults and help."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    specs = []
    for n in SECTIONS[name][1]:
        f = fields[n]
        kept = {
            k: getattr(f, k)
            for k in ("default", "default_factory")
            if getattr(f, k) is not dataclasses.MISSING
        }
        specs.append((n, f.type, field(metadata=f.metadata, **kept)))
    doc = f"TrainConfig's {name} section: {SECTIONS[name][0]}."
    return dataclasses.make_dataclass(f"{name.capitalize()}Section", specs, frozen=True, kw_only=True,
                                      namespace={"__doc__": doc, "__module__": __name__})  # fmt: skip


SECTION_TYPES: dict[str, type] = {name: _section_type(name) for name in SECTIONS}
DataSection, BatchingSection, OptimizerSection, LossSection, ModelSection, DistributedSection, RunSection = (
    SECTION_TYPES.values()
)
Sections = dataclasses.make_dataclass(
    "Sections", [(name, SECTION_TYPES[name]) for name in SECTIONS], frozen=True,
    namespace={"__doc__": "TrainConfig.sections: one dataclass per section.", "__module__": __name__},
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# argparse from the dataclass


def add_arguments(
    parser: Any, cls: type = TrainConfig, *, prefix: str = "", skip: Collection[str] = ()
) -> None:
    """One `--kebab-case` flag per field of the dataclass `cls` (but those in `skip`), named and
    stored as `prefix + field`, typed, with the help, choices and metavar of the field's metadata:
    a bool is a `--x` / `--no-x` switch, a tuple a repeatable flag, a field without a default a
    required flag. `parser` may be an argument group; on a parser, TrainConfig's flags are in one
    argument group per section (SECTIONS)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    groups = _section_groups(parser, [f.name for f in fields]) if cls is TrainConfig else {}
    for f in fields:
        name = prefix + f.name
        aliases = [f"--{_flag(prefix + alias)}" for alias in f.metadata.get("aliases", ())]
        target = groups.get(_SECTION_OF.get(f.name, "other"), parser)
        target.add_argument(f"--{_flag(name)}", *aliases, dest=name, **_argument(f, hints[f.name]))


_SECTION_OF = {n: name for name, (_, names) in SECTIONS.items() for n in names}


def _section_groups(parser: Any, names: list[str]) -> dict[str, Any]:
    """Section -> its argument group, in SECTIONS' order (not the fields'), for the sections that
    hold one of `names`; none inside a group (argparse deprecates nested groups)."""
    if not isinstance(parser, argparse.ArgumentParser):
        return {}
    used = {_SECTION_OF.get(n, "other") for n in names}
    described = {**{name: text for name, (text, _) in SECTIONS.items()}, "other": "fields in no section"}
    return {name: parser.add_argument_group(name, text) for name, text in described.items() if name in used}


def config_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "", **fixed: Any) -> Any:
    """`cls` from the flags `add_arguments(prefix=...)` made; `fixed` gives the skipped fields."""
    values = {f.name: fixed[f.name] if f.name in fixed else getattr(args, prefix + f.name)
              for f in dataclasses.fields(cls)}  # fmt: skip
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's keywords for one field."""
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
    base = _base_type(hint)
    if base is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction, "default": f.default}
    if typing.get_origin(base) is tuple:  # repeatable; with nargs "+" also several after one flag
        action = "extend" if "nargs" in f.metadata else "append"
        return {**kwargs, "action": action, "default": [], "metavar": f.metadata.get("metavar", "TEXT"),
                **({"nargs": f.metadata["nargs"]} if "nargs" in f.metadata else {})}  # fmt: skip
    kwargs.update(type=base, metavar=f.metadata.get("metavar", {int: "N", float: "X"}.get(base, "S")))
    if "choices" in f.metadata:
        kwargs.update(choices=f.metadata["choices"], metavar=None)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return {**kwargs, "required": True}
    kwargs["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if kwargs["default"] is not None:
        kwargs["help"] += " (default: %(default)s)"
    return kwargs


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; `str` -> str."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return hint


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _index(name: str) -> int:
    return [f.name for f in dataclasses.fields(TrainConfig)].index(name)
