"""Issue 24 (U3): `--eval_split_size` declares the values it can use (a share below 1, a whole count from 1 on, 0 for
none) like every flag, and a value its data cannot split is refused with one line naming the flag, never with the
library's message. Every stage that takes the flag is found from the parsers."""

import math
import types

import datasets
import pytest
from lavit.training.evaluation import split_eval_records
from test_argument_ranges import command_parsers

from lavit.cli import main


def stages_with_the_flag() -> list[str]:
    return [name for name, parser in command_parsers().items()
            if any(action.dest == "eval_split_size" for action in parser._actions)]


def test_every_stage_refuses_a_fraction_above_one_at_the_flag(capsys):
    stages = stages_with_the_flag()
    assert {"train", "finetune", "train-tokenizer", "train-detokenizer"} <= set(stages)
    for stage in stages:
        with pytest.raises(SystemExit) as exit_info:  # argparse's exit, as for every flag
            main([stage, "--eval_split_size", "1.5"])
        assert exit_info.value.code == 2, stage
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1 and "--eval_split_size" in err[0] and "whole from 1 on" in err[0], (stage, err)


@pytest.mark.parametrize("size", [0.001, 0.05, 0.5, 0.95, 0.999, 1, 2, 9, 10, 11, 10**9])
def test_every_size_of_the_range_splits_or_is_refused_by_name(size):
    records = datasets.Dataset.from_list([{"image": f"{index}.png", "text": "x"} for index in range(10)])
    arguments = types.SimpleNamespace(eval_data=None, eval_split_size=size, streaming=False)
    try:
        train, held_out, _ = split_eval_records(records, arguments, seed=0)
    except ValueError as error:
        assert str(error).startswith(f"--eval_split_size {size} holds out") and "give a share " in str(error)
        assert (size if size >= 1 else math.ceil(size * 10)) in (10, 11, 10**9)  # nothing left to train on
    else:
        assert len(train) >= 1 and len(held_out) >= 1 and len(train) + len(held_out) == 10


# ------------------------------------------------------------------------------------------------ --max_length


def stages_with_max_length() -> list[str]:
    return [name for name, parser in command_parsers().items()
            if any(action.dest == "max_length" for action in parser._actions)]


def test_every_stage_refuses_a_max_length_beyond_the_context_before_reading_data(lavit_folder, tmp_path, capsys):
    """Each stage with `--max_length` (found from the parsers), given a model whose context is 512 tokens: one line
    naming the flag, the context length and the largest value that fits, before the data is read (here it does not
    even exist)."""
    stages = stages_with_max_length()
    assert set(stages) == {"train", "finetune"}
    for stage in stages:
        argv = [stage, "--model", str(lavit_folder), "--data", str(tmp_path / "missing"), "--max_length", "100000",
                "--output_dir", str(tmp_path / stage), "--resume", "no"]
        assert main(argv) == 1, stage
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit ")]  # no bars
        assert len(err) == 1 and "--max_length 100000" in err[0] and "context length of 512" in err[0], (stage, err)
        assert "give --max_length <= " in err[0] and "missing" not in err[0]


# ------------------------------------------------------------------------------------------------ a preset's split


def test_a_preset_split_of_one_record_names_the_count_the_preset_and_the_fix(lavit_folder, tmp_path, capsys):
    """`--preset small-data` on a dataset of one record said "a count in [1, 0]". It says the data has 1 record, that
    the preset holds out a share, and the fixes; `--eval_split_size 0` (one of them) then trains without the
    preset's evaluation settings."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red square"}\n')
    argv = ["finetune", "--model", str(lavit_folder), "--data", str(tmp_path / "photos"), "--preset", "small-data",
            "--max_length", "64", "--output_dir", str(tmp_path / "run"), "--resume", "no", "--max_steps", "1"]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit ")]
    assert len(err) == 1 and "--data has 1 record(s)" in err[0] and "--preset small-data holds out" in err[0], err
    assert "--eval_split_size 0" in err[0] and "--eval_data PATH" in err[0] and "[1, 0]" not in err[0]
    # the run's own flag is named as its own
    arguments = types.SimpleNamespace(eval_data=None, eval_split_size=0.5, streaming=False, preset=None)
    with pytest.raises(ValueError, match=r"--data has 1 record\(s\), and --eval_split_size holds out"):
        split_eval_records(datasets.Dataset.from_list([{"image": "a.png", "text": "x"}]), arguments, seed=0)

    assert main([*argv, "--eval_split_size", "0"]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
