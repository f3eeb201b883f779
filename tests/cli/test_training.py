"""`lavit.cli.training`: how the training commands join the `lavit` parser. `training_command` (a stage's name, or a
former one, and nothing else), the one-line listing entries and their aliases (`full=False`) against the stages' own
dataclass parsers (`full=True`), `stage_parser_class` (strict argparse for the other commands, `LaVITArgumentParser`
for a stage), and `run_training`'s parser named `lavit COMMAND`."""

import argparse

import pytest
from lavit.training.arguments import LaVITArgumentParser

from lavit.cli.common import HelpFormatter
from lavit.cli.training import (
    TRAINING_ALIASES,
    TRAINING_COMMANDS,
    TRAINING_SUMMARIES,
    add_parsers,
    run_training,
    stage_parser_class,
    training_command,
)
from lavit.flags import StrictArgumentParser


def command_parsers(full: bool) -> argparse._SubParsersAction:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command", parser_class=stage_parser_class)
    add_parsers(commands, full=full)
    return commands


@pytest.mark.parametrize("name", sorted(TRAINING_COMMANDS))
def test_a_stage_name_is_its_own_command(name):
    assert training_command(name) == name


def test_a_former_name_means_its_new_command_and_other_names_none():
    assert training_command("preprocess") == "pretokenize"
    assert all(training_command(new) == new for new in TRAINING_ALIASES.values())
    for other in ("caption", "serve", "", "Train", "train-", "lavit.training.stage2_pretrain"):
        assert training_command(other) is None, other


def test_every_stage_has_its_one_line_summary():
    assert set(TRAINING_SUMMARIES) == set(TRAINING_COMMANDS)
    assert all(module.startswith("lavit.training.") for module in TRAINING_COMMANDS.values())


def test_the_listing_entries_name_the_summary_and_take_the_former_names():
    commands = command_parsers(full=False)
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert helps == {command: f"{summary} (--help lists its flags)" for command, summary in TRAINING_SUMMARIES.items()}
    assert commands.choices["preprocess"] is commands.choices["pretokenize"]
    assert all(isinstance(parser, StrictArgumentParser) for parser in commands.choices.values())


def test_full_parsers_are_the_stages_dataclass_parsers():
    commands = command_parsers(full=True)
    assert set(commands.choices) >= set(TRAINING_COMMANDS)
    for command in TRAINING_COMMANDS:
        parser = commands.choices[command]
        assert isinstance(parser, LaVITArgumentParser) and parser.prog == f"lavit {command}", command
        assert parser.formatter_class is HelpFormatter and parser.allow_abbrev is False


def test_stage_parser_class_is_strict_argparse_unless_given_dataclasses():
    plain = stage_parser_class(prog="lavit caption")
    assert type(plain) is StrictArgumentParser and plain.formatter_class is HelpFormatter
    assert plain.allow_abbrev is False
    own = stage_parser_class(prog="x", formatter_class=argparse.RawTextHelpFormatter)
    assert own.formatter_class is argparse.RawTextHelpFormatter  # a formatter asked for is kept

    from lavit.training.arguments import PretokenizeArguments

    stage = stage_parser_class(prog="lavit pretokenize", dataclass_types=[PretokenizeArguments])
    assert isinstance(stage, LaVITArgumentParser) and stage.formatter_class is HelpFormatter


def test_run_training_parses_with_the_stages_parser_named_lavit_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_training("finetune", ["--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lavit finetune" in err and "unrecognized arguments: --no-such-flag" in err
