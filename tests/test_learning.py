"""Proof that stage 1 learns (CPU, a tiny tokenizer, real photographs with random crops)."""

import json

import pytest
import torch
from conftest import training_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def logged(output_dir, key):
    lines = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def test_stage1_on_photographs_learns_reconstruction_keep_ratio_and_codebook(tmp_path):
    from lavit.processing import LaVITImageProcessor
    from lavit.training.collators import ImageCollator
    from lavit.training.data import decode_image, load_records
    from lavit.training.sample_data import write_photo_imagefolder
    from lavit.training.stage1_tokenizer import TokenizerTrainingArguments, train_tokenizer

    from lavit import LaVITTokenizerModel

    photos = write_photo_imagefolder(tmp_path / "photos")
    script_args = TokenizerTrainingArguments(data=str(photos), tokenizer_config="tiny", quantizer_start_step=60,
                                             crop_scale=0.3, resume="no")
    final = train_tokenizer(script_args, training_args(tmp_path / "run", max_steps=240, per_device_train_batch_size=8,
                                                       logging_steps=20, learning_rate=2e-3))
    cosines, keep_ratios = logged(tmp_path / "run", "reconstruction_cosine"), logged(tmp_path / "run",
                                                                                      "mean_keep_ratio")
    assert cosines[-1] > cosines[0] + 0.2, cosines
    tokenizer = LaVITTokenizerModel.from_pretrained(final).eval()
    assert abs(keep_ratios[-1] - tokenizer.config.keep_ratio_target) < 0.05, keep_ratios
    processor = LaVITImageProcessor.from_pretrained(final)
    # new random crops of the photographs; the selector samples as in training (a tiny selector is not confident
    # enough for the 0.5 threshold of the deterministic mode)
    torch.manual_seed(123)
    records = load_records(str(photos))
    images = [decode_image(record["image"]) for record in records] * 4
    pixel_values = ImageCollator(processor, (0.3, 1.0))(images)["pixel_values"]
    tokens = tokenizer.tokenize(pixel_values, mode="sample", generator=torch.Generator().manual_seed(0))
    keep_ratio = float(tokens.token_counts.sum()) / tokens.keep_mask.numel()
    assert abs(keep_ratio - tokenizer.config.keep_ratio_target) < 0.05, keep_ratio
    codes_in_use = int(torch.unique(tokens.code_ids).numel())
    assert codes_in_use > tokenizer.config.codebook_size / 2, codes_in_use

