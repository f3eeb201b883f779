"""`lavit.cli.images`: the `lavit tokenize`, `caption` and `vqa` parsers (each one's defaults, the text-sampling
flags only where text is generated), `question_text`, the seeded settings (`image_selection`, `text_generation`:
the same seed gives the same random stream), `FILE_OUTPUTS`, and the runners' refusals before any model loads
(a model folder of the wrong kind, unreadable images reported one per input)."""

import argparse
import json

import pytest
import torch

from lavit import LaVITImageSelection
from lavit.cli import main
from lavit.cli.images import (
    FILE_OUTPUTS,
    RUNNERS,
    add_parsers,
    image_selection,
    question_text,
    run_caption,
    run_tokenize,
    run_vqa,
    text_generation,
)


def parse(command: str, *argv) -> argparse.Namespace:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices[command].parse_args(list(argv))


def test_a_question_is_kept_as_given_and_a_blank_one_refused():
    assert question_text(" What colour is the bus? ") == " What colour is the bus? "
    for blank in ("", " ", "\t\n"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a non-empty question"):
            question_text(blank)


def test_caption_and_vqa_defaults_are_the_official_settings():
    caption = parse("caption", "a.png", "--model", "m")
    assert (caption.max_new_tokens, caption.num_beams, caption.batch_size, caption.prompt) == (36, 2, 8, "")
    vqa = parse("vqa", "a.png", "--model", "m", "--question", "why?")
    assert (vqa.max_new_tokens, vqa.num_beams, vqa.do_sample, vqa.seed) == (10, 5, False, 0)


def test_tokenize_takes_no_text_sampling_flags(capsys):
    args = parse("tokenize", "a.png", "--model", "m", "--budget", "4", "--selection", "sample")
    assert (args.budget, args.selection, args.visualize) == (4, "sample", None)
    assert not hasattr(args, "do_sample") and not hasattr(args, "temperature")
    with pytest.raises(SystemExit):
        parse("tokenize", "a.png", "--model", "m", "--selection", "random")
    assert "argument --selection: invalid choice: 'random'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [("--top-p", "0", "must be a finite number in (0, 1]"),
                                                        ("--temperature", "0", "must be a finite number > 0"),
                                                        ("--batch-size", "0", "must be an integer >= 1")])
def test_caption_refuses_settings_outside_their_range(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        parse("caption", "a.png", "--model", "m", flag, value)
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_text_generation_is_beam_search_unless_sampling_is_asked():
    args = parse("caption", "a.png", "--model", "m", "--num-beams", "3")
    assert text_generation(args) == {"num_beams": 3, "do_sample": False}


def test_sampled_text_draws_from_a_generator_seeded_with_seed():
    args = parse("vqa", "a.png", "--model", "m", "--question", "q", "--do-sample", "--temperature", "0.7",
                 "--top-p", "0.9", "--seed", "11")
    settings = text_generation(args)
    generator = settings.pop("generator")
    assert settings == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "num_beams": 1}
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=torch.Generator().manual_seed(11)))


def test_image_selection_carries_mode_budget_and_a_fresh_seeded_generator():
    args = parse("tokenize", "a.png", "--model", "m", "--budget", "5", "--selection", "sample", "--seed", "3")
    first, second = image_selection(args), image_selection(args)
    assert isinstance(first, LaVITImageSelection) and (first.mode, first.max_tokens) == ("sample", 5)
    # every call starts the stream again: each image gets the draws a run of it alone gets
    assert torch.equal(torch.rand(3, generator=first.generator), torch.rand(3, generator=second.generator))
    caption = image_selection(parse("caption", "a.png", "--model", "m"))
    assert (caption.mode, caption.max_tokens) == (None, None)


def test_tokenize_writes_one_visualization_per_image():
    args = parse("tokenize", "a.png", "b.png", "--model", "m", "--visualize", "kept.png")
    assert FILE_OUTPUTS["tokenize"](args) == ("--visualize", "kept.png", 2, {"images": ["a.png", "b.png"]})
    assert FILE_OUTPUTS["tokenize"](parse("tokenize", "a.png", "--model", "m"))[1] is None


def test_tokenize_refuses_a_pixel_decoder_folder_before_reading_images(tmp_path, capsys):
    folder = tmp_path / "detokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "lavit_detokenizer"}))
    assert main(["tokenize", str(tmp_path / "missing.png"), "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "holds a LaVIT pixel decoder (detokenizer), but this command needs a LaVIT visual tokenizer or a LaVIT " \
           "model folder" in err
    assert "missing.png" not in err


def test_caption_reports_each_unreadable_image_and_loads_no_model(tmp_path, capsys):
    broken = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in broken:
        path.write_text("not a picture")
    code = main(["caption", *map(str, broken), "--model", "org/never-loaded", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    document = json.loads(captured.out)
    assert [entry["image"] for entry in document] == list(map(str, broken))
    assert all("cannot read image file" in entry["error"] for entry in document)
    lines = captured.err.strip().splitlines()
    assert [line.split(": ")[:3] for line in lines[:2]] == [["lavit caption", "error", str(path)] for path in broken]
    assert lines[-1] == "lavit caption: error: 2 of 2 inputs failed (each named above); the others were done"
    assert RUNNERS == {"tokenize": run_tokenize, "caption": run_caption, "vqa": run_vqa}
