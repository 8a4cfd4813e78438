"""rrhf_fast.config: the TrainConfig dataclass is the single source of the flags."""

import argparse
import dataclasses
import json

import pytest

from rrhf_fast.config import TrainConfig, add_arguments
from rrhf_fast.errors import UserError

REQUIRED = ["--model", "m", "--data", "d.jsonl", "--output-dir", "out"]

# Flags users and docs rely on (old names of renamed flags included: they stay aliases).
DESIGN_FLAGS = (
    "--model --data --output-dir --max-steps --epochs --micro-batch-tokens --grad-accum --lr --optim --attn "
    "--kernels --loss-impl --length-norm --mode --length-penalty --rank-weight --sft-weight --lora-r "
    "--load-in-4bit "
    "--gradient-checkpointing --seed --resume --eval-data --eval-every --warmup-steps --weight-decay "
    "--max-grad-norm --max-prompt-len --max-response-len --chat-template --save-every --keep-checkpoints "
    "--max-bad-steps --dtype --log-every"
).split()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    return p


def parse(*flags: str) -> TrainConfig:
    return TrainConfig.from_args(parser().parse_args([*REQUIRED, *flags]))


def test_every_field_is_a_kebab_case_flag_with_help():
    actions = {a.dest: a for a in parser()._actions if a.dest != "help"}
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.help and len(action.help) > 10, f.name
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("flag", DESIGN_FLAGS)
def test_design_flags_exist(flag):
    assert flag in parser()._option_string_actions


def test_defaults_and_types():
    config = parse()
    assert config == TrainConfig(model="m", data="d.jsonl", output_dir="out")
    assert config.optim == "adamw8bit" and config.length_norm == "paper" and config.resume is False
    config = parse("--lr", "1e-4", "--max-steps", "7", "--resume", "--no-plot", "--optim", "adamw")
    assert (config.lr, config.max_steps, config.resume, config.plot, config.optim) == (
        1e-4,
        7,
        True,
        False,
        "adamw",
    )


def test_required_flags_and_choices_are_enforced_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--data", "d.jsonl", "--output-dir", "out"])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args([*REQUIRED, "--optim", "sgd"])
    assert "invalid choice" in capsys.readouterr().err


def test_json_round_trip(tmp_path):
    config = parse("--eval-data", "e.jsonl", "--eval-every", "3", "--queries-per-step", "8", "--lr", "3e-4")
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config


def test_foreign_json_is_a_user_error(tmp_path):
    (tmp_path / "c.json").write_text('{"model": "m", "bogus": 1}')
    with pytest.raises(UserError, match="unknown training config field"):
        TrainConfig.load(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("not json")
    with pytest.raises(UserError, match="cannot read"):
        TrainConfig.load(tmp_path / "d.json")


IMPOSSIBLE = [
    pytest.param(
        ["--queries-per-step", "8", "--grad-accum", "2"], "give one of them", id="qps-and-grad-accum"
    ),
    pytest.param(["--eval-every", "5"], "--eval-every needs --eval-data", id="eval-every-without-data"),
    pytest.param(["--load-in-4bit"], "also give --lora-r", id="4bit-without-lora"),
    pytest.param(["--rank-weight", "0", "--sft-weight", "0"], "nothing to train", id="zero-weights"),
    pytest.param(["--micro-batch-tokens", "0"], "--micro-batch-tokens must be at least 1", id="zero-budget"),
    pytest.param(["--max-steps", "0"], "--max-steps must be at least 1", id="zero-steps"),
    pytest.param(["--lr", "-1"], "--lr must be a non-negative", id="negative-lr"),
    pytest.param(["--lr", "nan"], "--lr must be a finite number, got nan", id="nan-lr"),
    pytest.param(["--length-penalty", "inf"], "--length-penalty must be a finite number", id="inf-alpha"),
    pytest.param(["--max-grad-norm=-inf"], "--max-grad-norm must be a finite number", id="inf-clip"),
    pytest.param(["--min-lr", "1", "--lr", "0.1"], "--min-lr", id="min-lr-above-lr"),
    pytest.param(["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1", id="keep-zero"),
]


@pytest.mark.parametrize("flags, words", IMPOSSIBLE)
def test_impossible_values_are_one_sentence_user_errors(flags, words):
    with pytest.raises(UserError) as info:
        parse(*flags).validate()
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "old, new",
    [
        pytest.param(["--loss-impl", "torch"], ["--kernels", "torch"], id="loss-impl-is-kernels"),
        pytest.param(["--mode", "official"], ["--length-norm", "official"], id="mode-is-length-norm"),
    ],
)
def test_renamed_flags_keep_their_old_names(old, new):
    assert parse(*old) == parse(*new) != parse()
    config = parse("--loss-impl", "torch", "--mode", "official")
    assert (config.kernels, config.length_norm) == ("torch", "official")
    assert (config.loss_impl, config.mode) == ("torch", "official")  # the attribute names code used


def test_a_config_json_with_the_old_field_names_loads(tmp_path):
    """config.json of runs saved before the renames: `loss_impl` and `mode` keys."""
    config = parse("--kernels", "torch", "--length-norm", "official")
    data = config.to_dict()
    data["loss_impl"], data["mode"] = data.pop("kernels"), data.pop("length_norm")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert TrainConfig.load(path) == config
    assert TrainConfig.from_dict(data) == config
    with pytest.raises(UserError, match="unknown training config field"):
        TrainConfig.from_dict({**data, "loss_kernel": "torch"})
