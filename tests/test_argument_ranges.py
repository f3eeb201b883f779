"""Every argument's range is declared once and enforced everywhere (issue 24, section 3).

The surface is found, not listed: every flag of every `lavit` command (the argparse actions of all sub-parsers,
training stages included), every field of the stage dataclasses read from config files, every typed field of the
LaVIT configs and of `LaVITImageGenerationConfig`. Each numeric or choice argument must carry a declared
`Range`/`Choice` (a new `type=int` flag or an unranged config field fails here), and zero, negative, NaN, infinite,
huge and wrong-type values either stop with one line naming the argument, the value and its range, or are values of
that range.
"""

import argparse
import dataclasses
import functools
import itertools
import json
import math
import re
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lavit.modeling.validation_lavit import Choice, Range

from lavit.cli import build_parser, main

BAD_TEXTS = ["0", "-1", "nan", "inf", "-inf", "1e400", str(2**70), "-" + str(2**70), "abc", "1.5", "", "0x10", "-1e-3",
             "-nan", "-.5", "-1_0"]
BAD_VALUES = [0, -1, 1.5, math.nan, math.inf, -math.inf, 10**30, 2**70, -(2**70), "abc", True, None, [1]]
DECLARED = (Range, Choice)


@functools.cache
def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser, found from the `lavit` parser."""
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(commands.choices)


def flags(parser: argparse.ArgumentParser):
    """(flag, action) for every option that takes a value."""
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            yield action.option_strings[0], action


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholders for the required arguments of `parser`, so that parsing only fails for the value under test."""
    argv = []
    for action in parser._actions:
        placeholder = str(next(iter(action.choices))) if action.choices else "x"
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append(placeholder)
        elif action.required:
            argv += [action.option_strings[0], placeholder]
    return argv


def value_flags():
    return [(command, flag, action) for command, parser in command_parsers().items()
            for flag, action in flags(parser)]


def undeclared_numeric_flags(parsers: dict) -> list[str]:
    """Flags taking a number (`type=int`/`float`, or a numeric default) without a declared `Range`/`Choice`."""

    def numeric(action):
        default_is_number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        return action.type in (int, float) or (default_is_number and action.choices is None)

    return [f"lavit {command} {flag}" for command, parser in parsers.items() for flag, action in flags(parser)
            if numeric(action) and not isinstance(action.type, DECLARED)]


def test_every_numeric_flag_of_every_command_declares_its_range():
    commands = command_parsers()
    assert {"caption", "evaluate", "new-language-model", "train", "finetune", "train-detokenizer"} <= set(commands)
    undeclared = undeclared_numeric_flags(commands)
    assert not undeclared, f"numeric flags without a declared Range: {undeclared}"
    ranged = [flag for _, flag, action in value_flags() if isinstance(action.type, DECLARED)]
    assert len(ranged) > 100  # the training stages' Trainer options included


def test_a_new_numeric_flag_or_stage_field_without_a_range_is_found():
    """The check above fails for the next argument someone adds without a range: a plain `type=int` flag, and a new
    stage dataclass field (its flag gets HfArgumentParser's `type=int`)."""
    from lavit.training.arguments import LaVITTrainingArguments, make_stage_parser

    @dataclasses.dataclass
    class NewStageArguments:
        data: str = "d"
        new_count: int = 3
        new_ratio: float | None = None

    parser = argparse.ArgumentParser()
    parser.add_argument("--new-size", type=int, default=4)
    stage = make_stage_parser((NewStageArguments, LaVITTrainingArguments), None, "new-stage", "a new stage")
    found = undeclared_numeric_flags({"new": parser, "new-stage": stage})
    assert found == ["lavit new --new-size", "lavit new-stage --new_count", "lavit new-stage --new_ratio"]


def states_the_bound_exceeded(message: str, value: int) -> bool:
    """Whether a refusal of the too-large (too small) integer `value` states an upper (lower) bound below (above)
    it: `in [a, b]`, `<= b`, `at most b` (`>= a`, `at least a`), not just "an integer >= 1" for 2**70."""
    number = r"(-?\d[\d.e+]*)"
    if value > 0:
        found = re.search(rf"in [\[(]-?[\d.e+]+, {number}[\])]", message) or re.search(rf"(?:<=?|at most) {number}",
                                                                                     message)
        return found is not None and float(found.group(1)) < value
    found = re.search(rf"in [\[(]{number}, ", message) or re.search(rf"(?:>=?|at least) {number}", message)
    return found is not None and float(found.group(1)) > value


