"""#24 §8: a value a `--preset` filled in is named in an error as the preset's, never as if the user had typed it;
and a preset's held-out split gives way to the run's own `--eval_data`."""

import types

import datasets
import pytest
from lavit.training.arguments import FinetuningArguments, PretrainingArguments, TokenizerTrainingArguments
from lavit.training.evaluation import split_eval_records
from lavit.training.presets import PRESETS, apply_preset, explained_by_preset
from PIL import Image

from lavit.cli import main

STAGE_ARGUMENTS = {"tokenizer": TokenizerTrainingArguments, "pretrain": PretrainingArguments,
                   "finetune": FinetuningArguments}


def preset_cases():
    for stage, presets in PRESETS.items():
        for name, preset in presets.items():
            for setting in preset.settings:
                yield pytest.param(stage, name, setting, id=f"{stage}-{name}-{setting}")


def test_every_stage_with_a_preset_explains_its_errors():
    """Each stage script with a preset runs inside `explained_by_preset` (`lavit COMMAND` and `python -m` alike)."""
    import importlib
    import inspect

    from lavit.cli.training import TRAINING_COMMANDS

    assert set(STAGE_ARGUMENTS) == set(PRESETS)
    for module_name in TRAINING_COMMANDS.values():
        module = importlib.import_module(module_name)
        arguments = inspect.signature(module.main).parameters["script_args"].annotation
        if any(arguments is STAGE_ARGUMENTS[stage] for stage in PRESETS):
            assert "with explained_by_preset(script_args)" in inspect.getsource(module.main), module_name


@pytest.mark.parametrize(("stage", "name", "setting"), list(preset_cases()))
def test_every_preset_setting_is_named_as_the_presets_in_an_error(stage, name, setting, tmp_path, lavit_model):
    from lavit.training.arguments import LaVITTrainingArguments

    script_args = STAGE_ARGUMENTS[stage](data="photos", preset=name)
    training_args = LaVITTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    _, applied = apply_preset(stage, name, script_args, training_args, lavit_model)
    message = f"--{setting} does not fit this run: give another --{setting}"
    error = ValueError(message)
    with pytest.raises(ValueError) as raised:
        with explained_by_preset(script_args):
            raise error
    if setting in applied:
        assert str(raised.value).startswith(message) and f"set by --preset {name}" in str(raised.value)
        assert f"--{setting} {applied[setting]}" in str(raised.value)
    # a flag the run gave itself is its own: no preset note
    script_args = STAGE_ARGUMENTS[stage](data="photos", preset=name)
    script_args.given_flags = frozenset({setting})
    apply_preset(stage, name, script_args, training_args, lavit_model)
    with pytest.raises(ValueError) as raised:
        with explained_by_preset(script_args):
            raise ValueError(message)
    assert str(raised.value) == message


def photos(folder, count):
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(folder / f"{index}.png")
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{index}.png", "text": "square {index}"}}\n'
                                                   for index in range(count)))
    return folder


def test_a_preset_split_of_streamed_data_names_the_preset(lavit_folder, tmp_path, capsys):
    """The issue's example: `--preset small-data --streaming` said "--eval_split_size holds out a share of --data,
    which a streamed dataset cannot do", a flag the user never gave."""
    argv = ["finetune", "--model", lavit_folder, "--data", photos(tmp_path / "photos", 3), "--preset", "small-data",
            "--streaming", "true", "--max_length", "64", "--output_dir", tmp_path / "run", "--resume", "no",
            "--max_steps", "1"]
    assert main([str(arg) for arg in argv]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit ")]
    assert len(err) == 1 and "--eval_split_size 0.1: set by --preset small-data" in err[0], err


def test_a_preset_split_gives_way_to_the_runs_eval_data(tmp_path):
    """`--preset small-data --eval_data PATH` failed with "give --eval_data or --eval_split_size, not both"."""
    records = datasets.Dataset.from_list([{"image": f"{index}.png", "text": "x"} for index in range(4)])
    settings = {"eval_data": str(photos(tmp_path / "held_out", 2)), "eval_split": None, "split": "train",
                "streaming": False, "image_column": None, "text_column": None}
    arguments = types.SimpleNamespace(**settings, eval_split_size=0.1, preset="small-data",
                                      preset_settings={"eval_split_size": 0.1})
    training, held_out, _ = split_eval_records(records, arguments, seed=0)
    assert len(training) == 4 and len(held_out) == 2  # all of --data trains; --eval_data is held out
    own = types.SimpleNamespace(**settings, eval_split_size=0.1, preset=None)
    with pytest.raises(ValueError, match="not both"):  # both given by the run itself: still refused
        split_eval_records(records, own, seed=0)


def test_a_preset_leaves_out_its_held_out_evaluation_when_the_run_turns_evaluation_off(tmp_path):
    """The attack of #24: `finetune --preset small-data --eval_strategy no` still held out a tenth of the data and
    evaluated. Turned off by the run, the preset's evaluation settings are left out (all of --data trains); held-out
    data the run gives itself beside `--eval_strategy no` is a contradiction, refused in one line."""
    from lavit.training.arguments import LaVITTrainingArguments, make_stage_parser
    from lavit.training.evaluation import configure_evaluation
    from lavit.training.presets import HELD_OUT_EVALUATION

    parser = make_stage_parser((FinetuningArguments, LaVITTrainingArguments), None, "finetune", "")
    common = ["--data", "unused", "--model", "org/name", "--output_dir", str(tmp_path / "run"), "--preset",
              "small-data"]
    script, training = parser.parse_args_and_config([*common, "--eval_strategy", "no"])
    _, applied = apply_preset("finetune", "small-data", script, training)
    assert not set(applied) & HELD_OUT_EVALUATION and script.eval_split_size == 0, applied
    records = datasets.Dataset.from_list([{"image": f"{index}.png", "text": "x"} for index in range(10)])
    training_records, held_out, _ = split_eval_records(records, script, seed=0)
    assert len(training_records) == 10 and held_out is None
    assert configure_evaluation(training, script, has_eval_data=False) == []
    assert training.eval_strategy == "no" and not training.load_best_model_at_end
    # --eval_split_size 0 (and no --eval_data) turns it off too: nothing of it is applied, nor announced (atk36 F4)
    script, training = parser.parse_args_and_config([*common, "--eval_split_size", "0"])
    _, applied = apply_preset("finetune", "small-data", script, training)
    assert not set(applied) & HELD_OUT_EVALUATION, applied
    assert configure_evaluation(training, script, has_eval_data=False) == []
    # without --eval_strategy no the preset evaluates as before
    script, training = parser.parse_args_and_config(common)
    _, applied = apply_preset("finetune", "small-data", script, training)
    assert {"eval_split_size", "eval_strategy", "load_best_model_at_end"} <= set(applied)
    # the run's own held-out data with --eval_strategy no: refused, naming both
    script, training = parser.parse_args_and_config([*common, "--eval_strategy", "no", "--eval_split_size", "0.2"])
    apply_preset("finetune", "small-data", script, training)
    with pytest.raises(ValueError, match="--eval_strategy no turns evaluation off, but the run holds out data"):
        configure_evaluation(training, script, has_eval_data=True)
