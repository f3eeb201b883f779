"""Proof that the stages learn (CPU, tiny models, real images): stage 1 on photographs, stage 2 + fine-tuning on
handwritten digits."""

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



def test_stage2_and_finetuning_on_digits_answer_above_chance(tmp_path):
    """Tiny tokenizer -> tiny LLaMA pretrained on digit captions in both orders -> VQA fine-tuning, with the demo's
    settings (about 2 minutes on 2 cores). Chance is 0.10 for every measure."""
    from lavit.training.finetune import FinetuningArguments, finetune
    from lavit.training.sample_data import DIGIT_NAMES, digit_caption, write_tiny_language_model
    from lavit.training.stage1_tokenizer import TokenizerTrainingArguments, train_tokenizer
    from lavit.training.stage2_pretrain import PretrainingArguments, pretrain

    from lavit import LaVITForCausalLM, LaVITProcessor
    from lavit.demo import DIGIT_QUESTION, evaluate, stage_arguments, write_digit_data

    train_folder, _, _ = write_digit_data(tmp_path / "train", 1200, offset=0)
    _, images, labels = write_digit_data(tmp_path / "eval", 100, offset=1697)
    tokenizer_folder = train_tokenizer(
        TokenizerTrainingArguments(data=str(train_folder), tokenizer_config="tiny", crop_scale=1.0,
                                   quantizer_start_step=100, resume="no"),
        stage_arguments(tmp_path / "tokenizer", 400, 16, 1e-3),
    )
    corpus = [digit_caption(label) for label in range(10)] + [
        f"Question: {DIGIT_QUESTION} Answer: {name}" for name in DIGIT_NAMES
    ]
    language_model = write_tiny_language_model(tmp_path / "lm", corpus, vocab_size=120, hidden_size=64)
    pretrained = pretrain(
        PretrainingArguments(data=str(train_folder), visual_tokenizer=str(tokenizer_folder),
                             language_model=str(language_model), max_length=256, visual_learning_rate=None,
                             resume="no"),
        stage_arguments(tmp_path / "pretrain", 1000, 8, 2e-3),
    )
    finetuned = finetune(FinetuningArguments(model=str(pretrained), data=str(train_folder), task="vqa", resume="no"),
                         stage_arguments(tmp_path / "finetune", 600, 8, 1e-3))
    processor = LaVITProcessor.from_pretrained(finetuned)
    model = LaVITForCausalLM.from_pretrained(pretrained).eval()
    caption_accuracy = evaluate(model, processor, images, labels)["caption_accuracy"]
    tuned = LaVITForCausalLM.from_pretrained(finetuned).eval()
    vqa_accuracy = evaluate(tuned, processor, images, labels)["vqa_accuracy"]

    # held-out answers, 100 unseen digits: 20 or more right has probability ~0.002 at chance (0.10); observed
    # 0.31-0.35 over four runs. Caption accuracy after stage 2 varies more (0.13-0.24) and is only reported.
    print(f"caption accuracy {caption_accuracy:.2f}, VQA accuracy {vqa_accuracy:.2f}")
    assert vqa_accuracy >= 0.2, vqa_accuracy
