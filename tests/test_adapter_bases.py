"""An adapter folder's `base_model_name_or_path` means one model wherever the adapter is loaded from, and a base that
cannot be used is refused with one line naming the adapter's `adapter_config.json`, the value and the fix, by every
command that reads a LaVIT model (enumerated from the parser), the lmms-eval model and export: all go through
`lavit.command_inputs.adapter_base`.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_lora_adapter
from test_cli import error_lines, real_photo_file, run
from test_model_folders import commands_reading_a_lavit_model

TRAINING = {"train", "finetune", "train-detokenizer"}
# the training stages start from whole models (stage 3 keeps its `--model` beside the decoder it trains): an adapter
# folder, whatever its base, is refused there as not a whole model (one line, tested below; `test_command_inputs`)
NO_ADAPTER = TRAINING
# the kinds of bad base run through every command (each other one through every third, in turn, and the resolver)
CLI_KINDS = {"number", "adapter"}


def command_argv(command: str, adapter, tmp_path) -> list:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    photo = real_photo_file(data)
    (data / "captions.json").write_text(json.dumps([{"image": photo.name, "caption": "a cup"}]))
    argv = {"caption": ["caption", photo, "--max-new-tokens", 2],
            "vqa": ["vqa", photo, "--question", "what?", "--max-new-tokens", 2],
            "tokenize": ["tokenize", photo],
            "evaluate": ["evaluate", "caption", "--format", "karpathy", "--annotations", data / "captions.json",
                         "--images", data, "--output",
                         tmp_path / "eval"],
            "export": ["export", tmp_path / "hub"],
            "push": ["push", "someone/model"],
            **{name: [name, "--data", data, "--output_dir", tmp_path / "run", "--use_cpu", "true",
                      "--report_to", "none"] for name in TRAINING}}[command]
    if command == "train-detokenizer":  # its --model: the language model the trained pipeline keeps
        argv += ["--visual_tokenizer", tmp_path / "lavit", "--detokenizer_config", "tiny"]
    return [*argv, "--model", adapter]


@pytest.fixture
def adapter(tmp_path, lavit_folder):
    """A LoRA adapter of `lavit_folder`, saved with its absolute base (as lavit's fine-tuning records it)."""
    write_lora_adapter(lavit_folder, tmp_path / "adapter", rank=2, seed=0, base_name=str(lavit_folder.resolve()))
    return tmp_path / "adapter"


def set_base(adapter, base):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))


def bad_bases(tmp_path, adapter, lavit_folder) -> dict:
    """Each kind of unusable base -> (the value, a word of its problem); the folders each needs are made here."""
    shutil.copytree(adapter, tmp_path / "inner")
    (tmp_path / "run" / "final").mkdir(parents=True)
    shutil.copytree(lavit_folder, tmp_path / "run" / "final", dirs_exist_ok=True)
    (tmp_path / "run" / "logs.jsonl").write_text("{}\n")
    (tmp_path / "not-a-model").mkdir()
    return {"number": (5, "not a path or a Hub id"), "list": (["a"], "not a path or a Hub id"),
            "moved": (str(tmp_path / "moved" / "final"), "does not exist"),
            "adapter": (str(tmp_path / "inner"), f"lavit export MERGED --model {tmp_path / 'inner'}"),
            "run folder": (str(tmp_path / "run"), f"base_model_name_or_path={tmp_path / 'run' / 'final'}"),
            "not a model": (str(tmp_path / "not-a-model"), "holds no LaVIT model"),
            "relative, nowhere": ("runs/sft/nowhere", "found neither from the current folder")}


def test_every_command_refuses_every_unusable_base_in_one_line(adapter, tmp_path, capsys, lavit_folder, monkeypatch):
    """U3-U5, F4, U7: a moved base said "model folder not found" without naming adapter_config.json, a base of `5`
    raised a TypeError, an adapter of an adapter was loaded without the inner adapter (and `export` blamed the PEFT
    version). Each is one line naming the adapter's config, the value and the fix, before any model is built."""
    from lavit.command_inputs import CommandError, resolve_model_folder

    monkeypatch.chdir(tmp_path)
    commands = sorted(commands_reading_a_lavit_model())
    assert {"caption", "evaluate", "export", "push"} <= set(commands), commands
    for index, (kind, (base, problem)) in enumerate(bad_bases(tmp_path, adapter, lavit_folder).items()):
        set_base(adapter, base)
        with pytest.raises(CommandError) as error:
            resolve_model_folder(str(adapter))
        where = f"{adapter / 'adapter_config.json'} names base_model_name_or_path {base!r}"
        assert str(error.value).startswith(where) and problem in str(error.value), (kind, str(error.value))
        # every command (their loaders all call `resolve_model_folder`: one kind each keeps this test fast)
        every = sorted(set(commands) - NO_ADAPTER)
        for command in every if kind in CLI_KINDS else every[index % 3::3]:
            code, _, err = run(capsys, *command_argv(command, adapter, tmp_path))
            lines = error_lines(err)
            assert code != 0 and len(lines) == 1 and where in lines[0], (kind, command, err[-2000:])
            assert problem in lines[0], (kind, command, lines[0])
        assert not (tmp_path / "hub").exists() and not (tmp_path / "eval").exists()
    for command in NO_ADAPTER:
        code, _, err = run(capsys, *command_argv(command, adapter, tmp_path))
        (line,) = error_lines(err)
        assert code != 0 and f"--model {adapter} is a PEFT (LoRA) adapter folder, not a whole" in line, err[-2000:]


