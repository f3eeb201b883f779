"""The `lavit` command line: one entry point for using, training, converting and publishing LaVIT models.

    lavit demo [--quick]                            build a tiny LaVIT end to end, offline, on this machine
    lavit tokenize IMAGE... --model M [--budget N] [--visualize out.png]
    lavit caption IMAGE... --model M                lavit vqa IMAGE --question Q --model M
    lavit generate "a red bus" -o out.png --model M lavit reconstruct IMAGE -o out.png --model M
    lavit new-language-model LM_DIR --data D        a small LLaMA + BPE tokenizer from your texts (offline stage 2)
    lavit train-tokenizer | train | finetune | pretokenize | train-detokenizer ARGS...   (the training stages)
    lavit convert-original SRC DST                  lavit export DST --model M      lavit push REPO_ID --model M
    lavit evaluate BENCHMARK --model M --annotations FILE --images DIR --output OUT   (the paper's benchmarks)
    lavit serve MODEL [--port 8000] [--replicas N]  an OpenAI-compatible server (Ray Serve)
    lavit env [--json]                              versions and devices, for a bug report

Whatever fails (bad arguments, unreadable files, an error inside a library) ends with one line on stderr and a
non-zero exit status, never a traceback; `LAVIT_DEBUG=1 lavit ...` shows the traceback of an internal error.
tokenize, caption and vqa give the same output for the same input on every run (random draws come from --seed).
"""

import argparse
import importlib
import os
import sys

from lavit import __version__
from lavit.atomic import NotLavitFolderError
from lavit.command_inputs import DEBUG_VARIABLE, CommandError, one_line
from lavit.file_kinds import PickledWeightsError, require_safetensors_inputs
from lavit.paths import PathConflictError, check_output_files, check_paths
from lavit.registration import register_auto_classes

from .common import HelpFormatter
from .training import TRAINING_COMMANDS as TRAINING_COMMANDS  # the training commands and their modules, for tools
from .training import add_parsers as add_training_parsers
from .training import run_training, stage_parser_class, training_command

# one module per command group: `add_parsers(commands)` adds its commands, `RUNNERS` runs them, `FILE_OUTPUTS` (if
# any) names their file arguments; a module imports at its top only what its parsers need (heavy imports: in runners)
COMMAND_GROUPS = ("lavit.cli.demo", "lavit.cli.images", "lavit.cli.generation", "lavit.cli.evaluate",
                  "lavit.cli.language_model", "lavit.cli.publishing", "lavit.cli.serve", "lavit.cli.env")
GROUPS = [importlib.import_module(name) for name in COMMAND_GROUPS]
RUNNERS = {command: run for group in GROUPS for command, run in group.RUNNERS.items()}
# every file argument (`OutputFile`) of a command -> (its flag, the value, how many files it names, the inputs): all
# of them checked before any work (`lavit.paths.check_output_files`)
FILE_OUTPUTS = {command: outputs for group in GROUPS for command, outputs in getattr(group, "FILE_OUTPUTS", {}).items()}


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The whole `lavit` parser. With `full=False` the training commands are one-line entries of the listing (their
    own parsers, built from the stages' dataclasses, are used by `run_training`), so no training module is imported."""
    parser = argparse.ArgumentParser(prog="lavit", description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"lavit {__version__}")
    # sub-commands are argparse parsers; a training stage adds its own dataclass parser (trl's CLI shape)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=stage_parser_class)
    for group in GROUPS:
        group.add_parsers(commands)
    add_training_parsers(commands, full=full)
    return parser


def check_file_outputs(command: str, args) -> None:
    if command in FILE_OUTPUTS:
        name, path, count, inputs = FILE_OUTPUTS[command](args)
        if path:
            check_output_files(path, count, inputs, name)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed; a flag the command does not take is reported with that command's usage (argparse alone reports
    it with the top-level one)."""
    parser = build_parser(full=False)
    args, unknown = parser.parse_known_args([dashed_flag(arg) for arg in argv])
    if unknown:
        (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def dashed_flag(arg: str) -> str:
    """`--max_new_tokens[=V]` -> `--max-new-tokens[=V]`: both spellings work, as in accelerate and TRL, and as in the
    training commands (whose dataclass parsers accept both)."""
    if not arg.startswith("--"):
        return arg
    name, separator, value = arg.partition("=")
    return name.replace("_", "-") + separator + value


# commands that read no model through the Auto classes: `lavit env` reports a broken install, so it must not need one
NO_MODEL_COMMANDS = ("env",)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and training_command(argv[0]):
        command, rest = training_command(argv[0]), argv[1:]
    else:
        args = parse_command(argv)  # argparse prints the command's usage and exits with 2 on bad arguments
        command, rest = args.command, None
    try:
        if rest is not None:
            run_training(command, rest)  # its parser checks the paths (LaVITArgumentParser)
        else:
            check_paths(args)  # no destination is, holds or lies inside an input (lavit.paths)
            check_file_outputs(command, args)  # nor overwrites a file lavit did not write, numbered ones included
            require_safetensors_inputs(args)  # no model folder with pickled weights is loaded (lavit.file_kinds)
            if command not in NO_MODEL_COMMANDS:  # what `import lavit` does elsewhere; this process parsed first
                register_auto_classes()
            RUNNERS[command](args)
    except (CommandError, PathConflictError, NotLavitFolderError, PickledWeightsError) as error:  # user errors
        print(f"lavit {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lavit {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # any internal failure: one line, unless LAVIT_DEBUG asks for the traceback
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"lavit {command}: error: {one_line(error)} (set {DEBUG_VARIABLE}=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0

