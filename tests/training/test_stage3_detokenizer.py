"""`lavit.training.stage3_detokenizer`: what `train_detokenizer` builds from tiny settings (stopped as its trainer is
built, before any training step): a detokenizer of `--detokenizer_config` that decodes the codebook of the frozen
`--visual_tokenizer`, its feature decoder frozen, and the VAE fitted first when `--vae_steps` asks; its refusal of a
run without a visual tokenizer; and its parser. Training runs are the stage tests'.
"""

import json

import pytest
import torch
from conftest import TINY_VAE_CONFIG, real_photos, tiny_tokenizer_config, tiny_unet_config, training_args
from lavit.training.arguments import DetokenizerTrainingArguments
from lavit.training.sample_data import write_imagefolder
from lavit.training.stage3_detokenizer import make_parser, train_detokenizer
from PIL import Image
from transformers import TrainerCallback

from lavit import LaVITDetokenizer, LaVITTokenizerModel

DETOKENIZER_SETTINGS = dict(
    conditioning="highres", prompt_projection_sizes=[12, 20], pooled_projection_size=16, pooling_num_heads=4,
    negative_context_length=5, unet_config=tiny_unet_config(32, 16), vae_config=TINY_VAE_CONFIG, image_size=32,
    num_inference_steps=4,
)


class BuiltBeforeTraining(Exception):
    def __init__(self, **built):
        super().__init__("stopped as the trainer is built")
        self.built = built


class StopWhenBuilt(TrainerCallback):
    """Hands what the stage built to the test instead of training it."""

    def on_init_end(self, args, state, control, **kwargs):
        raise BuiltBeforeTraining(args=args, **kwargs)


def test_a_run_without_a_visual_tokenizer_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--visual_tokenizer is required"):
        train_detokenizer(DetokenizerTrainingArguments(data="photos", detokenizer_config="tiny"),
                          training_args(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_stage_builds_a_detokenizer_of_the_frozen_tokenizers_codebook_after_fitting_the_vae(tmp_path, capsys):
    torch.manual_seed(0)
    visual_tokenizer = LaVITTokenizerModel(tiny_tokenizer_config())
    with torch.no_grad():
        visual_tokenizer.quantizer.codebook.normal_()  # a trained codebook, not the initial one
    visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    images = [Image.fromarray(photo).resize((32, 32)) for photo in real_photos()[:2]]
    data = write_imagefolder(tmp_path / "photos", images, ["a", "b"])
    (tmp_path / "detokenizer.json").write_text(json.dumps(DETOKENIZER_SETTINGS))
    script_args = DetokenizerTrainingArguments(
        data=str(data), visual_tokenizer=str(tmp_path / "tokenizer"),
        detokenizer_config=str(tmp_path / "detokenizer.json"), vae_steps=1, ema_decay=0.0, resume="no")
    with pytest.raises(BuiltBeforeTraining) as stopped:
        train_detokenizer(script_args, training_args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2),
                          callbacks=[StopWhenBuilt()])
    detokenizer = stopped.value.built["model"]
    assert isinstance(detokenizer, LaVITDetokenizer)
    assert torch.equal(detokenizer.codebook, visual_tokenizer.quantizer.codebook)
    assert not any(parameter.requires_grad for parameter in detokenizer.decoder.parameters())
    assert detokenizer.config.prompt_projection_sizes == [12, 20]
    assert "VAE fitted for 1 steps" in capsys.readouterr().out


def test_the_stage_parser_reads_the_flags_into_the_stage_arguments(tmp_path):
    script_args, arguments = make_parser().parse_args_and_config(
        ["--data", "photos", "--visual_tokenizer", "tokenizer", "--detokenizer_config", "tiny", "--vae_steps", "2",
         "--train_feature_decoder", "--output_dir", str(tmp_path / "run")])
    assert isinstance(script_args, DetokenizerTrainingArguments)
    assert (script_args.detokenizer_config, script_args.vae_steps, script_args.train_feature_decoder) == (
        "tiny", 2, True)
    assert arguments.output_dir == str(tmp_path / "run")
