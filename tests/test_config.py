"""rrhf_fast.config: the TrainConfig dataclass is the single source of the flags."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from rrhf_fast.config import SECTIONS, OptimizerSection, TrainConfig, add_arguments
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


# ---- sections (config.SECTIONS): TrainConfig grouped, still one flat dataclass

OLD_CONFIG = Path(__file__).parent / "fixtures" / "config" / "config-e6e55aa.json"


def test_every_field_is_in_exactly_one_section():
    named = [n for _, names in SECTIONS.values() for n in names]
    assert sorted(named) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(named) == len(set(named))
    assert list(SECTIONS) == ["data", "batching", "optimizer", "loss", "model", "distributed", "run"]


def test_train_help_lists_each_section_as_an_argument_group():
    groups = {g.title: g for g in parser()._action_groups}
    titles = [g.title for g in parser()._action_groups]
    assert titles[-len(SECTIONS) :] == list(SECTIONS)  # after argparse's own
    for name, (_, names) in SECTIONS.items():
        flags = [a.dest for a in groups[name]._group_actions]
        assert flags == [f.name for f in dataclasses.fields(TrainConfig) if f.name in names], name
    body = parser().format_help().split("\noptions:\n")[1]  # after the usage lines
    assert body.index("\noptimizer:\n") < body.index("  --lr X") < body.index("\nloss:\n")


def test_a_command_that_skips_a_section_shows_no_empty_group():
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig, skip=["fsdp"])
    assert "distributed" not in [g.title for g in p._action_groups]


def test_sections_are_dataclasses_of_the_same_values():
    config = parse("--lr", "3e-4", "--fsdp", "--loss", "simpo", "--seed", "7")
    sections = config.sections
    assert isinstance(sections.optimizer, OptimizerSection) and sections.optimizer.lr == 3e-4
    assert (sections.distributed.fsdp, sections.loss.loss, sections.run.seed) == (True, "simpo", 7)
    assert sections.data.data == "d.jsonl" and sections.model.model == "m"
    assert TrainConfig.from_sections(**{n: getattr(sections, n) for n in SECTIONS}) == config
    assert OptimizerSection().lr == TrainConfig(model="m", data="d", output_dir="o").lr  # same defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        sections.optimizer.lr = 1.0  # a view: change the config with dataclasses.replace
    with pytest.raises(UserError, match="unknown training config section"):
        TrainConfig.from_sections(optimiser={"lr": 1.0})


def test_a_config_json_in_sections_loads_as_the_flat_one(tmp_path):
    config = parse("--lr", "3e-4", "--epochs", "2")
    nested = {n: dataclasses.asdict(getattr(config.sections, n)) for n in SECTIONS}
    (tmp_path / "c.json").write_text(json.dumps(nested), encoding="utf-8")
    assert TrainConfig.load(tmp_path / "c.json") == config
    config.save(tmp_path / "saved.json")  # what train writes: flat, as every release did
    saved = json.loads((tmp_path / "saved.json").read_text(encoding="utf-8"))
    assert list(saved) == [f.name for f in dataclasses.fields(TrainConfig)]


def test_an_old_flat_config_json_loads_into_its_sections():
    """tests/fixtures/config/config-e6e55aa.json is what rrhf-fast at e6e55aa wrote (its TrainConfig's
    to_dict): flat, with the old keys `loss_impl` and `mode`, and without the fields added since."""
    saved = json.loads(OLD_CONFIG.read_text(encoding="utf-8"))
    assert "loss_impl" in saved and "mode" in saved and "report_to" not in saved
    config = TrainConfig.load(OLD_CONFIG)
    assert (config.kernels, config.length_norm, config.lr, config.lora_r) == ("torch", "official", 1e-4, 8)
    sections = config.sections
    assert (sections.model.kernels, sections.loss.length_norm, sections.model.lora_r) == (
        "torch",
        "official",
        8,
    )
    assert (sections.batching.max_steps, sections.run.eval_every, sections.run.seed) == (20, 5, 3)
    assert (
        sections.run.report_to == () and sections.optimizer.bf16_update == "nearest"
    )  # added since: defaults
