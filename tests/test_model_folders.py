"""#26 items 3-5: one resolver (`lavit.modeling.folders_lavit.language_model_folders`) says which language model a
folder means, for every command that loads one: a LaVIT model folder, a `LaVITPipeline` folder (what
`convert-original` and `train-detokenizer` write) or its `language_model/` sub-folder (the processor is the
pipeline's). Stage 3 keeps the language model of the pipeline it continues, and a wrong `--model` fails before
training, with one line naming the fix.
"""

import argparse
import re
import shutil

import pytest
from lavit.modeling.folders_lavit import language_model_folders
from test_cli import error_lines, real_photo_file, run

from lavit.cli import build_parser

# the commands whose --model is read as a LaVIT language model, and how each is run below (enumerated from the parser)
INFERENCE = {"caption": ["--max-new-tokens", 3], "vqa": ["--question", "what?", "--max-new-tokens", 2],
             "tokenize": []}
# through `lavit.command_inputs.lavit_model_paths` / `pipeline_language_model_folder` (tested below) or
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

    from lavit.training.models import pipeline_language_model_folder

    from lavit.command_inputs import lavit_model_paths

    expected = (str(pipeline_folder / "language_model"), str(pipeline_folder / "processor"))
    for model in (pipeline_folder, pipeline_folder / "language_model"):
        assert lavit_model_paths(str(model)) == expected
        assert pipeline_language_model_folder(SimpleNamespace(model=str(model), detokenizer=None,
                                                              visual_tokenizer=None)) == expected
    # continuing a pipeline's decoder keeps its language model (#26 item 4)
    assert pipeline_language_model_folder(SimpleNamespace(model=None, detokenizer=str(pipeline_folder),
                                                          visual_tokenizer=None)) == expected


# ------------------------------------------------------------------------------------------------ #24 §8

# the commands that publish a LaVIT model, and how each is run: through `hub_cards.export_model`, which reads a model
# folder with `language_model_folders` (push exports first; its upload then fails offline, after the model was read)
PUBLISHING = {"export": lambda model, tmp_path: ["export", tmp_path / "hub", "--model", model],
              "push": lambda model, tmp_path: ["push", "someone/lavit-test", "--model", model]}


def test_the_publishing_commands_are_found_from_the_parser():
    assert set(PUBLISHING) <= commands_reading_a_lavit_model()


@pytest.mark.parametrize("command", sorted(PUBLISHING))
def test_publishing_commands_take_a_pipelines_language_model(command, capsys, tmp_path, pipeline_folder):
    """`lavit export/push --model pipe/language_model` said "Can't load image processor" (transformers, reading the
    processor from the language model's folder); the pipeline's processor is the one (`language_model_folders`)."""
    from lavit.hub_cards import check_export_folder

    code, out, err = run(capsys, *PUBLISHING[command](pipeline_folder / "language_model", tmp_path))
    assert "Can't load" not in err and "preprocessor_config" not in err, err
    if command == "export":
        assert code == 0, err
        check_export_folder(tmp_path / "hub")  # a complete model folder: the language model and its processor
        assert (tmp_path / "hub" / "processor_config.json").is_file()
        assert not (tmp_path / "hub" / "model_index.json").exists()
    else:  # no network in tests: the upload fails, after the folder was exported and checked
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1 and "offline" in lines[0].lower(), err


