"""The stage scripts' shape: one parser per stage, shared by `lavit <stage>` and `python -m lavit.training.<stage>`;
flags in both spellings or one config file; scripts never import scripts."""

import argparse
import ast
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from lavit.training.arguments import LaVITArgumentParser, PretrainingArguments
from transformers import TrainingArguments
from transformers.hf_argparser import string_to_bool

from lavit.cli import TRAINING_COMMANDS, build_parser, main
from lavit.cli.training import TRAINING_ALIASES
from lavit.command_inputs import CommandError

STAGE_SCRIPTS = {module.rsplit(".", 1)[1] for module in TRAINING_COMMANDS.values()}


def options_of(help_text: str) -> str:
    """A `--help` text without its usage line (which names the program)."""
    return help_text.split("options:", 1)[1]


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_a_stage_parser_is_the_same_under_lavit_and_alone(command):
    stage = importlib.import_module(TRAINING_COMMANDS[command])
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(parser_class=LaVITArgumentParser)
    under_lavit, alone = stage.make_parser(commands), stage.make_parser()
    assert isinstance(alone, LaVITArgumentParser) and under_lavit.prog == f"lavit {command}"
    assert options_of(under_lavit.format_help()) == options_of(alone.format_help())
    assert command in commands.choices  # the script names its command as the CLI does
    listing = build_parser().format_help()
    assert command in listing and "(--help lists its flags)" in listing


