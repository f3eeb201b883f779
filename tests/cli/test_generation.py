"""`lavit.cli.generation`: the `lavit generate` and `lavit reconstruct` parsers (required output, guidance and size
ranges), `decoder_settings` (only the sizes given), `FILE_OUTPUTS` (how many numbered files each command writes, and
its inputs), and the refusals that come before the pipeline loads: a user's file in the way, an output that is an
input, unreadable images."""

import argparse

import pytest
from PIL import Image

from lavit.cli import main
from lavit.cli.generation import FILE_OUTPUTS, RUNNERS, add_parsers, decoder_settings, run_generate, run_reconstruct


def parsers() -> dict[str, argparse.ArgumentParser]:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices


def parse(command: str, *argv) -> argparse.Namespace:
    return parsers()[command].parse_args(list(argv))


def test_generate_defaults_and_several_prompts():
    args = parse("generate", "a red bus", "a cat", "-o", "out.png", "--model", "org/model")
    assert args.prompts == ["a red bus", "a cat"] and args.output == "out.png"
    assert (args.num_images, args.seed, args.guidance_scale, args.decoder_guidance_scale) == (1, 0, 4.0, None)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--guidance-scale", "0.5", "must be a finite number >= 1 (1 turns guidance off)"),
    ("--decoder-guidance-scale", "nan", "must be a finite number >= 1"),
    ("--height", "0", "must be an integer >= 1"),
    ("--num-images", "-2", "must be an integer >= 1"),
])
def test_generate_refuses_values_outside_their_range(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        parse("generate", "a cat", "-o", "out.png", "--model", "m", flag, value)
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_an_output_is_required(capsys):
    with pytest.raises(SystemExit):
        parse("reconstruct", "photo.png", "--model", "m")
    assert "required: -o/--output" in capsys.readouterr().err


def test_decoder_settings_pass_only_the_sizes_given():
    args = parse("generate", "a cat", "-o", "out.png", "--model", "m")
    assert decoder_settings(args) == {"num_inference_steps": None}
    args = parse("generate", "a cat", "-o", "out.png", "--model", "m", "--steps", "3", "--height", "64",
                 "--width", "32")
    assert decoder_settings(args) == {"num_inference_steps": 3, "height": 64, "width": 32}
    # reconstruct has no size flags
    assert decoder_settings(parse("reconstruct", "a.png", "-o", "b.png", "--model", "m", "--steps", "2")) == {
        "num_inference_steps": 2}


def test_file_outputs_count_every_image_written():
    args = parse("generate", "a", "b", "c", "-o", "out.png", "--model", "m", "--num-images", "2")
    assert FILE_OUTPUTS["generate"](args) == ("--output", "out.png", 6, {"--model": "m"})
    args = parse("reconstruct", "x.png", "y.png", "-o", "out.png", "--model", "m")
    assert FILE_OUTPUTS["reconstruct"](args) == ("--output", "out.png", 2, {"images": ["x.png", "y.png"],
                                                                              "--model": "m"})


def test_a_numbered_output_that_is_a_users_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "out-3.png").write_text("the user's")
    code = main(["generate", "a", "b", "-o", str(tmp_path / "out.png"), "--num-images", "2", "--model", "org/model"])
    assert code == 1
    assert "out-3.png (--output) exists and was not written by lavit" in capsys.readouterr().err
    assert (tmp_path / "out-3.png").read_text() == "the user's"


def test_reconstruct_refuses_to_write_over_its_input(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    assert main(["reconstruct", str(photo), "-o", str(photo), "--model", "org/model"]) == 1
    assert "is the input images" in capsys.readouterr().err


def test_reconstruct_reads_every_image_before_the_pipeline(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    # a Hub id that is never looked up: the unreadable image ends the command first
    assert main(["reconstruct", str(broken), "-o", str(tmp_path / "out.png"), "--model", "org/never-loaded"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lavit reconstruct: error: {broken}: ") and "cannot read image file" in err[-1]
    assert not (tmp_path / "out.png").exists()
    assert RUNNERS == {"generate": run_generate, "reconstruct": run_reconstruct}