@pytest.mark.parametrize("text", BAD_TEXTS)
def test_bad_numbers_stop_at_the_flag_with_one_line(text, capsys):
    """Every ranged flag of every command, fed `text`: argparse's one `error:` line names the flag, the range and
    the value (exit status 2), or the value is accepted and lies in the declared range. A too-large (or too small)
    integer is told the bound it exceeded, the int64 limit that `describe` leaves out included (U10)."""
    parsers = command_parsers()
    # `--flag=-1e-3` and `--flag -1e-3` alike: the attack of #24 found `--temperature -1e-3` and `-inf` reported as
    # unknown flags (argparse's negative numbers are `-1` and `-.5` only)
    forms = [[f"{{flag}}={text}"], ["{flag}", text]] if text.startswith("-") else [[f"{{flag}}={text}"]]
    for (command, flag, action), form in itertools.product(value_flags(), forms):
        if not isinstance(action.type, DECLARED):
            continue
        try:
            parsed = parsers[command].parse_args([*required_argv(parsers[command]),
                                                  *(part.format(flag=flag) for part in form)])
        except SystemExit as exit_info:
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if "error:" in line]
            assert exit_info.code == 2 and len(lines) == 1 and "Traceback" not in err, (command, flag, err)
            assert f"argument {flag}" in lines[0] and f"got {text!r}" in lines[0], (command, flag, lines)
            assert f"must be {action.type.describe()}" in lines[0], (command, flag, lines)
            if isinstance(action.type, Range) and text.lstrip("-") == str(2**70):
                assert states_the_bound_exceeded(lines[0], int(text)), (command, flag, lines)
        else:
            value = getattr(parsed, action.dest)
            assert action.type.contains(value), (command, flag, text, value)


