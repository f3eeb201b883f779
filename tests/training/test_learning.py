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



def test_stage2_and_finetuning_on_digits_answer_and_draw_above_chance(tmp_path):
    """Tiny tokenizer -> tiny LLaMA pretrained on digit captions in both orders -> VQA fine-tuning, the demo's code
    with fewer steps (about 4 minutes on 2 cores)."""
    from lavit import LaVITForCausalLM, LaVITProcessor
    from lavit.demo import evaluate, text_to_image_accuracy, train_digit_models, write_digit_data

    train_folder, train_images, train_labels = write_digit_data(tmp_path / "train", 1200, offset=0)
    _, images, labels = write_digit_data(tmp_path / "eval", 100, offset=1697)
    _, pretrained, finetuned = train_digit_models(train_folder, tmp_path, {"tokenizer": 1500, "pretrain": 1000,
                                                                           "finetune": 600})
    processor = LaVITProcessor.from_pretrained(finetuned)
    pretrained_model = LaVITForCausalLM.from_pretrained(pretrained).eval()
    caption_accuracy = evaluate(pretrained_model, processor, images, labels)["caption_accuracy"]
    # 200 images generated for "the digit N" (20 per class: with 10 per class one run measured 0.19, under a bar of
    # 0.2; with 20, 0.28): 34 or more nearest to their class has probability ~0.0015 at chance (0.10)
    drawing_accuracy = text_to_image_accuracy(pretrained_model, processor, train_images, train_labels, per_class=20)
    print(f"text-to-image class accuracy {drawing_accuracy:.2f}")
    assert drawing_accuracy >= 0.17, drawing_accuracy
    vqa_accuracy = evaluate(LaVITForCausalLM.from_pretrained(finetuned), processor, images, labels)["vqa_accuracy"]
    # held-out answers, 100 unseen digits: 20 or more right has probability ~0.002 at chance (0.10); observed
    # 0.29-0.35 over five runs with the former 64-code tokenizer, 0.33 in one run with 256 codes. Caption accuracy
    # after stage 2 varies more (0.13-0.24 with 64 codes, 0.29 in one run with 256) and is only reported.
    print(f"caption accuracy {caption_accuracy:.2f}, VQA accuracy {vqa_accuracy:.2f}")
    assert vqa_accuracy >= 0.2, vqa_accuracy

