"""`lavit.command_inputs.require_model_inputs`: every model input of every training stage is checked by the stage's
parser, whichever route runs it (`lavit COMMAND`, `python -m lavit.training.<stage>`, a config file), with the flag's
own name in the fix. #24 §8 found `lavit train-detokenizer --model ADAPTER` told a generic message and
`python -m` stages skipped the checks `lavit COMMAND` made (one table of one flag per command): the flags are now
enumerated from the stages' dataclasses, and the test below walks all of them.
"""

import dataclasses
import importlib
import json
import shutil

import pytest
import torch
from conftest import text_vocab_size, tiny_lavit_config, tiny_text_tokenizer, write_lora_adapter

from lavit.cli.training import TRAINING_COMMANDS
from lavit.command_inputs import NOT_LAVIT, CommandError
from lavit.file_kinds import MODEL_FLAG_WORDS
from lavit.paths import ADAPTERS, INPUT, MODEL_KINDS, PATH_ROLE

# model inputs read by their own libraries' loaders (a text tokenizer, a diffusers folder), or of two shapes a
# model_type cannot tell apart (stage 3's --detokenizer: a pipeline folder, whose config.json is its language
# model's, or a LaVITDetokenizer folder); the last two: a config file or a preset's name
UNDECLARED = {"text_tokenizer", "diffusers_model", "detokenizer", "tokenizer_config", "detokenizer_config"}


def stage_model_fields() -> list[tuple[str, dataclasses.Field]]:
    """`(command, field)` for every input field of every stage's dataclasses whose name says it names a model."""
    found = []
    for command, module_name in TRAINING_COMMANDS.items():
        for dataclass_type in importlib.import_module(module_name).make_parser().dataclass_types:
            found += [(command, field) for field in dataclasses.fields(dataclass_type) if field.metadata.get(
                PATH_ROLE) == INPUT and any(word in field.name for word in MODEL_FLAG_WORDS)]
    return found


DECLARED = [(command, field) for command, field in stage_model_fields() if field.name not in UNDECLARED]


