"""`rrhf-fast train-rm`: train a reward model on scored responses, with `train`'s loop.

The same data formats, packing (each prompt once, its k responses after it), token-budget
micro-batches, --queries-per-step, optimizers, LoRA/QLoRA, gradient checkpointing, torchrun
DDP/FSDP2, atomic checkpoints with --resume, metrics.jsonl, curves.png and held-out evaluation as
`rrhf-fast train`: it is `train --loss rm` (objectives/reward.py), whose model is
`AutoModelForSequenceClassification` with one label built on --model (models/reward.py). The
flags that only shape RRHF's or DPO's loss are not offered. Each checkpoint is a save_pretrained
directory that `AutoModelForSequenceClassification.from_pretrained` loads (a LoRA run: the adapter
with its score head; `rrhf-fast merge` makes it whole), and `rrhf-fast score --scorer
reward-model:DIR` scores with it.

Metrics: loss, rm_loss, center_loss and margin (the mean reward gap of the pairs the scores
order), then accuracy (pairwise: the fraction of ordered pairs the rewards order the same way),
top1 (the fraction of queries whose highest reward is a highest-scored response) and best_reward
(the mean score of the response the reward model ranks first); held-out ones prefixed eval_.
"""

from __future__ import annotations

import argparse
import dataclasses

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig, config_from_args

# The TrainConfig fields of RRHF's and DPO's losses and of the log-prob kernel: no meaning here.
NOT_FOR_RM = ("loss", "dpo_beta", "dpo_loss", "dpo_label_smoothing", "lipo_beta", "pro_sft_weight",
              "pro_temperature", "simpo_beta", "simpo_gamma", "orpo_lambda", "pairs", "length_norm",
              "length_penalty", "rank_weight", "sft_weight", "sft_reduction", "kernels")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_module.add_arguments(parser, TrainConfig, skip=NOT_FOR_RM)


def reward_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of `train-rm`'s flags: `--loss rm`, the skipped fields at their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in NOT_FOR_RM}
    return config_from_args(args, TrainConfig, **{**defaults, "loss": "rm"})


def main(args: argparse.Namespace) -> int:
    from rrhf_fast.parallel import distributed
    from rrhf_fast.training.train import train

    try:
        train(reward_config(args))
    finally:
        distributed.shutdown()
    return 0
