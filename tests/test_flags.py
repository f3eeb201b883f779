"""`lavit.flags` on a small parser of its own: which tokens are negative numbers, which flags are unknown (and what
the user meant instead), and `StrictArgumentParser`'s refusals: no abbreviations, an unknown flag reported before a
missing required one, and a value that starts with a dash given the way to pass it."""
import argparse

import pytest

from lavit.flags import (
    NEGATIVE_NUMBER,
    StrictArgumentParser,
    StrictFlags,
    closest_flag,
    described_flag,
    unknown_flags,
)


def small_parser(**kwargs) -> StrictArgumentParser:
    parser = StrictArgumentParser(prog="small", **kwargs)
    parser.add_argument("--model", required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("-o", "--output")
    return parser


def error_of(parser, args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("token", ["-1", "-.5", "-1.", "-1e-3", "-2E+4", "-1_000", "-inf", "-Infinity", "-NaN"])
def test_every_negative_number_float_reads_is_a_value(token):
    assert NEGATIVE_NUMBER.match(token)
    float(token)  # the pattern promises only what `float` accepts


@pytest.mark.parametrize("token", ["-x", "--1", "-e5", "-infx", "-1e", "-o1", "1", "-"])
def test_flags_and_other_tokens_are_not_negative_numbers(token):
    assert not NEGATIVE_NUMBER.match(token)


def test_unknown_flags_skips_values_known_flags_and_everything_after_a_double_dash():
    parser = small_parser()
    args = ["--model=m", "-ofile.png", "--temperature", "-1e-3", "-", "-a photo of", "--modle", "-x", "--",
            "--after"]
    assert unknown_flags(parser, args) == ["--modle", "-x"]


def test_an_unknown_flag_given_with_its_value_is_named_without_the_value():
    assert unknown_flags(small_parser(), ["--modle=m", "--lora=x"]) == ["--modle"]


def test_closest_flag_names_the_long_flag_meant_or_none():
    parser = small_parser()
    assert closest_flag(parser, "--modle") == "--model"
    assert closest_flag(parser, "--temprature") == "--temperature"
    assert closest_flag(parser, "--zzzzzzzz") is None


def test_a_dashed_value_after_a_flag_that_takes_one_is_described_with_the_equals_form():
    parser = small_parser()
    args = ["--model", "-qqqq"]
    assert described_flag(parser, args, "-qqqq") == "-qqqq (the value of --model? give --model=-qqqq)"
    # a boolean takes no value: no such hint after it
    assert described_flag(parser, ["--lora", "-qqqq"], "-qqqq") == "-qqqq"


def test_a_dashed_positional_value_is_told_to_come_last_after_a_double_dash():
    parser = small_parser()
    parser.add_argument("image")
    described = described_flag(parser, ["-qqqq"], "-qqqq")
    assert described == "-qqqq (a value that starts with a dash? give it last, after --, as in: ... -- -qqqq)"


def test_abbreviations_are_refused_even_when_asked_for(capsys):
    parser = small_parser(allow_abbrev=True)
    assert parser.allow_abbrev is False
    err = error_of(parser, ["--mod", "m"], capsys)
    assert "unrecognized arguments: --mod (did you mean --model?)" in err


def test_an_unknown_flag_is_reported_before_a_missing_required_one(capsys):
    err = error_of(small_parser(), ["--modle", "m"], capsys)
    assert err == "small: error: unrecognized arguments: --modle (did you mean --model?)"


def test_a_negative_number_is_the_value_of_its_flag():
    parsed = small_parser().parse_args(["--model", "m", "--temperature", "-1e-3"])
    assert parsed.temperature == -1e-3


def test_a_value_that_starts_with_a_dash_and_left_its_flag_empty_gets_the_way_to_give_it(capsys):
    parser = small_parser()
    err = error_of(parser, ["--model", "m", "-o", "--help"], capsys)
    assert "argument -o/--output: expected one argument" in err and "give -o=--help" in err
    assert parser.parse_args(["--model", "m", "-o=--help"]).output == "--help"


def test_the_command_line_is_read_from_sys_argv_when_no_args_are_given(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["small", "--modle", "m"])
    assert "--modle (did you mean --model?)" in error_of(small_parser(), None, capsys)


def test_strict_flags_is_a_mixin_of_any_argument_parser(capsys):
    class StrictRawHelp(StrictFlags, argparse.ArgumentParser):  # as HfArgumentParser gets it
        pass

    parser = StrictRawHelp(prog="mixin", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    assert parser.allow_abbrev is False
    assert "--mode (did you mean --model?)" in error_of(parser, ["--mode", "m"], capsys)
