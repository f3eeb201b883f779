"""The `lavit` command line as a new user meets it (issue 28, section 2), for every command found from the parser:
`--help` works, every flag has a help text that shows its default at most once, a mistyped flag prints that
command's usage, `--version` and `lavit env` answer, and the command listing does not import the training stages."""

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lavit
from lavit.cli import TRAINING_COMMANDS, build_parser, main

# the stages' `TrainingArguments` flags are transformers' own (their help is transformers')
TRANSFORMERS_FLAGS = {f"--{name}" for name in __import__("transformers").TrainingArguments.__dataclass_fields__}


def command_parsers(full: bool = True) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(full=full)
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(commands.choices)


def listing(full: bool) -> dict[str, str]:
    """command -> its one line in `lavit --help`."""
    parser = build_parser(full=full)
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in commands._choices_actions}


def own_flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction) \
                and not TRANSFORMERS_FLAGS & set(action.option_strings):
            yield action


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholders for the required arguments, so that parsing fails only for what the test adds."""
    argv = []
    for action in parser._actions:
        placeholder = str(next(iter(action.choices))) if action.choices else "1"
        if not action.option_strings:
            argv.append(placeholder)
        elif action.required:
            argv += [action.option_strings[0], placeholder]
    return argv


COMMANDS = sorted(command_parsers())


def test_every_command_is_listed():
    assert set(COMMANDS) >= {"tokenize", "caption", "vqa", "generate", "env", *TRAINING_COMMANDS}
    # `lavit --help` lists the stages without building their parsers: the same one line as their own parsers give
    assert listing(full=False) == listing(full=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_flags_default_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: lavit {command}"), text[:200]
    assert "(default: None)" not in text
    parser = command_parsers()[command]
    formatter = parser._get_formatter()
    for action in own_flags(parser):
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"lavit {command} {flag} has no help text"
        rendered = formatter._expand_help(action) if action.help else ""
        assert len(re.findall(r"\bdefault\b", rendered, flags=re.IGNORECASE)) <= 1, (command, flag, rendered)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_flag_prints_that_commands_usage(command, capsys):
    argv = [command, *required_argv(command_parsers()[command]), "--no-such-flag"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: lavit {command}" in err and "--no-such-flag" in err, err
    assert "COMMAND ..." not in err  # not the top-level usage


def typo(flag: str) -> str:
    """`--model` -> `--modle`: the last two letters of the name swapped (a flag no parser has)."""
    return flag[:-2] + flag[-1] + flag[-2]


def every_parser():
    """(name, parser) of the top-level parser and every command's, the stages' full dataclass parsers included."""
    yield "lavit", build_parser()
    yield from command_parsers().items()


@pytest.mark.parametrize(("name", "parser"), list(every_parser()), ids=[name for name, _ in every_parser()])
def test_no_parser_takes_abbreviations(name, parser):
    assert parser.allow_abbrev is False, name


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_flag_is_reported_before_a_missing_one(command, capsys):
    """#24 §8: `lavit caption --modle M` said "the following arguments are required: --model". Every flag of every
    command, mistyped (and abbreviated) with nothing else given: the unknown flag is named, with the one meant."""
    parser = command_parsers()[command]
    flags = [action.option_strings[0] for action in own_flags(parser) if action.option_strings[0].startswith("--")]
    flags = [flag for flag in flags if len(flag) > 4 and typo(flag) not in parser._option_string_actions]
    for flag in flags:
        for wrong in (typo(flag), flag[:-1]):
            if wrong in parser._option_string_actions:
                continue
            with pytest.raises(SystemExit) as exit_info:
                main([command, wrong, "1"])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"lavit {command}: error: unrecognized arguments: {wrong}"), (wrong, err)
            assert "required" not in err and "did you mean --" in err, (wrong, err)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_text_value_that_starts_with_a_dash_is_a_value(command):
    """The attack of #24: `caption --prompt "-a photo of"` and `finetune --text_column "-caption col"` were unknown
    flags, though argparse reads a token with a space as a value. Every flag of every command that takes a free text
    (a string without choices) is given one."""
    parser = command_parsers()[command]
    for action in own_flags(parser):
        if not action.option_strings or action.nargs == 0 or action.choices or action.type not in (None, str):
            continue
        required = [part for other in parser._actions if other.required and other is not action
                    for part in ((other.option_strings[0], "x") if other.option_strings else
                                 (sorted(other.choices)[0] if other.choices else "x",))]
        parsed = parser.parse_known_args([*required, action.option_strings[0], "-a photo of"])[0]
        value = getattr(parsed, action.dest)
        assert value == "-a photo of" or value == ["-a photo of"], (command, action.dest, value)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_value_read_as_a_flag_is_reported_with_the_way_to_give_it(command, capsys):
    """#24: `lavit vqa --question -what` said only "unrecognized arguments: -what". Every flag of every command that
    takes a value, given one that starts with a dash: the error names the flag and the `--flag=-value` form."""
    parser = command_parsers()[command]
    for action in own_flags(parser):
        if action.nargs == 0:
            continue
        flag = action.option_strings[-1]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_known_args([flag, "-zz9"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        hint = f"-zz9 (the value of {flag}? give {flag}=-zz9)"
        # a flag whose value is optional (a boolean's `--lora`) took none: -zz9 is an unknown flag, no such hint
        assert exit_info.value.code == 2 and (hint in err) == (action.nargs != "?"), (flag, err)
        if action.nargs is None:  # a value that is a flag's name leaves the flag without one: `--question --help`
            with pytest.raises(SystemExit):
                parser.parse_known_args([flag, "--help"])
            assert f"give {flag}=--help" in capsys.readouterr().err, flag


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lavit {lavit.__version__}"


def test_env_reports_versions_and_devices(capsys):
    import torch
    import transformers

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == str(torch.__version__)
    assert report["transformers"] == transformers.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    assert {"lavit", "python", "platform", "diffusers", "accelerate", "peft", "trl", "datasets", "evaluate",
            "mps_available"} <= set(report)
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"- transformers: {transformers.__version__}" in text and "- cuda_available: " in text


def imported_by(argv: list[str]) -> list[str]:
    """The modules the `lavit` console script imports for `argv` (Python's `-X importtime` report)."""
    script = Path(sys.executable).with_name("lavit")
    result = subprocess.run([sys.executable, "-X", "importtime", str(script), *argv], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]


@pytest.mark.slow  # five fresh processes
def test_help_imports_no_model_code_and_no_stage_script():
    """`lavit --help` and a command's `--help` import no model code (the command registers lavit's classes only when
    a command runs: `lavit.registration`), no training stage, nor peft, datasets or trl; a stage's `--help` builds
    its parser from the stages' table of arguments without importing the stage script (TrainingArguments itself
    imports peft)."""
    model_code = ("peft", "datasets", "trl", "diffusers", "transformers.modeling_utils",
                  "transformers.processing_utils", "lavit.training.", "lavit.modeling.modeling_",
                  "lavit.modeling.pipeline_lavit", "lavit.processing.processing_")
    stages = tuple(f"lavit.training.{module.rsplit('.', 1)[1]}" for module in TRAINING_COMMANDS.values())
    # `lavit env` too: the bug-report command must run where the model code cannot be imported (atk39)
    for argv in (["--help"], ["caption", "--help"], ["evaluate", "--help"], ["serve", "--help"], ["train", "--help"],
                 ["env"]):
        imported = imported_by(argv)
        assert "lavit.cli" in imported, (argv, imported[-5:])
        forbidden = stages + ("lavit.modeling.",) if argv[0] == "train" else model_code
        assert [name for name in imported if name.startswith(forbidden) and name != "lavit.training.language_model"
                and not name.startswith(("lavit.modeling.folders_lavit", "lavit.modeling.saving_lavit",
                                         "lavit.modeling.validation_lavit", "lavit.modeling.kernels_lavit",
                                         "lavit.modeling.configuration_lavit", "lavit.modeling.transformers_compat"))
                ] == [], argv


HEAVY = ("torch", "transformers", "diffusers", "peft", "datasets", "trl", "accelerate", "evaluate", "ray",
         "lavit.training", "lavit.evaluation", "lavit.hub_cards", "lavit.demo", "lavit.serving")
LIGHT_EXCEPTIONS = ("lavit.training", "lavit.training.language_model",  # the stages' table; argparse types only
                    "lavit.serving.command")


def test_command_modules_import_their_libraries_only_when_they_run():
    """At its top, a command module imports only what its parsers need; the runners import the libraries."""
    for path in sorted((Path(lavit.__file__).parent / "cli").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0:
                for name in [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                    heavy = name.startswith(HEAVY) and name not in LIGHT_EXCEPTIONS
                    assert not heavy, f"{path.name} imports {name} at its top: import it in the run function"


@pytest.mark.parametrize("question", ["", "   "])
def test_vqa_refuses_an_empty_question(question, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vqa", "photo.png", "--model", "m", "--question", question])
    assert exit_info.value.code == 2
    assert "--question: must be a non-empty question" in capsys.readouterr().err
