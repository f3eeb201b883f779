"""Proof that the stages learn (CPU, tiny models, real images): stage 1 on photographs, stage 2 + fine-tuning on
handwritten digits, and the small-data commands of docs/training.md on photo crops."""

import json

import pytest
import torch
from conftest import training_args

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def logged(output_dir, key):
    lines = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def test_stage1_on_photographs_learns_reconstruction_keep_ratio_and_codebook(tmp_path):
    from lavit.processing import LaVITImageProcessor
    from lavit.training.arguments import TokenizerTrainingArguments
    from lavit.training.collators import ImageCollator
    from lavit.training.data import image_dataset, load_records
    from lavit.training.sample_data import write_photo_imagefolder
    from lavit.training.stage1_tokenizer import train_tokenizer

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
    crops = image_dataset(load_records(str(photos)), crop_scale=(0.3, 1.0), seed=123)
    items = []
    for epoch in range(4):
        crops.set_epoch(epoch)
        items += [crops[index] for index in range(len(crops))]
    pixel_values = ImageCollator(processor)(items)["pixel_values"]
    tokens = tokenizer.tokenize(pixel_values, mode="sample", generator=torch.Generator().manual_seed(0))
    keep_ratio = float(tokens.token_counts.sum()) / tokens.keep_mask.numel()
    assert abs(keep_ratio - tokenizer.config.keep_ratio_target) < 0.05, keep_ratio
    codes_in_use = int(torch.unique(tokens.code_ids).numel())
    assert codes_in_use > tokenizer.config.codebook_size / 2, codes_in_use


HELD_OUT = 200  # held-out digits for the caption and VQA figures
ABOVE_CHANCE = 0.17


def test_stage2_and_finetuning_on_digits_answer_and_draw_above_chance(tmp_path):
    """Tiny tokenizer -> tiny LLaMA pretrained on digit captions in both orders -> VQA fine-tuning: the demo's code and
    step counts (`lavit.demo.FULL`) with seed 0, about 5 minutes on 2 cores."""
    from lavit import LaVITForCausalLM, LaVITProcessor
    from lavit.demo import FULL, evaluate, text_to_image_accuracy, train_digit_models, write_digit_data

    train_folder, train_images, train_labels = write_digit_data(tmp_path / "train", 1200, offset=0)
    # 200 held-out digits (the last 200 of scikit-learn's 1797; training uses the first 1200)
    _, images, labels = write_digit_data(tmp_path / "eval", HELD_OUT, offset=1797 - HELD_OUT)
    _, pretrained, finetuned = train_digit_models(train_folder, tmp_path, {stage: FULL[stage] for stage in
                                                                           ("tokenizer", "pretrain", "finetune")})
    processor = LaVITProcessor.from_pretrained(finetuned)
    pretrained_model = LaVITForCausalLM.from_pretrained(pretrained).eval()
    caption_accuracy = evaluate(pretrained_model, processor, images, labels)["caption_accuracy"]
    # 200 images generated for "the digit N" (20 per class)
    drawing_accuracy = text_to_image_accuracy(pretrained_model, processor, train_images, train_labels, per_class=20)
    vqa_accuracy = evaluate(LaVITForCausalLM.from_pretrained(finetuned), processor, images, labels)["vqa_accuracy"]
    print(f"caption accuracy {caption_accuracy:.2f}, text-to-image class accuracy {drawing_accuracy:.2f}, "
          f"VQA accuracy {vqa_accuracy:.2f}")
    # One bar for both, on 200 trials each: 34 or more right has probability ~0.0015 at chance (0.10). Full demo runs
    # (seeds 0-2, 1 and 2 threads) measured 0.31-0.37 text-to-image and 0.22-0.35 VQA on 100 digits; with 1000
    # pretraining steps text-to-image measured 0.25-0.28 on this machine and 0.155 on CI's, hence the demo's 1500.
    # Caption accuracy after stage 2 varies more (0.22-0.35 in the demo runs) and is only reported.
    assert drawing_accuracy >= ABOVE_CHANCE, drawing_accuracy
    assert vqa_accuracy >= ABOVE_CHANCE, vqa_accuracy

