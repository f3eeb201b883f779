"""Proof that the stages learn (CPU, tiny models, real images): stage 1 on photographs, stage 2 + fine-tuning on
handwritten digits, and the small-data commands of docs/training.md on photo crops."""

import glob
import json
import shlex
import time

import pytest
import torch
from conftest import REPO_ROOT, training_args

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
    # 100 images generated for "the digit N" (10 per class): 20 or more nearest to their class has probability ~0.002
    # at chance (0.10)
    drawing_accuracy = text_to_image_accuracy(pretrained_model, processor, train_images, train_labels)
    print(f"text-to-image class accuracy {drawing_accuracy:.2f}")
    assert drawing_accuracy >= 0.2, drawing_accuracy
    vqa_accuracy = evaluate(LaVITForCausalLM.from_pretrained(finetuned), processor, images, labels)["vqa_accuracy"]
    # held-out answers, 100 unseen digits: 20 or more right has probability ~0.002 at chance (0.10); observed
    # 0.29-0.35 over five runs with the former 64-code tokenizer, 0.33 in one run with 256 codes. Caption accuracy
    # after stage 2 varies more (0.13-0.24 with 64 codes, 0.29 in one run with 256) and is only reported.
    print(f"caption accuracy {caption_accuracy:.2f}, VQA accuracy {vqa_accuracy:.2f}")
    assert vqa_accuracy >= 0.2, vqa_accuracy


def documented_commands(heading: str) -> list[list[str]]:
    """The `lavit ...` lines of the first bash block after `heading` in docs/training.md, as argument lists."""
    section = (REPO_ROOT / "docs" / "training.md").read_text().split(heading, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("lavit ")]


def test_small_data_documented_commands_caption_held_out_photos(tmp_path, monkeypatch, capsys):
    """The small-data commands of docs/training.md, as a user copies them, on 400 crops of ten photographs: captions of
    100 crops from parts of the photos never trained on name the right photo far above chance (about 2.5 to 4 minutes
    on 2 cores)."""
    from lavit.training.sample_data import PHOTO_CLASSES, write_photo_crops_imagefolder

    from lavit.cli import main

    monkeypatch.chdir(tmp_path)
    write_photo_crops_imagefolder("photos/train", 400)
    write_photo_crops_imagefolder("photos/held_out", 100, held_out=True)
    *training, caption = documented_commands("## Small data")
    assert [argv[1] for argv in training] == ["new-language-model", "train-tokenizer", "train", "finetune"]
    assert caption[:2] == ["lavit", "caption"] and "--json" in caption
    started = time.perf_counter()
    for argv in training:
        assert main(argv[1:]) == 0, argv
    files = [match for arg in caption[2:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
    capsys.readouterr()
    assert main([caption[1], *files]) == 0
    captions = json.loads(capsys.readouterr().out)
    seconds = time.perf_counter() - started
    metadata = [json.loads(line) for line in (tmp_path / "photos/held_out/metadata.jsonl").read_text().splitlines()]
    truth = {f"photos/held_out/{line['file_name']}": PHOTO_CLASSES[line["label"]] for line in metadata}
    assert len(captions) == len(truth) == 100
    accuracy = sum(truth[entry["image"]] in entry["caption"].split() for entry in captions) / len(captions)
    with capsys.disabled():
        print(f"\nsmall-data recipe: held-out caption accuracy {accuracy:.2f} (chance 0.10), {seconds / 60:.1f} min")
    # 100 held-out crops, ten classes: 25 or more right has probability 1.3e-5 at chance. Observed with the preset
    # as it is: 0.64 with one torch thread at seeds 42, 1 and 7, 0.41 with two threads (seed 42); before the preset
    # cropped images and kept checkpoints by loss, 0.57 here and 0.32 on CI's machine. Machines and thread counts
    # change the rounding, and a few hundred steps on 400 crops carry it that far: the bar asks for learning far
    # above chance, not for the documented figure (a true 0.41 falls under it with probability 3e-4)
    assert accuracy >= 0.25, (accuracy, [entry["caption"] for entry in captions[:10]])
