"""docs/cli.md, the CLI reference, is generated from the code it documents: the command table
(rrhf_fast.cli.COMMANDS) and every `train` flag by section (rrhf_fast.config.SECTIONS, each field's
help and default). The test fails when the page and the code part; after a deliberate change,
`RRHF_FAST_UPDATE_DOCS=1 pytest tests/test_cli_reference.py` rewrites the generated part (review
its diff). The text outside the markers is written by hand.
"""

import dataclasses
import os
from pathlib import Path

from rrhf_fast.cli import COMMANDS
from rrhf_fast.config import SECTIONS, TrainConfig, _flag

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
START, END = "<!-- generated: tests/test_cli_reference.py -->\n", "<!-- /generated -->\n"


def cell(text: str) -> str:
    return text.replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def default_of(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value in (None, ()) else f"`{value}`"


def flag_of(f: dataclasses.Field) -> str:
    names = [f"--{_flag(f.name)}", *(f"--{_flag(a)}" for a in f.metadata.get("aliases", ()))]
    if f.type == "bool":
        names[0] += f" / --no-{_flag(f.name)}"
    elif "choices" in f.metadata:
        names[0] += " {" + ",".join(f.metadata["choices"]) + "}"
    elif "metavar" in f.metadata:
        names[0] += f" {f.metadata['metavar']}"
    return ", ".join(f"`{n}`" for n in names)


def generated() -> str:
    out = ["## Commands", "", "| command | what it does |", "|---|---|"]
    out += [f"| `rrhf-fast {name}` | {cell(help_text)} |" for name, (_, help_text) in COMMANDS.items()]
    out += ["", "## `rrhf-fast train` flags, by section", ""]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, (text, names) in SECTIONS.items():
        out += [f"### {name}", "", f"{text[0].upper()}{text[1:]}.", ""]
        out += ["| flag | default | what it sets |", "|---|---|---|"]
        out += [f"| {flag_of(fields[n])} | {default_of(fields[n])} | {cell(fields[n].metadata['help'])} |"
                for n in names]  # fmt: skip
        out.append("")
    return "\n".join(out)


def test_the_cli_reference_is_the_codes():
    text = PAGE.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    now = generated()
    if os.environ.get("RRHF_FAST_UPDATE_DOCS"):
        PAGE.write_text(head + START + now + END + rest.split(END, 1)[1], encoding="utf-8")
        rest = now + END + rest.split(END, 1)[1]
    assert rest.split(END, 1)[0] == now, "docs/cli.md is stale: see this file's docstring"


def test_every_command_and_train_flag_is_on_the_page():
    text = PAGE.read_text(encoding="utf-8")
    assert all(f"`rrhf-fast {name}`" in text for name in COMMANDS)
    assert all(f"`--{_flag(f.name)}" in text for f in dataclasses.fields(TrainConfig))
