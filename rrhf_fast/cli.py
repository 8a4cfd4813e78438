"""The `rrhf-fast` command line: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `main(args) -> int`; it is imported only
when its subcommand runs, so `rrhf-fast --help` stays fast. Errors meant for users are raised as
`UserError` and printed as one sentence with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rrhf_fast import cpu_pins
from rrhf_fast.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rrhf_fast.training.train", "train a causal LM with RRHF (or DPO) on scored data"),
    "train-rm": (
        "rrhf_fast.training.train_rm",
        "train a reward model (Bradley-Terry or listwise) on scored responses, packed like train",
    ),
    "sample": ("rrhf_fast.generation.sample", "sample k candidate responses per prompt from a model"),
    "score": (
        "rrhf_fast.generation.score",
        "score candidate responses with a reward model, a function or an LLM judge",
    ),
    "iterate": ("rrhf_fast.pipelines.iterate", "online RRHF: sample, score and train, repeated"),
    "ref-logps": (
        "rrhf_fast.objectives.dpo",
        "add a reference model's log-prob sum per response (for --loss dpo)",
    ),
    "inspect": (
        "rrhf_fast.training.inspect",
        "show how records become prompt and response tokens, and what packing saves",
    ),
    "merge": ("rrhf_fast.checkpointing.merge", "merge a trained LoRA adapter into its base model"),
    "plan": (
        "rrhf_fast.planning.plan",
        "will it fit? peak GPU memory of a training step, simulated on fake tensors",
    ),
    "plot": ("rrhf_fast.reporting.plot", "draw the training curves of a run directory"),
    "demo": ("rrhf_fast.pipelines.demo", "the embedded CPU demo: RRHF on a synthetic task, no downloads"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="rrhf-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sp)
    return parser, chosen if chosen in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if cpu_pins.wanted(next((a for a in words if not a.startswith("-")), None)):
        cpu_pins.pin()  # before any command module imports torch (rrhf_fast/cpu_pins.py)
    quiet_optional_imports()
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if chosen is None or args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[chosen][0])
    try:
        return int(module.main(args) or 0)
    except UserError as err:
        print(f"rrhf-fast {chosen}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rrhf-fast {chosen}: interrupted", file=sys.stderr)
        return 130


def quiet_optional_imports() -> None:
    """Import-time chatter of optional packages that transformers imports when they are installed:
    torchao logs a warning for each native library its wheel ships for another Python or GPU,
    torch's pytree one for each Enum it registers, and bitsandbytes (on a CPU with AVX512-BF16) one
    when it cannot fetch its optional 4-bit CPU kernel from the Hugging Face Hub. None concerns the
    command; a user's stderr keeps the one sentence of an error. Their errors still print."""
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
