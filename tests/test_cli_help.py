"""``--help`` of every command, as the terminal shows it: every help text word for word.

The app renders help as markdown, which eats what looks like markup (``<data name>`` as an
HTML tag, ``d*H for W1, H*C`` as emphasis); literal text goes in code spans, whose backticks
are the only characters the rendering may drop.
"""

from __future__ import annotations

import inspect

import pytest
import typer
from typer.testing import CliRunner

from advgrad.cli import app

COMMANDS = typer.main.get_command(app).commands

PLACEHOLDERS = {
    "attack": [
        "Default: <data name>-<method>-l<norm>-eps<eps>.h5 in the current directory.",
        "a name containing {eps}, e.g. adv-{eps}.h5",
        "(.<out>.partial.h5)",
    ],
    "certify": ["Default: <data name>-certify-l<norm>.h5 in the current directory."],
    "info": ["(d*H for W1, H*C for W2)", "Default: 2**27 (512 MiB of float32)."],
}


def flat(text: str) -> str:
    """``text`` without table borders and code-span backticks, whitespace collapsed."""
    return " ".join(text.replace("│", " ").replace("`", "").split())


def rendered_help(*command: str) -> str:
    """The help of ``advgrad *command`` on a terminal wide enough that nothing wraps."""
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_the_commands_are_the_documented_ones():
    assert list(COMMANDS) == [
        *("attack", "evaluate", "certify", "info", "gradcheck", "train", "show"),
        *("convert-model", "convert-data"),
    ]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_help_text_is_shown_as_written(name):
    command = COMMANDS[name]
    shown = rendered_help(name)
    assert shown.startswith(f"Usage: advgrad {name} [OPTIONS]")
    undocumented = [param.name for param in command.params if not param.help]
    assert undocumented == []
    for text in [inspect.cleandoc(command.help), *(param.help for param in command.params)]:
        assert flat(text) in shown


@pytest.mark.parametrize(("name", "placeholders"), list(PLACEHOLDERS.items()))
def test_placeholders_survive_the_markdown_rendering(name, placeholders):
    shown = rendered_help(name)
    for placeholder in placeholders:
        assert placeholder in shown


def test_the_app_help_lists_every_command_with_its_summary():
    shown = rendered_help()
    for name, command in COMMANDS.items():
        summary = flat(inspect.cleandoc(command.help).split("\n\n")[0])
        assert f"{name} {summary}" in shown
