"""#26 items 3-5: one resolver (`lavit.modeling.pipeline_lavit.language_model_folders`) says which language model a
folder means, for every command that loads one: a LaVIT model folder, a `LaVITPipeline` folder (what
`convert-original` and `train-detokenizer` write) or its `language_model/` sub-folder (the processor is the
pipeline's). Stage 3 keeps the language model of the pipeline it continues, and a wrong `--model` fails before
training, with one line naming the fix.
"""

import argparse
import re
import shutil

import pytest
from lavit.modeling.pipeline_lavit import language_model_folders
from test_cli import error_lines, real_photo_file, run

from lavit.cli import build_parser

# the commands whose --model is read as a LaVIT language model, and how each is run below (enumerated from the parser)
INFERENCE = {"caption": ["--max-new-tokens", 3], "vqa": ["--question", "what?", "--max-new-tokens", 2],
             "tokenize": []}
# through `lavit.training.models.lavit_model_paths` / `pipeline_language_model_folder` (tested below) or
# `command_inputs.load_lavit_model` (evaluate, export and push of an adapter)
LIBRARY = {"train", "finetune", "train-detokenizer", "evaluate", "export", "push"}


def commands_reading_a_lavit_model() -> set[str]:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    return {name for name, command in commands.items() for action in command._actions
            if "--model" in action.option_strings and re.search(r"\bLaVIT (model )?folder", action.help or "")}


def test_every_command_reading_a_lavit_model_is_covered():
    assert commands_reading_a_lavit_model() == set(INFERENCE) | LIBRARY


@pytest.mark.parametrize("command", sorted(INFERENCE))
def test_inference_commands_take_a_pipeline_folder_and_its_language_model(command, capsys, tmp_path, lavit_folder,
                                                                          pipeline_folder):
    """The attack's repro: `caption --model pipe` said "not a model folder (no config.json)", `--model
    pipe/language_model` "Can't load image processor"."""
    photo = real_photo_file(tmp_path)
    outputs = []
    for model in (lavit_folder, pipeline_folder, pipeline_folder / "language_model"):
        code, out, err = run(capsys, command, photo, "--model", model, *INFERENCE[command])
        assert code == 0, err
        outputs.append(out.replace(str(photo), "PHOTO"))
    assert outputs[0] == outputs[1] == outputs[2]  # the same model


def test_the_resolver_names_the_fix_for_a_decoder_alone_and_a_missing_processor(tmp_path, lavit_model,
                                                                                pipeline_folder):
    assert language_model_folders(pipeline_folder) == (pipeline_folder / "language_model",
                                                       pipeline_folder / "processor")
    assert language_model_folders(pipeline_folder / "language_model") == (pipeline_folder / "language_model",
                                                                          pipeline_folder / "processor")
    decoder_alone = tmp_path / "decoder"
    shutil.copytree(pipeline_folder, decoder_alone)
    shutil.rmtree(decoder_alone / "language_model")
    with pytest.raises(ValueError, match="without a language model"):
        language_model_folders(decoder_alone)
    lavit_model.save_pretrained(tmp_path / "no_processor")
    with pytest.raises(ValueError, match="holds no processor .* save the model's LaVITProcessor there"):
        language_model_folders(tmp_path / "no_processor")
    assert language_model_folders(tmp_path) is None  # not a model: the caller says what it needs


def test_a_wrong_model_for_train_detokenizer_fails_before_training(capsys, tmp_path, components, lavit_model):
    """#26 item 5: `--model det1/final/language_model` trained, then failed at the save ("Can't load image
    processor"), leaving final.tmp behind. A folder without a processor now fails first, in one line."""
    lavit_model.save_pretrained(tmp_path / "no_processor")
    code, _, err = run(capsys, "train-detokenizer", "--data", components["photos"], "--visual_tokenizer",
                       components["tokenizer"], "--detokenizer_config", "tiny", "--model", tmp_path / "no_processor",
                       "--output_dir", tmp_path / "run", "--max_steps", 1, "--use_cpu", "true", "--report_to",
                       "none", "--resume", "no")
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "--model" in lines[0] and "processor" in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_training_commands_resolve_a_pipeline_folder_to_its_language_model(pipeline_folder):
    from types import SimpleNamespace

    from lavit.training.models import lavit_model_paths, pipeline_language_model_folder

    expected = (str(pipeline_folder / "language_model"), str(pipeline_folder / "processor"))
    for model in (pipeline_folder, pipeline_folder / "language_model"):
        assert lavit_model_paths(str(model)) == expected
        assert pipeline_language_model_folder(SimpleNamespace(model=str(model), detokenizer=None,
                                                              visual_tokenizer=None)) == expected
    # continuing a pipeline's decoder keeps its language model (#26 item 4)
    assert pipeline_language_model_folder(SimpleNamespace(model=None, detokenizer=str(pipeline_folder),
                                                          visual_tokenizer=None)) == expected
