"""`lavit.training.stage1_tokenizer`: what `train_tokenizer` builds from tiny settings (stopped as its trainer is
built, before any training): the tokenizer of `--tokenizer_config`, kept under a preset; VQ switched on after a quarter
of a preset's steps unless the run set the step itself; its refusal, before anything is written, of a run that names
no tokenizer; and its parser. Training runs are the stage tests'.
"""

import json

import pytest
from conftest import real_photos, tiny_tokenizer_config, training_args
from lavit.training.arguments import TokenizerTrainingArguments
from lavit.training.sample_data import write_imagefolder
from lavit.training.stage1_tokenizer import make_parser, train_tokenizer
from PIL import Image
from transformers import TrainerCallback

from lavit import LaVITTokenizerModel


class BuiltBeforeTraining(Exception):
    def __init__(self, **built):
        super().__init__("stopped as training begins")
        self.built = built


class StopWhenBuilt(TrainerCallback):
    """Hands what the stage built to the test instead of training it (`Trainer.train` starts with a full
    `gc.collect`, seconds in a test process)."""

    def on_init_end(self, args, state, control, **kwargs):
        raise BuiltBeforeTraining(args=args, state=state, **kwargs)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    images = [Image.fromarray(photo).resize((32, 32)) for photo in real_photos()[:4]]
    return write_imagefolder(tmp_path_factory.mktemp("photos"), images, [f"photo {n}" for n in range(4)])


@pytest.fixture(scope="module")
def tokenizer_settings(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "tokenizer.json"
    path.write_text(json.dumps(tiny_tokenizer_config(codebook_size=24).to_dict()))
    return path


def built_by(script_args, arguments) -> dict:
    with pytest.raises(BuiltBeforeTraining) as stopped:
        train_tokenizer(script_args, arguments, callbacks=[StopWhenBuilt()])
    return stopped.value.built


def test_a_run_that_names_no_tokenizer_is_refused_before_anything_is_written(tmp_path, photos):
    with pytest.raises(ValueError, match="--model .* or --tokenizer_config"):
        train_tokenizer(TokenizerTrainingArguments(data=str(photos), resume="no"), training_args(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_preset_switches_vq_on_after_a_quarter_of_its_steps_unless_the_run_set_the_step(tmp_path, photos,
                                                                                          tokenizer_settings):
    script_args = TokenizerTrainingArguments(data=str(photos), tokenizer_config=str(tokenizer_settings),
                                             preset="small-data", resume="no")
    arguments = training_args(tmp_path / "preset", max_steps=-1)
    model = built_by(script_args, arguments)["model"]
    assert isinstance(model, LaVITTokenizerModel) and model.config.codebook_size == 24  # the run's settings file
    assert arguments.max_steps > 0 and script_args.quantizer_start_step == arguments.max_steps // 4

    own = TokenizerTrainingArguments(data=str(photos), tokenizer_config=str(tokenizer_settings),
                                     preset="small-data", quantizer_start_step=7, resume="no")
    built_by(own, training_args(tmp_path / "own", max_steps=-1))
    assert own.quantizer_start_step == 7


def test_the_stage_parser_reads_the_flags_into_the_stage_arguments(tmp_path):
    script_args, arguments = make_parser().parse_args_and_config(
        ["--data", "photos", "--tokenizer_config", "tiny", "--quantizer_start_step", "5", "--output_dir",
         str(tmp_path / "run"), "--max_steps", "3"])
    assert isinstance(script_args, TokenizerTrainingArguments)
    assert (script_args.tokenizer_config, script_args.quantizer_start_step) == ("tiny", 5)
    assert arguments.max_steps == 3 and arguments.output_dir == str(tmp_path / "run")
