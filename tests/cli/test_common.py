"""`lavit.cli.common`: the help format every command shares (each flag's default shown once, never "default: None"),
`add_command`, the model-folder checks of `load_lavit` / `load_pipeline` that refuse a folder of the wrong kind before
anything loads, and `open_image` (RGB out, a clear error naming an unreadable file)."""

import argparse
import json

import pytest
from conftest import real_photos
from PIL import Image

from lavit.cli.common import HelpFormatter, add_command, load_lavit, load_pipeline, open_image
from lavit.command_inputs import CommandError


def parser_with(*flags) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    for args, settings in flags:
        parser.add_argument(*args, **settings)
    return parser


def help_of(parser: argparse.ArgumentParser, dest: str) -> str:
    (action,) = [action for action in parser._actions if action.dest == dest]
    return parser._get_formatter()._expand_help(action)


def test_a_flag_with_a_real_default_shows_it_once():
    parser = parser_with((["--steps"], dict(type=int, default=50, help="denoising steps")))
    assert help_of(parser, "steps") == "denoising steps (default: 50)"


@pytest.mark.parametrize("default", [None, False, "", []])
def test_a_flag_whose_default_means_not_given_shows_no_default(default):
    parser = parser_with((["--thing"], dict(default=default, help="a thing")))
    assert help_of(parser, "thing") == "a thing"


def test_a_help_that_already_names_its_default_is_left_as_it_is():
    parser = parser_with((["--dtype"], dict(default="float32", help="weights' dtype (Default: the folder's)")))
    assert help_of(parser, "dtype") == "weights' dtype (Default: the folder's)"


def test_positional_and_required_arguments_get_no_default():
    parser = parser_with((["source"], dict(default="x", help="the source")),
                         (["--model"], dict(required=True, default="m", help="a model")))
    assert help_of(parser, "source") == "the source"
    assert help_of(parser, "model") == "a model"


def test_add_command_uses_its_help_as_description_and_the_shared_format():
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    parser = add_command(commands, "frobnicate", "frobnicate the model")
    assert parser.description == "frobnicate the model" and parser.formatter_class is HelpFormatter
    assert parser.prog == "lavit frobnicate"
    (choice,) = commands._choices_actions
    assert choice.help == "frobnicate the model"


def write_config(folder, model_type: str):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_load_lavit_refuses_a_folder_of_another_kind_before_loading(tmp_path):
    folder = write_config(tmp_path / "tokenizer", "lavit_tokenizer")
    with pytest.raises(CommandError, match="holds a LaVIT visual tokenizer, but this command needs a LaVIT model"):
        load_lavit(str(folder))


def test_load_lavit_names_the_flag_the_folder_came_from(tmp_path):
    folder = write_config(tmp_path / "detokenizer", "lavit_detokenizer")
    with pytest.raises(CommandError, match=f"--language-model {folder} holds a LaVIT pixel decoder"):
        load_lavit(str(folder), flag="--language-model")


def test_load_pipeline_refuses_a_language_model_without_a_pixel_decoder(tmp_path):
    folder = write_config(tmp_path / "lm", "lavit")
    with pytest.raises(CommandError, match="language model without a pixel decoder: give a LaVITPipeline folder"):
        load_pipeline(str(folder))


def test_load_pipeline_refuses_a_missing_local_folder(tmp_path):
    with pytest.raises(CommandError, match="model folder not found"):
        load_pipeline(str(tmp_path / "nowhere"))


def test_open_image_gives_rgb_of_the_files_size(tmp_path):
    photo = real_photos()[1][:48, :64]  # a corner is enough: the reader, not the size, is under test
    path = tmp_path / "cat.png"
    Image.fromarray(photo).convert("L").save(path)  # grayscale on disk: RGB out
    image = open_image(str(path))
    assert image.mode == "RGB" and image.size == (photo.shape[1], photo.shape[0])


def test_open_image_names_an_unreadable_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(ValueError, match="cannot read image file .*notes.png"):
        open_image(str(path))