def test_python_m_runs_the_stage_parser(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lavit.training.pretokenize", "--help"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(parser_class=LaVITArgumentParser)
    expected = importlib.import_module(TRAINING_COMMANDS["pretokenize"]).make_parser(commands).format_help()
    assert options_of(result.stdout).split() == options_of(expected).split()  # the width of the terminal aside


def test_flags_take_both_spellings_and_a_config_file_gives_the_same_arguments(tmp_path, capsys):
    from lavit.training.stage2_pretrain import make_parser

    flags = {"data": "pairs.jsonl", "max_length": 128, "image_to_text_ratio": 0.25, "output_dir": str(tmp_path),
             "max_steps": 7, "per_device_train_batch_size": 2}
    underscores = [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    dashes = [item.replace("_", "-") if item.startswith("--") else item for item in underscores]
    (tmp_path / "stage2.json").write_text(json.dumps(flags))
    parsed = [make_parser().parse_args_and_config(argv) for argv in (underscores, dashes, [tmp_path / "stage2.json"])]
    for script_args, training_args in parsed:
        assert isinstance(script_args, PretrainingArguments)
        assert (script_args.max_length, script_args.image_to_text_ratio) == (128, 0.25)
        assert (training_args.max_steps, training_args.per_device_train_batch_size) == (7, 2)
    (tmp_path / "typo.json").write_text(json.dumps({**flags, "max_lenght": 64}))
    with pytest.raises(SystemExit):
        make_parser().parse_args_and_config([tmp_path / "typo.json"])
    assert "typo.json: unrecognized arguments: --max_lenght (did you mean --max_length?)" in capsys.readouterr().err


def test_a_training_command_checks_the_folder_of_its_model_argument(capsys, tmp_path):
    folder = tmp_path / "detokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "lavit_detokenizer"}))
    code = main(["pretokenize", "--data", "pairs.jsonl", "--visual_tokenizer", str(folder), "--output", "out"])
    err = capsys.readouterr().err
    assert code == 1 and "holds a LaVIT pixel decoder (detokenizer), but this command needs a LaVIT visual " \
                          "tokenizer or a LaVIT model folder" in err
    # one flag name per input: the stage's own, no --model alias rewritten into it
    with pytest.raises(SystemExit) as exit_info:
        main(["pretokenize", "--data", "pairs.jsonl", "--model", str(folder), "--output", "out"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: lavit pretokenize" in err and "unrecognized arguments: --model" in err


@pytest.mark.parametrize("old", sorted(TRAINING_ALIASES))
def test_a_former_command_name_runs_its_command(old, capsys):
    """`lavit preprocess` (renamed `pretokenize`: "preprocess" is an image processor's resize-and-normalise) still
    runs, listed beside its new name, and so does its console script."""
    from importlib.metadata import entry_points

    new = TRAINING_ALIASES[old]
    with pytest.raises(SystemExit) as exit_info:
        main([old, "--no-such-flag"])
    assert exit_info.value.code == 2 and f"usage: lavit {new}" in capsys.readouterr().err
    assert f"{new} ({old})" in " ".join(build_parser(full=False).format_help().split())
    scripts = {script.name: script.value for script in entry_points(group="console_scripts")}
    assert scripts[f"lavit-{old}"] == scripts[f"lavit-{new}"] == f"{TRAINING_COMMANDS[new]}:cli"


def test_scripts_never_import_scripts():
    for path in sorted((REPO_ROOT / "training").glob("*.py")):
        imported = {node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported = {name.rsplit(".", 1)[-1] for name in imported}
        assert not imported & STAGE_SCRIPTS, f"{path.name} imports the stage script(s) {imported & STAGE_SCRIPTS}"


@pytest.mark.parametrize("command", sorted(set(TRAINING_COMMANDS) - {"pretokenize"}))
def test_the_trainers_resume_flag_is_refused_for_the_stages_own(command, tmp_path, capsys):
    """atk36 F3: `--resume_from_checkpoint CHECKPOINT` (TrainingArguments') was accepted and ignored: the run
    trained from scratch. The stages resume with `--resume`; the Trainer's flag is refused, naming it."""
    module = importlib.import_module(TRAINING_COMMANDS[command])
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": "photos", "output_dir": str(tmp_path / "out"),
                                  "resume_from_checkpoint": "runs/a/checkpoint-25"}))
    for argv in (["--data", "photos", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint",
                  "runs/a/checkpoint-25"], [str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            module.make_parser().parse_args_and_config(argv)
        assert exit_info.value.code == 2
        assert "give --resume PATH" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", sorted(set(TRAINING_COMMANDS) - {"pretokenize"}))
@pytest.mark.parametrize(("key", "value", "said"), [
    ("resume", "off", "--resume off: not auto, no, weights_only nor a checkpoint folder"),
    ("resume", "runs/a/checkpoint-25", "--resume runs/a/checkpoint-25: not auto, no, weights_only nor a checkpoint"),
    ("fsdp", "off", "Unknown `fsdp` option: off"),
    ("deepspeed", "EMPTY", "is not a JSON file: Expecting value: line 1 column 1"),
    ("deepspeed", "LIST", "holds list '[]', not a DeepSpeed config"),
    ("deepspeed", "FOLDER", "is a folder: give a DeepSpeed config file")])
def test_a_value_the_arguments_own_checks_refuse_is_an_argparse_error(command, key, value, said, tmp_path, capsys):
    """atk36: `resume: off` and `fsdp: off` in a config file were found at run time, after the models loaded, and
    TrainingArguments' own refusal was a raw ValueError. Every value a dataclass's `__post_init__` refuses is said as
    a bad flag is (status 2, the config file named), before anything is built."""
    module = importlib.import_module(TRAINING_COMMANDS[command])
    if value in ("EMPTY", "LIST", "FOLDER"):  # atk38/39: "Expecting value: line 1 column 1", an AttributeError, an
        kind, value = value, str(tmp_path / "ds.json")  # IsADirectoryError, none naming --deepspeed or its file
        if kind == "FOLDER":
            (tmp_path / "ds.json").mkdir()
        else:
            (tmp_path / "ds.json").write_text("" if kind == "EMPTY" else "[]")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": "photos", "output_dir": str(tmp_path / "out"), key: value}))
    for argv in (["--data", "photos", "--output_dir", str(tmp_path / "out"), f"--{key}", value], [str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            module.make_parser().parse_args_and_config(argv)
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in last and last.startswith(f"{module.make_parser().prog}: error: ")
        assert (str(config) in last) == (argv == [str(config)]), last
    assert not (tmp_path / "out").exists()


def test_a_resume_path_is_read_with_its_home_expanded_by_every_reader(tmp_path, monkeypatch):
    """atk38: `--resume ~/checkpoint-1` passed the parse-time check (which expanded `~`) and then failed after the
    models loaded, where the checkpoint was read without expanding it. The argument holds the expanded path."""
    from lavit.training.arguments import FinetuningArguments

    (tmp_path / "checkpoint-1").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    arguments = FinetuningArguments(data="d", model="m", resume="~/checkpoint-1")
    assert arguments.resume == str(tmp_path / "checkpoint-1")
    assert FinetuningArguments(data="d", model="m", resume="auto").resume == "auto"


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_a_config_file_reads_every_value_as_its_flag_does(command, tmp_path):
    """Every boolean and every choice flag of every stage, set in a YAML file (bare words: YAML 1.1 reads `no` and
    `off` as False, so `eval_strategy: no` was False) and in a JSON file (strings: `"bf16": "no"` was the truthy
    string "no", turning bf16 on), gives the dataclasses the same flags on the command line give."""
    import yaml

    parser = importlib.import_module(TRAINING_COMMANDS[command]).make_parser()
    required = {"data": "photos", "output": str(tmp_path / "out"), "output_dir": str(tmp_path / "out")}
    fields = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    trainer_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    words = {name: required[name] for name in required if name in fields}
    for name, action in fields.items():
        if action.type is string_to_bool:
            words[name] = "no"
        elif action.choices and name not in words and (name not in trainer_fields or "no" in action.choices):
            # every choice flag of the stage's own dataclasses; of the Trainer's, the strategies (whose "no" YAML 1.1
            # read as False): others need a device setup (ddp_backend, fsdp...)
            words[name] = "no" if "no" in action.choices else str(next(iter(action.choices)))
    argv = [item for name, word in words.items() for item in (f"--{name}", word)]
    (tmp_path / "run.yaml").write_text("".join(f"{name}: {word}\n" for name, word in words.items()))
    (tmp_path / "run.json").write_text(json.dumps(words))
    (tmp_path / "off.yaml").write_text(yaml.safe_dump({**words, **{name: "off" for name, action in fields.items()
                                                                 if action.type is string_to_bool}}).replace("'", ""))
    expected = [dataclasses.asdict(arguments) for arguments in parser.parse_args_and_config(argv)]
    assert any(value is False for arguments in expected for value in arguments.values())
    for config in ("run.yaml", "run.json", "off.yaml"):
        parsed = parser.parse_args_and_config([str(tmp_path / config)])
        assert [dataclasses.asdict(arguments) for arguments in parsed] == expected, config


# texts that YAML 1.1 reads as something else (octal, hex, base 60, a date, a number, booleans) and a float form
TRICKY_TEXTS = ("010", "0x10", "1:30", "2024-01-01", "1_000", "yes", "off", "1e-3")
TRAINER_SAMPLE = ("max_steps", "learning_rate", "run_name", "output_dir", "report_to", "warmup_steps")


def outcome(parser, argv, capsys):
    """The dataclasses `argv` gives (as dicts), or "refused"."""
    try:
        return [dataclasses.asdict(arguments) for arguments in parser.parse_args_and_config(argv)]
    except (SystemExit, ValueError, CommandError):
        capsys.readouterr()
        return "refused"


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_a_config_file_value_is_read_as_the_text_written(command, tmp_path, capsys):
    """The attack on the config files: YAML 1.1 made `max_steps: 010` 8, `run_name: 2024-01-01` a date and
    `output_dir: ~` the Trainer's default; a list made a boolean true. Every own flag of every stage that takes one
    plain value (and a sample of the Trainer's), given each text YAML 1.1 reads as something else: the config file
    and the flag give the same dataclasses, or both are refused."""
    parser = importlib.import_module(TRAINING_COMMANDS[command]).make_parser()
    trainer_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    required = {"data": "photos", "output": str(tmp_path / "out"), "output_dir": str(tmp_path / "out")}
    flags = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    base = {name: value for name, value in required.items() if name in flags}
    checked = 0
    for name, action in flags.items():
        if action.nargs is not None or action.type is string_to_bool or action.choices or (
                name in trainer_fields and name not in TRAINER_SAMPLE):
            continue
        for text in TRICKY_TEXTS:
            values = {**base, name: text}
            (tmp_path / "run.yaml").write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
            argv = [f"--{key}={value}" for key, value in values.items()]
            assert outcome(parser, [str(tmp_path / "run.yaml")], capsys) == outcome(parser, argv, capsys), (name, text)
            checked += 1
    assert checked >= 5 * len(TRICKY_TEXTS)
    yaml_file = tmp_path / "RUN.YAML"  # any case of the suffix; a null leaves the key out
    yaml_file.write_text("".join(f"{key}: {value}\n" for key, value in base.items()) + "seed: ~\n")
    assert outcome(parser, [str(yaml_file)], capsys) == outcome(parser, [f"--{k}={v}" for k, v in base.items()], capsys)
    boolean = next(name for name, action in flags.items() if action.type is string_to_bool)
    (tmp_path / "list.json").write_text(json.dumps({**base, boolean: [False]}))
    with pytest.raises(ValueError, match=rf"list\.json: {boolean}: a list, but --{boolean} takes one value"):
        parser.parse_args_and_config([str(tmp_path / "list.json")])
    if "max_steps" in flags:  # a bad value is argparse's error, naming the file
        (tmp_path / "bad.yaml").write_text("".join(f"{key}: {value}\n" for key, value in base.items())
                                           + "max_steps: abc\n")
        with pytest.raises(SystemExit):
            parser.parse_args_and_config([str(tmp_path / "bad.yaml")])
        assert "bad.yaml: argument --max_steps" in capsys.readouterr().err


def test_a_config_file_gives_mappings_and_lists_to_the_fields_declared_so():
    """`lr_scheduler_kwargs` (a mapping, typed as YAML 1.2 reads it) and `report_to: [none]` (a list for a field
    declared a list whose flag takes one token) reach the Trainer's arguments as they would from Python."""
    import tempfile

    from lavit.training.stage2_pretrain import make_parser

    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "run.yaml"
        config.write_text(f"data: photos\noutput_dir: {folder}/out\nreport_to: [none]\n"
                          "lr_scheduler_kwargs: {min_lr: 1e-6, num_cycles: 010, step: 0x10, at: 1:30, on: yes}\n")
        _, training_args = make_parser().parse_args_and_config([str(config)])
    assert training_args.report_to == []  # YAML 1.2 inside a mapping: 010 is 10 (1.1: 8), 1e-6 a float (1.1: text)
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-6, "num_cycles": 10, "step": 16, "at": "1:30",
                                                 "on": "yes"}


BASE = "data: photos\noutput_dir: out\n"
REFUSED = {  # the second attack on the config files: what no flag could say, refused naming the file and the key
    "given twice": (BASE + "max_steps: 5\nmax_steps: ~\n", "run.yaml: max_steps is given twice"),
    "given twice in JSON": ('{"data": "p", "output_dir": "o", "max_steps": 5, "max_steps": 7}',
                            "run.json: max_steps is given twice"),
    "both spellings": (BASE + "max_steps: 5\nmax-steps: 7\n", "run.yaml: max-steps and max_steps set the same flag"),
    "a key with =": (BASE + "output_dir=x: y\n", "run.yaml: 'output_dir=x' is not a flag name"),
    "a key that is a list": (BASE + "? [a, b]\n: 1\n", "run.yaml: ['a', 'b'] is not a flag name"),
    "a nested list": (BASE + "label_names: [[a, b], c]\n", "run.yaml: label_names: the item ['a', 'b'] is not a "
                                                            "plain value"),
    "a null item": (BASE + "report_to: [~]\n", "run.yaml: report_to: the item None is not a plain value"),
    "a dash item": (BASE + "label_names: [-x, y]\n", "run.yaml: label_names: the item '-x' starts with a dash"),
    "a bad no_ value": (BASE + "no_logging_nan_inf_filter: maybe\n", "run.yaml: no_logging_nan_inf_filter: Truthy"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_config_file_refuses_what_no_flag_could_say(case, tmp_path, capsys):
    from lavit.training.stage2_pretrain import make_parser

    text, message = REFUSED[case]
    path = tmp_path / ("run.json" if text.startswith("{") else "run.yaml")
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        make_parser().parse_args_and_config([str(path)])
    assert str(error.value).startswith(str(tmp_path / message.split(":")[0])) and message in str(error.value), (
        case, str(error.value))
    # `lavit train` says it as the user's error: one line, no traceback hint (an internal error's)
    assert main(["train", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"lavit train: error: {error.value}"], lines