def test_the_lmms_eval_model_refuses_an_unusable_base_by_the_same_line(adapter, tmp_path, lavit_folder):
    lmms_eval_model = pytest.importorskip("lavit.evaluation.lmms_eval_model", exc_type=ImportError)
    from lavit.command_inputs import CommandError

    for base, problem in bad_bases(tmp_path, adapter, lavit_folder).values():
        set_base(adapter, base)
        with pytest.raises(CommandError, match="adapter_config.json names base_model_name_or_path") as error:
            lmms_eval_model.LaVITLmms(pretrained=str(adapter), device="cpu")
        assert problem in str(error.value)


def test_a_pipeline_folder_as_base_means_its_language_model(adapter, tmp_path, lavit_folder, pipeline_folder):
    """U5: `--model` takes a `LaVITPipeline` folder everywhere; as an adapter's base it said "no file named
    model.safetensors". Its language model is the base, with the pipeline's processor."""
    from lavit import LaVITForCausalLM
    from lavit.command_inputs import load_lavit_model

    merged, _ = load_lavit_model(str(adapter))
    set_base(adapter, str(pipeline_folder))
    from_pipeline, processor = load_lavit_model(str(adapter))
    assert processor is not None
    base = LaVITForCausalLM.from_pretrained(pipeline_folder / "language_model").state_dict()
    assert all(torch.equal(from_pipeline.state_dict()[name], tensor) for name, tensor in merged.state_dict().items())
    assert any(not torch.equal(base[name], tensor) for name, tensor in merged.state_dict().items())


def test_the_readme_trl_recipes_relative_base_loads_from_its_folder_and_elsewhere(tmp_path, monkeypatch, adapter,
                                                                                  pipeline_folder):
    """README's TRL recipe trains from `lavit-demo/hub_folder/language_model` (a relative path PEFT records) and saves
    the adapter to `runs/sft/final`: it loads from the folder the recipe runs in, and from any folder that holds no
    other model at that relative path (the base is found from the adapter's folder's ancestors)."""
    from lavit.command_inputs import resolve_model_folder

    shutil.copytree(pipeline_folder, tmp_path / "lavit-demo" / "hub_folder")
    shutil.copytree(adapter, tmp_path / "runs" / "sft" / "final")
    set_base(tmp_path / "runs" / "sft" / "final", "lavit-demo/hub_folder/language_model")
    (tmp_path / "elsewhere").mkdir()
    expected = (tmp_path / "lavit-demo" / "hub_folder" / "language_model").resolve()
    for where, given in ((tmp_path, "runs/sft/final"), (tmp_path / "elsewhere", str(tmp_path / "runs/sft/final"))):
        monkeypatch.chdir(where)
        base = resolve_model_folder(given)[1]["base_model_name_or_path"]
        assert Path(base).resolve() == expected, (where, base)


def test_a_base_read_as_a_hub_id_that_cannot_be_loaded_names_the_adapters_config(adapter, tmp_path, capsys,
                                                                                 monkeypatch):
    """The attack of #24: a base `nope` (or `some/nope`) found nowhere is a Hub id, and offline the user got
    transformers' "couldn't connect to huggingface.co" without a word of the adapter. One line names its
    `adapter_config.json`, the value and the fix."""
    monkeypatch.chdir(tmp_path)
    for base in ("nope", "some/nope"):
        set_base(adapter, base)
        code, _, err = run(capsys, *command_argv("caption", adapter, tmp_path))
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1, err
        assert f"{adapter / 'adapter_config.json'} names base_model_name_or_path {base!r}, which could not be " \
               f"loaded" in lines[0], lines[0]
