"""`lavit.cli.demo`: the `lavit demo` parser (its defaults, the seed's range, an output path that is a written path)
and its runner's refusal, before any training, of an output that holds a folder lavit did not make."""

import argparse

import pytest

from lavit.cli import main
from lavit.cli.demo import RUNNERS, add_parsers, run_demo
from lavit.paths import OUTPUT, OutputPath


def demo_parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices["demo"]


def test_defaults_are_a_full_run_into_lavit_demo_with_seed_zero():
    args = demo_parser().parse_args([])
    assert args.output == "lavit-demo" and isinstance(args.output, OutputPath) and args.output.role == OUTPUT
    assert args.quick is False and args.seed == 0


def test_quick_and_seed_are_read():
    args = demo_parser().parse_args(["--quick", "--seed", "7", "--output", "somewhere"])
    assert args.quick is True and args.seed == 7 and args.output == "somewhere"


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1.5"])
def test_a_seed_outside_what_torch_accepts_is_refused(seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_parser().parse_args(["--seed", seed])
    assert exit_info.value.code == 2
    assert "argument --seed: must be an integer in [0, 4294967295]" in capsys.readouterr().err


def test_an_empty_output_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--output", " "])
    assert "argument --output: an empty path" in capsys.readouterr().err


def test_the_runner_of_demo_is_run_demo():
    assert RUNNERS == {"demo": run_demo}


def test_a_users_hub_folder_in_the_output_is_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "hub_folder").mkdir()
    (tmp_path / "hub_folder" / "mine.txt").write_text("the user's")
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lavit demo: error: ") and "hub_folder exists and was not made by lavit" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub_folder"]  # no data, no runs
    assert (tmp_path / "hub_folder" / "mine.txt").read_text() == "the user's"
