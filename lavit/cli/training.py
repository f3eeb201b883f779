"""The training commands: each is a stage script, whose parser is built from the stages' table of arguments
(`lavit.training.arguments.stage_parser`), so `lavit train ARGS` and `python -m lavit.training.stage2_pretrain
ARGS` take the same flags (or one config file), and `lavit train --help` imports no stage script.

`lavit COMMAND ...` goes straight to the stage's parser (`run_training`): the other commands never import the
training modules, and `lavit --help` lists the stages from `lavit.training.STAGES` without importing them."""

import argparse
import importlib

from lavit.flags import StrictArgumentParser
from lavit.registration import register_auto_classes
from lavit.training import STAGES

from .common import HelpFormatter

# the stages' table (`lavit.training.STAGES`, which imports no stage): each command's script and listing line
TRAINING_COMMANDS = {command: module for command, (module, _) in STAGES.items()}
TRAINING_SUMMARIES = {command: summary for command, (_, summary) in STAGES.items()}
# former command names, still run (scripts may use them): "preprocess" is an image processor's resize-and-normalise
# in transformers (`LaVITImageProcessor.preprocess`), so pre-tokenization took its own name
TRAINING_ALIASES = {"preprocess": "pretokenize"}


def training_command(name: str) -> str | None:
    """The training command `name` runs (itself, or the command an old name stands for); None for other commands."""
    name = TRAINING_ALIASES.get(name, name)
    return name if name in TRAINING_COMMANDS else None


def add_parsers(commands, full: bool = True) -> None:
    """The stages' own parsers (`full`), or a one-line entry per stage for the command listing."""
    if full:  # from the stages' table of arguments: no stage script (nor its models, peft, datasets) imported
        from lavit.training.arguments import stage_parser
    for command in TRAINING_COMMANDS:
        if full:
            stage_parser(command, commands)
        else:
            aliases = [old for old, new in TRAINING_ALIASES.items() if new == command]
            commands.add_parser(command, aliases=aliases,
                                help=f"{TRAINING_SUMMARIES[command]} (--help lists its flags)")


def stage_parser_class(**settings) -> argparse.ArgumentParser:
    """The `parser_class` of `lavit`'s sub-commands: a training stage's parser (given `dataclass_types`) is a
    `LaVITArgumentParser`, the others plain argparse parsers (no training module imported for them). Both show each
    default once (`HelpFormatter`; HfArgumentParser's own formatter adds "(default: None)" to every flag)."""
    settings.setdefault("formatter_class", HelpFormatter)
    if "dataclass_types" not in settings:
        return StrictArgumentParser(**settings)  # whole flag names; an unknown flag first (`lavit.flags`)
    from lavit.training.arguments import LaVITArgumentParser

    return LaVITArgumentParser(**settings)


def run_training(command: str, argv: list[str]) -> None:
    """Runs a training stage with the parser of `python -m lavit.training.<stage>` (flags, or one config file),
    named `lavit COMMAND`; the parser checks the model folders it reads before anything is built
    (`LaVITArgumentParser.parse_args_and_config`)."""
    from lavit.training.arguments import stage_parser

    commands = argparse.ArgumentParser(prog="lavit", allow_abbrev=False).add_subparsers(parser_class=stage_parser_class)
    arguments = stage_parser(command, commands).parse_args_and_config(argv)  # `--help` ends here
    register_auto_classes()  # what `import lavit` does outside the `lavit` command
    importlib.import_module(TRAINING_COMMANDS[command]).main(*arguments)