def test_every_lavit_model_input_of_every_stage_declares_its_kinds():
    assert {field.name for _, field in stage_model_fields()} >= UNDECLARED  # no stale name above
    assert {(command, field.name) for command, field in DECLARED} == {
        ("train-tokenizer", "model"), ("train", "model"), ("finetune", "model"), ("train-detokenizer", "model"),
        ("train", "visual_tokenizer"), ("pretokenize", "visual_tokenizer"), ("train-detokenizer", "visual_tokenizer"),
        ("train-tokenizer", "vision_model"), ("train", "language_model")}  # the last two: any model but LaVIT's
    for command, field in DECLARED:
        assert MODEL_KINDS in field.metadata, (command, field.name)
        # a stage starts from (or saves beside its own) whole models; a visual tokenizer is read from a merged adapter
        assert field.metadata[ADAPTERS] == (field.name == "visual_tokenizer"), (command, field.name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder of each kind a model input may be given: a LaVIT model, a visual tokenizer, a plain causal LM, a
    LoRA adapter of the LaVIT model, and a run folder holding each as `final/`; plus data and an output place."""
    from lavit.training.sample_data import write_photo_imagefolder

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    root = tmp_path_factory.mktemp("inputs")
    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(tokenizer)))
    model.save_pretrained(root / "lavit")
    LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), tokenizer).save_pretrained(root / "lavit")
    model.model.visual_tokenizer.save_pretrained(root / "tokenizer")
    model.model.language_model.save_pretrained(root / "llama")
    write_lora_adapter(root / "lavit", root / "adapter", rank=2, seed=0, base_name=str(root / "lavit"))
    found = {kind: root / kind for kind in ("lavit", "tokenizer", "llama", "adapter")}
    for kind in ("lavit", "tokenizer", "adapter", "llama"):
        run = root / "runs" / kind
        run.mkdir(parents=True)
        (run / "logs.jsonl").write_text("{}\n")
        shutil.copytree(found[kind], run / "final")
        found[f"run of {kind}"] = run
    found["data"] = write_photo_imagefolder(root / "photos")
    found["out"] = root / "out"
    return found


def parse(command: str, flag: str, value, folders, as_config: bool = False):
    """The stage's own parser (as `python -m lavit.training.<stage>` runs it) on the smallest command line."""
    stage = importlib.import_module(TRAINING_COMMANDS[command])
    output = ["--output", folders["out"]] if command == "pretokenize" else ["--output_dir", folders["out"]]
    argv = ["--data", folders["data"], *output, f"--{flag}", value]
    if as_config:  # the same through a config file: keys are the flags' names
        config = folders["out"].parent / f"{command}-{flag}.json"
        pairs = zip(argv[::2], argv[1::2], strict=True)
        config.write_text(json.dumps({str(key).lstrip("-"): str(value) for key, value in pairs}))
        argv = [config]
    return stage.make_parser().parse_args_and_config([str(arg) for arg in argv])


def wanted_kind(field) -> str:
    kinds = field.metadata[MODEL_KINDS]
    return {("lavit_tokenizer",): "tokenizer", (NOT_LAVIT,): "llama"}.get(kinds, "lavit")


@pytest.mark.parametrize(("command", "field"), DECLARED, ids=[f"{c}--{f.name}" for c, f in DECLARED])
def test_every_stage_model_input_takes_its_kind_and_refuses_the_others_with_the_flag_named(command, field, folders):
    flag = field.name
    # its own kind passes (and, for a visual tokenizer, an adapter: the base's tokenizer is the adapter's)
    parsed = parse(command, flag, folders[wanted_kind(field)], folders)
    assert getattr(parsed[0], flag) == str(folders[wanted_kind(field)])
    if field.metadata[ADAPTERS]:
        parse(command, flag, folders["adapter"], folders)
    else:
        with pytest.raises(CommandError, match=rf"^--{flag} \S+adapter is a PEFT \(LoRA\) adapter folder") as error:
            parse(command, flag, folders["adapter"], folders)
        assert f"give --{flag} MERGED" in str(error.value)
        assert ("--lora" in str(error.value)) == (command == "finetune")  # only fine-tuning takes --lora
    # a model of another kind: named as the flag gave it, with what the stage needs
    if field.metadata[MODEL_KINDS] == (NOT_LAVIT,):
        with pytest.raises(CommandError, match=rf"^--{flag} \S+lavit holds a LaVIT model, but this takes a model of "
                                               rf"another library"):
            parse(command, flag, folders["lavit"], folders)
    else:
        with pytest.raises(CommandError, match=rf"^--{flag} \S+llama holds a model of type 'llama', but this command"):
            parse(command, flag, folders["llama"], folders)
    # neither a folder here nor a Hub id: said before any Hub look-up, with huggingface_hub's reason
    with pytest.raises(CommandError, match=rf"^--{flag} a\.\.b: no such local folder, and not a Hub model id either "
                                           rf"\(Cannot have -- or \.\. in repo_id"):
        parse(command, flag, "a..b", folders)
    # a training run's folder: its final/, named with the flag, through flags and through a config file alike
    for as_config in (False, True):
        run = folders[f"run of {wanted_kind(field)}"]
        with pytest.raises(CommandError, match=rf"use --{flag} {run / 'final'}"):
            parse(command, flag, run, folders, as_config)
    assert not folders["out"].exists()  # refused before anything was written


def test_the_lavit_command_reports_a_stage_model_input_in_one_line(folders, capsys):
    """`lavit train-detokenizer --model ADAPTER` (the model saved beside the decoder) got the generic message."""
    from test_cli import error_lines, run

    code, _, err = run(capsys, "train-detokenizer", "--visual_tokenizer", folders["tokenizer"], "--data",
                       folders["data"], "--output_dir", folders["out"], "--model", folders["adapter"])
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err
    assert f"--model {folders['adapter']} is a PEFT (LoRA) adapter folder" in lines[0]
    assert "--lora" not in lines[0] and "give --model MERGED" in lines[0]


def test_serve_points_a_run_folder_at_its_final_folder_and_refuses_an_adapter(folders, capsys):
    """#24 §8: `lavit serve RUN` failed in the processor's loader instead of pointing at `RUN/final`; an adapter folder
    cannot be served (the server loads whole models): both are one line before Ray starts."""
    from test_cli import error_lines, run

    for model, expected in ((folders["run of lavit"], f"use {folders['run of lavit'] / 'final'}"),
                            (folders["adapter"], f"{folders['adapter']} is a PEFT (LoRA) adapter folder, not a whole "
                                                 f"model, which this needs: merge the adapter into its base first "
                                                 f"(lavit export MERGED --model {folders['adapter']}) and give MERGED"),
                            (folders["tokenizer"], "holds a LaVIT visual tokenizer, but this command needs")):
        code, _, err = run(capsys, "serve", model, "--port", "1")
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1 and expected in lines[0], err
