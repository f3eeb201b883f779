"""`lavit.cli.language_model`: the `lavit new-language-model` parser (its sizes' defaults and ranges) and its runner:
it needs texts to train the tokenizer on (no source, a missing file, or files without a line of text are refused and
nothing is written), and sizes that do not fit are refused before a folder is made. (A whole run is
`tests/training/test_small_data.py`'s.)"""

import argparse

import pytest

from lavit.cli import main
from lavit.cli.language_model import RUNNERS, add_parsers, run_new_language_model
from lavit.command_inputs import CommandError


def parse(*argv) -> argparse.Namespace:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices["new-language-model"].parse_args(list(argv))


def test_defaults_are_the_small_model():
    args = parse("lm")
    assert (args.vocab_size, args.hidden_size, args.num_layers, args.num_heads, args.seed) == (1000, 64, 2, 4, 0)
    assert args.data is None and args.texts == []


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--vocab-size", "3", "(the special tokens and at least one more)"),
    ("--hidden-size", "1", "must be an integer in [2, 65536]"),
    ("--num-heads", "1", "(an even number that divides hidden_size)"),
    ("--num-layers", "0", "must be an integer in [1, 1024]"),
])
def test_sizes_outside_their_range_are_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        parse("lm", flag, value)
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and message in err


def test_no_source_of_texts_is_refused(tmp_path):
    with pytest.raises(CommandError, match="give --data .* and/or --texts"):
        run_new_language_model(parse(str(tmp_path / "lm")))
    assert not (tmp_path / "lm").exists()


def test_a_missing_text_file_is_named_and_nothing_is_written(tmp_path, capsys):
    assert main(["new-language-model", str(tmp_path / "lm"), "--texts", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lavit new-language-model: error: {tmp_path / 'missing.txt'}: ") and "does not exist" in err
    assert not (tmp_path / "lm").exists()


def test_text_files_of_blank_lines_are_no_texts(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main(["new-language-model", str(tmp_path / "lm"), "--texts", str(tmp_path / "blank.txt")]) == 1
    # the command's own user error, not a library's error with the traceback hint of an internal one
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "lavit new-language-model: error: no texts to train the tokenizer on"
    assert not (tmp_path / "lm").exists()


def test_heads_that_do_not_divide_the_width_are_refused_before_a_folder_is_made(tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("a red bus\na cat on a mat\n")
    code = main(["new-language-model", str(tmp_path / "lm"), "--texts", str(tmp_path / "texts.txt"),
                 "--hidden-size", "30", "--num-heads", "4"])
    assert code == 1
    assert "hidden_size (30) must be divisible by num_attention_heads (4)" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["texts.txt"]


def test_the_runner_is_run_new_language_model():
    assert RUNNERS == {"new-language-model": run_new_language_model}