def test_issue_examples_end_with_one_line(tmp_path, capsys):
    cases = [
        (["new-language-model", tmp_path / "lm", "--texts", tmp_path / "t.txt", "--num-layers", "-1"],
         "argument --num-layers: must be an integer in [1, 1024], got '-1'"),
        (["new-language-model", tmp_path / "lm", "--texts", tmp_path / "t.txt", "--vocab-size", "0"], "--vocab-size"),
        (["new-language-model", tmp_path / "lm", "--texts", tmp_path / "t.txt", "--hidden-size", "0"],
         "--hidden-size"),
        (["evaluate", "coco-karpathy", "--model", "m", "--output", tmp_path / "o", "--num-beams", "0"],
         "argument --num-beams: must be an integer >= 1, got '0'"),
        (["evaluate", "coco-karpathy", "--model", "m", "--output", tmp_path / "o", "--limit", "-1"],
         "argument --limit: must be an integer >= 1, got '-1'"),
        (["generate", "a bus", "-o", tmp_path / "x.png", "--model", "m", "--seed", str(2**70)],
         "argument --seed: must be an integer in [0, 4294967295]"),
        (["train", "--data", "d", "--output_dir", tmp_path / "run", "--learning_rate", "nan"],
         "argument --learning_rate/--learning-rate: must be a finite number in [0, 10], got 'nan'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(arg) for arg in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert message in line, (argv, line)
    assert not (tmp_path / "lm").exists()


# ------------------------------------------------------------------------------------------- stage config files


def stage_parsers():
    from lavit.training.arguments import LaVITArgumentParser

    return {command: parser for command, parser in command_parsers().items()
            if isinstance(parser, LaVITArgumentParser) and parser.dataclass_types}


def test_stage_config_files_are_checked_field_by_field(tmp_path, capsys):
    """A config file's values go through the flags' `type=` (`training.config_files`): every ranged field of every
    stage, given -2**40 (or an unknown name) in a config file, is refused by name, naming the file."""
    from lavit.training.arguments import declared_range

    checked = 0
    for command, parser in stage_parsers().items():
        names = {data_field.name for kind in parser.dataclass_types for data_field in dataclasses.fields(kind)}
        for dataclass_type in parser.dataclass_types:
            for data_field in dataclasses.fields(dataclass_type):
                spec = declared_range(data_field)
                if spec is None or not data_field.init:
                    continue
                bad = "no-such-choice" if isinstance(spec, Choice) else -(2**40)
                settings = {"data": "d", "output_dir": str(tmp_path / "run"), "output": str(tmp_path / "out")}
                settings = {key: value for key, value in settings.items() if key in names} | {data_field.name: bad}
                path = tmp_path / f"{command}.json"
                path.write_text(json.dumps(settings))
                with pytest.raises(SystemExit):
                    parser.parse_args_and_config([str(path)])
                err = capsys.readouterr().err
                assert f"{path}: argument --{data_field.name}" in err, err
                checked += 1
    assert checked > 100


# ------------------------------------------------------------------------------------------------------ configs


def config_classes():
    """The typed LaVIT configs (every `PretrainedConfig` of `lavit.modeling`) and every settings dataclass (`*Config`)
    of `lavit.modeling` and `lavit.evaluation` (image generation, evaluation)."""
    import lavit.modeling
    from transformers import PretrainedConfig

    import lavit.evaluation

    exported = [getattr(module, name) for module in (lavit.modeling, lavit.evaluation) for name in module.__all__]
    return [cls for cls in exported if isinstance(cls, type) and (issubclass(cls, PretrainedConfig) or (
        dataclasses.is_dataclass(cls) and cls.__name__.endswith("Config")))]


def make(cls, **settings):
    """`cls(**settings)`, its required fields given their first declared choice."""
    required = {data_field.name: cls.field_ranges[data_field.name].choices[0] for data_field in dataclasses.fields(cls)
                if data_field.init and data_field.default is dataclasses.MISSING
                and data_field.default_factory is dataclasses.MISSING}
    return cls(**{**required, **settings})


def typed_fields(cls) -> dict[str, type]:
    """The fields a LaVIT class declares itself (not transformers' own) whose type is numeric (`int`, `float`,
    optional or in a list): each needs a declared range. Name fields with fixed choices declare a `Choice` too."""
    own = {}
    for klass in reversed(cls.__mro__):
        if "lavit" in klass.__module__:
            own.update(vars(klass).get("__annotations__", {}))
    own = {name: kind for name, kind in own.items()
           if name in {data_field.name for data_field in dataclasses.fields(cls)}}
    numeric = (int, float)
    return {name: kind for name, kind in own.items()
            if any(arg in numeric for arg in (typing.get_args(kind) or (kind,)))
            or any(arg in numeric for inner in typing.get_args(kind) for arg in typing.get_args(inner))}


def test_every_config_field_declares_its_range():
    classes = config_classes()
    assert {cls.__name__ for cls in classes} >= {"LaVITConfig", "LaVITTokenizerConfig", "LaVITEvaVisionConfig",
                                                 "LaVITDetokenizerConfig", "LaVITImageGenerationConfig", "EvalConfig"}
    missing = []
    for cls in classes:
        ranges = getattr(cls, "field_ranges", {})
        missing += [f"{cls.__name__}.{name}" for name in typed_fields(cls) if name not in ranges]
    assert not missing, f"config fields without a declared range in field_ranges: {missing}"


@pytest.mark.parametrize("cls", config_classes(), ids=lambda cls: cls.__name__)
def test_bad_config_values_are_refused_by_name(cls):
    """Every ranged field of every config, given each bad value (items of list fields too): a `ValueError` or
    `TypeError` of one line naming the field, or a config whose field holds a value of its range."""
    for name, spec in cls.field_ranges.items():
        default = getattr(make(cls), name)
        for bad in BAD_VALUES:
            value = [bad] * len(default) if isinstance(default, list) else bad
            try:
                config = make(cls, **{name: value})
            except (ValueError, TypeError) as error:
                message = str(error)
                assert name in message and "\n" not in message.strip(), (cls.__name__, name, bad, message)
                if isinstance(spec, Range) and bad in (2**70, -(2**70)) and "must be" in message:
                    assert states_the_bound_exceeded(message, bad), (cls.__name__, name, message)
            else:
                stored = getattr(config, name)
                assert spec.contains(stored), (cls.__name__, name, bad, stored)


def test_a_config_json_with_nan_does_not_load(tmp_path):
    from lavit import LaVITTokenizerConfig

    LaVITTokenizerConfig().save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    settings["selector_threshold"] = math.nan
    (tmp_path / "config.json").write_text(json.dumps(settings))  # json writes NaN, as a careless script would
    with pytest.raises(ValueError, match=r"selector_threshold must be a finite number in \[0, 1\], got nan"):
        LaVITTokenizerConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------ the specs


def test_range_and_choice_agree_as_flag_types_and_checkers():
    """A flag's text is accepted exactly when its number is: the two faces of one declaration."""
    specs = [Range(1, integer=True), Range(0, 1, low_open=True), Range(-1, 5, integer=True, also=(-7,)),
             Range(0, 10), Range(2, 2**24, integer=True), Choice(("a", "b"))]
    for spec in specs:
        for text in BAD_TEXTS + ["1", "0.5", "5", "-7", "a", "b", "3"]:
            try:
                value = spec(text)
            except argparse.ArgumentTypeError as error:
                assert spec.describe() in str(error)
            else:
                assert spec.contains(value) and spec.check("x", value) == value


def in_declared_range(value, low, high, integer, low_open, high_open) -> bool:
    """The range written out once more, as the docs state it, for the property test below."""
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if integer and not -(2**63) <= value < 2**63:
        return False
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


@settings(max_examples=300, deadline=None)
@given(low=st.one_of(st.none(), st.integers(-5, 5)), width=st.one_of(st.none(), st.integers(0, 10)),
       integer=st.booleans(), low_open=st.booleans(), high_open=st.booleans(),
       value=st.one_of(st.integers(-(2**80), 2**80), st.integers(-20, 20), st.floats(), st.booleans()))
def test_a_range_holds_exactly_its_values_as_checker_and_as_flag(low, width, integer, low_open, high_open, value):
    high = None if width is None else (low or 0) + width
    spec = Range(low, high, integer=integer, low_open=low_open, high_open=high_open)
    expected = in_declared_range(value, low, high, integer, low_open, high_open)
    assert spec.contains(value) == expected
    if not expected:
        with pytest.raises(ValueError, match=rf"^x must be {re.escape(spec.describe())}, got "):
            spec.check("x", value)
    if isinstance(value, bool):
        return
    try:  # the flag's text: accepted exactly when the number it spells is in range
        parsed = spec(str(value))
    except argparse.ArgumentTypeError as error:
        assert not expected and spec.describe() in str(error)
    else:
        assert expected or (not integer and spec.contains(float(str(value))))
        assert parsed == value or not integer