def run_folder(tmp_path, name, final):
    """A training run's folder (logs beside `final/`) whose `final/` is a copy of `final`."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "logs.jsonl").write_text("{}\n")
    shutil.copytree(final, run_dir / "final")
    return run_dir


@pytest.fixture
def final_folders(tmp_path, lavit_folder, pipeline_folder, lavit_model):
    """One `final/` of each kind a lavit training stage saves: a model (stage 2, fine-tuning), a pipeline (stage 3), a
    LoRA adapter (fine-tuning with --merge_lora false) and a visual tokenizer (stage 1)."""
    from lavit.training.lora import lora_config
    from peft import get_peft_model

    adapter = get_peft_model(lavit_model, lora_config(r=2))
    adapter.peft_config["default"].base_model_name_or_path = str(lavit_folder.resolve())
    adapter.save_pretrained(tmp_path / "adapter")
    lavit_model.model.visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    return {"model": lavit_folder, "pipeline": pipeline_folder, "adapter": tmp_path / "adapter",
            "tokenizer": tmp_path / "tokenizer"}


def test_a_run_folder_points_at_its_final_folder_of_every_kind(final_folders, tmp_path):
    """#24 §8: a stage-3 run's folder (its `final/` a pipeline folder) was "not a model folder" without pointing at
    `final/`. Every kind of folder a stage saves as `final/` is named, with the argument the user gave."""
    from lavit.command_inputs import MODEL_FOLDER_FILES, CommandError, resolve_model_folder

    assert {name for name in MODEL_FOLDER_FILES} == {"config.json", "model_index.json", "adapter_config.json"}
    (tmp_path / "runs").mkdir()
    for kind, final in final_folders.items():
        run_dir = run_folder(tmp_path / "runs", kind, final)
        for flag in ("--model", "--visual_tokenizer", "pretrained="):
            with pytest.raises(CommandError) as error:
                resolve_model_folder(str(run_dir), flag)
            separator = "" if flag.endswith("=") else " "
            assert f"use {flag}{separator}{run_dir / 'final'}" in str(error.value), (kind, flag, str(error.value))


@pytest.mark.parametrize("command", ["caption", "generate", "train", "pretokenize", "export"])
def test_the_run_folder_fix_names_the_flag_of_the_command(command, capsys, tmp_path, pipeline_folder):
    """The fix names what the user typed: `--visual_tokenizer RUN/final` for the stages that read a tokenizer."""
    run_dir = run_folder(tmp_path, "run", pipeline_folder)
    photo = real_photo_file(tmp_path)
    (tmp_path / "data").mkdir()
    argv = {"caption": ["caption", photo, "--model", run_dir],
            "generate": ["generate", "a cat", "-o", tmp_path / "out.png", "--model", run_dir],
            "train": ["train", "--data", tmp_path / "data", "--model", run_dir, "--output_dir", tmp_path / "out"],
            "pretokenize": ["pretokenize", "--data", tmp_path / "data", "--visual_tokenizer", run_dir, "--output",
                           tmp_path / "out"],
            "export": ["export", tmp_path / "hub", "--model", run_dir]}[command]
    flag = "--visual_tokenizer" if command == "pretokenize" else "--model"
    code, _, err = run(capsys, *argv)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and f"use {flag} {run_dir / 'final'}" in lines[0], err


def test_the_lmms_eval_model_names_pretrained_in_its_fix(tmp_path, pipeline_folder):
    """#24 §8: lmms-eval's `--model_args pretrained=RUN` was told to "use --model RUN/final", a flag it has not."""
    from lavit.command_inputs import CommandError

    lmms_eval_model = pytest.importorskip("lavit.evaluation.lmms_eval_model", exc_type=ImportError)
    run_dir = run_folder(tmp_path, "run", pipeline_folder)
    with pytest.raises(CommandError, match=rf"use pretrained={re.escape(str(run_dir / 'final'))}"):
        lmms_eval_model.LaVITLmms(pretrained=str(run_dir), device="cpu")


def test_training_refuses_an_adapter_folder_as_the_model_to_train(final_folders, capsys, tmp_path):
    """#24 §8: `lavit finetune --model ADAPTER` failed in torch ("element 0 of tensors does not require grad"):
    transformers loads an adapter folder with its adapters frozen. One line says what it is and the ways on."""
    from lavit.command_inputs import lavit_model_paths

    with pytest.raises(ValueError) as error:
        lavit_model_paths(str(final_folders["adapter"]))
    message = str(error.value)
    assert "PEFT (LoRA) adapter folder" in message
    assert f"lavit export MERGED --model {final_folders['adapter']}" in message
    (tmp_path / "data").mkdir()
    code, _, err = run(capsys, "finetune", "--model", final_folders["adapter"], "--data", tmp_path / "data",
                       "--output_dir", tmp_path / "run", "--use_cpu", "true", "--report_to", "none")
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "PEFT (LoRA) adapter folder" in lines[0], err
    assert f"--model {final_folders['model'].resolve()} --lora" in lines[0]  # fine-tuning takes a new adapter
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_the_folder_answers_name_the_classes_they_stand_for():
    """`folders_lavit` reads folders without importing the classes (the `lavit` command's start-up): its pipeline
    class name is `LaVITPipeline`'s, and `LaVITConfig`'s model type is its constant."""
    from lavit.modeling.folders_lavit import LANGUAGE_MODEL_TYPE, PIPELINE_CLASS

    from lavit import LaVITConfig, LaVITPipeline

    assert PIPELINE_CLASS == LaVITPipeline.__name__ and LaVITConfig.model_type == LANGUAGE_MODEL_TYPE
