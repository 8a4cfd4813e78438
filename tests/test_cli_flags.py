"""Every command's flags: switches take both forms, and choice lists come from one source.

(The merge of the two dataclass -> argparse builders into `config.add_arguments` was checked
against a snapshot of every command's flags, defaults, choices and types taken before it; nothing
changed but the `--no-X` forms that former store_true switches gained.)
"""

import argparse
import importlib

import pytest

from rrhf_fast.cli import COMMANDS


def build(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rrhf-fast {command}", exit_on_error=False)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


def optional(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser without its required flags, to parse one switch alone."""
    for action in parser._actions:
        action.required = False
    return parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_switch_has_both_forms(command):
    parser = optional(build(command))
    for action in parser._actions:
        if action.nargs != 0 or isinstance(action, argparse._HelpAction):
            continue
        positive = next(s for s in action.option_strings if not s.startswith("--no-"))
        negative = "--no-" + positive.removeprefix("--")
        assert negative in action.option_strings, f"{command} {positive} has no {negative}"
        assert parser.parse_args([positive]).__dict__[action.dest] is True
        assert parser.parse_args([negative]).__dict__[action.dest] is False


def test_iterate_chat_template_flags_agree():
    """`--chat-template` (training) and `--score-chat-template` take the same forms."""
    parser = optional(build("iterate"))
    args = parser.parse_args(["--no-chat-template", "--no-score-chat-template"])
    assert (args.chat_template, args.score_chat_template) == (False, False)
    args = parser.parse_args(["--chat-template", "--score-chat-template"])
    assert (args.chat_template, args.score_chat_template) == (True, True)
