"""`lavit.cli.publishing`: the `lavit convert-original`, `export` and `push` parsers (their defaults and choices),
and the refusals their runners make before any model is loaded, converted or uploaded: a destination lavit did not
make, a metadata file that is not a JSON object, a model folder of the wrong kind."""

import argparse
import json

import pytest

from lavit.cli import main
from lavit.cli.publishing import RUNNERS, add_parsers, run_convert, run_export, run_push


def parse(command: str, *argv) -> argparse.Namespace:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices[command].parse_args(list(argv))


def test_convert_defaults_to_the_highres_decoder_and_16_heads():
    args = parse("convert-original", "release", "out")
    assert (args.pixel_decoder, args.dtype, args.num_heads) == ("highres", None, 16)


def test_convert_refuses_an_unknown_decoder_and_zero_heads(capsys):
    with pytest.raises(SystemExit):
        parse("convert-original", "release", "out", "--pixel-decoder", "medium")
    err = capsys.readouterr().err
    assert "argument --pixel-decoder: invalid choice: 'medium'" in err and "lowres" in err
    with pytest.raises(SystemExit):
        parse("convert-original", "release", "out", "--num-heads", "0")
    assert "argument --num-heads: must be an integer >= 1" in capsys.readouterr().err


def test_export_and_push_defaults():
    export = parse("export", "hub", "--model", "m")
    assert (export.metadata, export.repo_id, export.max_shard_size) == (None, None, "5GB")
    push = parse("push", "org/name", "--model", "m")
    assert (push.repo_id, push.private, push.token) == ("org/name", False, None)
    assert parse("push", "org/name", "--model", "m", "--private").private is True


def test_convert_refuses_a_users_destination_before_converting(tmp_path, capsys):
    (tmp_path / "release").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert main(["convert-original", str(tmp_path / "release"), str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert "mine exists and was not made by lavit" in err and "will not replace it" in err
    assert "release folder" not in err  # refused before the source was read
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "cannot read metadata file"),
    (json.dumps("a summary"), "must hold a JSON object ({\"summary\": ...}), got a str"),
    (json.dumps(3), "must hold a JSON object ({\"summary\": ...}), got a int"),
])
def test_export_refuses_metadata_that_is_not_a_json_object(content, problem, tmp_path, capsys):
    metadata = tmp_path / "run.json"
    metadata.write_text(content)
    code = main(["export", str(tmp_path / "hub"), "--model", "org/never-loaded", "--metadata", str(metadata)])
    err = capsys.readouterr().err
    assert code == 1 and problem in err and str(metadata) in err
    assert not (tmp_path / "hub").exists()


def test_export_refuses_metadata_that_is_not_text(tmp_path, capsys):
    metadata = tmp_path / "run.json"
    metadata.write_bytes(b"\xff\xfe\x00binary")
    assert main(["export", str(tmp_path / "hub"), "--model", "org/never-loaded", "--metadata", str(metadata)]) == 1
    assert "cannot read metadata file" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["export", "hub"], ["push", "org/name"]])
def test_export_and_push_refuse_a_visual_tokenizer_folder(command, tmp_path, capsys):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "lavit_tokenizer"}))
    command = [command[0], str(tmp_path / command[1]) if command[0] == "export" else command[1]]
    assert main([*command, "--model", str(folder)]) == 1
    assert "holds a LaVIT visual tokenizer, but this command needs a LaVIT model folder" in capsys.readouterr().err


def test_each_command_has_its_runner():
    assert RUNNERS == {"convert-original": run_convert, "export": run_export, "push": run_push}
