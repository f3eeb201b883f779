"""Small data through the command line: presets, the short-run warning, a language model written offline, random
pair orders per epoch, reproducible inference and quiet, focused output."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    real_photos,
    text_vocab_size,
    tiny_lavit_config,
    tiny_tokenizer_config,
    training_args,
    write_tiny_language_model,
)
from PIL import Image
from test_cli import run
from transformers import TrainerCallback

from lavit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_a_preset_fills_what_the_run_left_at_defaults_and_scales_steps_to_the_data(tmp_path):
    from lavit.training.arguments import PretrainingArguments
    from lavit.training.presets import PRESETS, apply_preset, apply_preset_steps, get_preset

    script = PretrainingArguments(data="unused", preset="small-data", max_length=512)
    arguments = training_args(tmp_path, learning_rate=5e-5, per_device_train_batch_size=8)
    arguments.learning_rate = 7e-4  # set by the run: kept
    model = type("Model", (), {"config": tiny_lavit_config(100)})()  # 16 patches
    preset, applied = apply_preset("pretrain", "small-data", script, arguments, model)
    assert arguments.learning_rate == 7e-4 and script.max_length == 512 and script.visual_learning_rate is None
    assert "learning_rate" not in applied and "max_length" not in applied
    # 134 rows, 8 per step, 30 passes: 503 steps; bounded by the preset's range
    assert apply_preset_steps(preset, arguments, 134) == {"max_steps": 503} and arguments.max_steps == 503
    assert apply_preset_steps(preset, training_args(tmp_path, max_steps=-1), 4)["max_steps"] == preset.min_steps
    assert apply_preset_steps(preset, training_args(tmp_path, max_steps=40), 134) == {}  # --max_steps wins
    fresh = PretrainingArguments(data="unused")
    apply_preset("pretrain", "small-data", fresh, training_args(tmp_path), model)
    assert fresh.max_length == 4 * 16
    with pytest.raises(ValueError, match="not a preset of this stage.*small-data"):
        get_preset("finetune", "huge")
    assert set(PRESETS) == {"tokenizer", "pretrain", "finetune"}


@pytest.mark.parametrize("form", ["flags", "dashed", "config_file"])
def test_a_preset_leaves_every_setting_the_run_gave_even_at_its_default(tmp_path, form):
    """Every setting of every stage's preset, given on the command line (or in a config file) at its default value,
    is the run's choice: the preset leaves it, as it leaves one given at any other value."""
    import yaml
    from lavit.training.arguments import (
        FinetuningArguments,
        LaVITTrainingArguments,
        PretrainingArguments,
        TokenizerTrainingArguments,
        make_stage_parser,
    )
    from lavit.training.presets import PRESETS, apply_preset

    stages = {"tokenizer": TokenizerTrainingArguments, "pretrain": PretrainingArguments,
              "finetune": FinetuningArguments}
    assert set(stages) == set(PRESETS)
    model = type("Model", (), {"config": tiny_lavit_config(100)})()
    for stage, arguments_class in stages.items():
        parser = make_stage_parser((arguments_class, LaVITTrainingArguments), None, stage, "")
        defaults = {}
        for setting in PRESETS[stage]["small-data"].settings:
            owner = arguments_class if setting in arguments_class.__dataclass_fields__ else LaVITTrainingArguments
            default = owner.__dataclass_fields__[setting].default
            if default is not None:  # a flag cannot give None
                defaults[setting] = getattr(default, "value", default)
        given = {"data": "unused", "output_dir": str(tmp_path / stage), "preset": "small-data", **defaults}
        if stage != "tokenizer":
            given["model" if stage == "finetune" else "language_model"] = "org/name"
        if form == "config_file":
            path = tmp_path / f"{stage}.yaml"
            path.write_text(yaml.safe_dump(given))
            argv = [str(path)]
        else:
            # `--max-length` for `--max_length` (abbreviations are refused: `lavit.flags`)
            flag = (lambda name: "--" + name.replace("_", "-")) if form == "dashed" else (lambda name: f"--{name}")
            argv = [part for name, value in given.items() for part in (
                f"--{name}" if name in ("data", "output_dir", "preset", "model", "language_model") or len(name) < 8
                else flag(name), str(value))]
        script, training = parser.parse_args_and_config(argv)
        _, applied = apply_preset(stage, "small-data", script, training, model)
        assert not set(applied) & set(defaults), (stage, form, applied)
        for setting, value in defaults.items():
            owner = script if hasattr(script, setting) else training
            assert getattr(getattr(owner, setting), "value", getattr(owner, setting)) == value, (stage, setting)


def test_random_order_draws_each_pair_order_per_epoch_from_the_seed(lavit_processor):
    import datasets
    from lavit.training.sample_data import PHOTO_CLASSES, photo_caption
    from lavit.training.sequences import RandomOrderRows, SequenceBuilder, StreamedRandomOrderRows

    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    # the builder never decodes images: their paths are enough
    records = datasets.Dataset.from_dict({"image": [f"{name}.png" for name in PHOTO_CLASSES] * 4,
                                          "text": [photo_caption(label) for label in range(10)] * 4})
    builder = SequenceBuilder(lavit_processor.tokenizer, config, max_length=60, order="random",
                              image_token_estimate=8)
    built = builder.build(records)

    def image_first(rows, epoch):
        rows.set_epoch(epoch)
        firsts = []
        for index in range(len(rows)):
            row, start = rows[index], 0
            for length in row["segment_lengths"]:
                segment = row["input_ids"][start : start + length]
                firsts.append(segment[0] == config.image_start_token_id)
                assert segment.count(config.image_start_token_id) == 1 and segment[-1] == builder.end_ids[0]
                start += length
        return torch.tensor(firsts)

    rows = RandomOrderRows(built, config, builder.end_ids, image_to_text_ratio=0.5, seed=0)
    epochs = torch.stack([image_first(rows, epoch) for epoch in range(8)])
    assert torch.equal(epochs[3], image_first(rows, 3))  # the same epoch draws the same orders
    assert not torch.equal(epochs[0], epochs[1])
    assert 0.35 < epochs.float().mean() < 0.65
    read_both_ways = (epochs.any(dim=0) & (~epochs).any(dim=0)).float().mean()
    assert read_both_ways > 0.9, read_both_ways  # a fixed draw per record would read half the images one way only
    other_seed = RandomOrderRows(built, config, builder.end_ids, seed=1)
    assert not torch.equal(image_first(other_seed, 0), epochs[0])
    streamed = StreamedRandomOrderRows(built.to_iterable_dataset(), config, builder.end_ids, seed=0)
    streamed.set_epoch(5)
    rows.set_epoch(5)
    assert [row["input_ids"] for row in streamed] == [rows[index]["input_ids"] for index in range(len(rows))]


def test_small_data_training_images_are_cropped_and_mirrored_from_the_seed_held_out_ones_never(lavit_processor):
    import dataclasses

    from lavit.training.arguments import FinetuningArguments, PretrainingArguments, SequenceArguments
    from lavit.training.collators import lm_collator
    from lavit.training.presets import PRESETS, SMALL_DATA

    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    photo = Image.fromarray(real_photos()[0]).resize((96, 96))
    ids = [config.image_start_token_id, config.image_end_token_id, 5, 6]
    rows = [{"input_ids": ids, "images": [photo]}, {"input_ids": ids, "images": [photo]}]
    # the LM stages' collators, with what each stage's preset sets, from the stage's own arguments
    for stage, arguments in (("pretrain", PretrainingArguments(data="d")), ("finetune", FinetuningArguments(data="d"))):
        assert {spec.name for spec in dataclasses.fields(SequenceArguments)} >= {"crop_scale", "horizontal_flip"}
        for setting in ("crop_scale", "horizontal_flip"):
            setattr(arguments, setting, PRESETS[stage][SMALL_DATA].settings[setting])
        collator = lm_collator(lavit_processor, config, True, **arguments.collator_augmentation())
        torch.manual_seed(0)
        first, second = collator(rows)["pixel_values"], collator(rows)["pixel_values"]
        assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)  # a draw per image and batch
        torch.manual_seed(0)
        assert torch.equal(collator(rows)["pixel_values"], first)  # the Trainer's seed decides them
        # rows that carry their (seed, epoch, index) (`EpochSeeds`, as LaVITTrainer gives them): those decide, not
        # the process RNG a dataloader worker is seeded with; another epoch draws other crops
        seeded = [{**row, "augmentation_seed": [0, 0, index]} for index, row in enumerate(rows)]
        torch.manual_seed(1)
        drawn = collator(seeded)["pixel_values"]
        torch.manual_seed(2)
        assert torch.equal(collator(seeded)["pixel_values"], drawn) and not torch.equal(drawn[0], drawn[1])
        later = [{**row, "augmentation_seed": [0, 1, index]} for index, row in enumerate(rows)]
        assert not torch.equal(collator(later)["pixel_values"], drawn)
        whole = lm_collator(lavit_processor, config, True)(rows)["pixel_values"]
        assert torch.equal(collator.without_augmentation()(rows)["pixel_values"], whole)
        assert collator.without_augmentation().counter is collator.counter
        # a pre-tokenized image keeps its pixels: its stored keep mask and codes describe the whole image
        stored = [{**row, "image_keep_mask": [[True] * config.tokenizer_config.num_patches]} for row in rows]
        assert torch.equal(collator(stored)["pixel_values"], whole)


def test_stage2_tells_its_dataset_the_epoch(tmp_path, components_for_stage2):
    from lavit.training.arguments import PretrainingArguments
    from lavit.training.stage2_pretrain import pretrain

    seen = []

    class RecordEpoch(TrainerCallback):
        def on_step_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen.append(train_dataloader.dataset.epoch if hasattr(train_dataloader.dataset, "epoch") else None)

    script = PretrainingArguments(resume="no", max_length=256, **components_for_stage2)
    pretrain(script, training_args(tmp_path / "run", num_train_epochs=3, per_device_train_batch_size=4,
                                   max_steps=-1), callbacks=[RecordEpoch()])
    assert sorted(set(seen)) == [0, 1, 2], seen


@pytest.fixture
def components_for_stage2(tmp_path):
    from lavit.training.sample_data import write_photo_imagefolder

    from lavit import LaVITTokenizerModel

    torch.manual_seed(0)
    LaVITTokenizerModel(tiny_tokenizer_config()).save_pretrained(tmp_path / "tokenizer")
    write_tiny_language_model(tmp_path / "lm")
    return {"data": str(write_photo_imagefolder(tmp_path / "photos")), "visual_tokenizer": str(tmp_path / "tokenizer"),
            "language_model": str(tmp_path / "lm")}


def test_new_language_model_trains_its_tokenizer_on_the_users_captions(capsys, tmp_path):
    from lavit.training.sample_data import write_photo_imagefolder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    photos = write_photo_imagefolder(tmp_path / "photos")
    (tmp_path / "more.txt").write_text("a zebra grazes\nthe harbour at dusk\n")
    code, out, _ = run(capsys, "new-language-model", tmp_path / "lm", "--data", photos, "--texts",
                       tmp_path / "more.txt", "--vocab-size", 300, "--hidden-size", 32)
    assert code == 0 and "--language_model" in out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer)
    for text in ("a photo of a rocket", "the harbour at dusk"):  # whole words of the corpus: no unknown pieces
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= len(text.split()) + 1, (text, ids)
    code, _, err = run(capsys, "new-language-model", tmp_path / "lm2")
    assert code == 1 and "--data" in err


@pytest.fixture
def sampling_lavit_folder(lavit_model, lavit_processor, tmp_path):
    """A tiny LaVIT whose tokenizer samples its selection (like the 'tiny' and 'small' presets)."""
    lavit_model.config.tokenizer_config.selection_mode = "sample"
    lavit_model.visual_tokenizer.config.selection_mode = "sample"
    folder = tmp_path / "sampling"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    return folder


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_caption_vqa_and_tokenize_repeat_their_output_and_print_json(capsys, tmp_path, sampling_lavit_folder):
    files = []
    for index, photo in enumerate(real_photos()):
        files.append(tmp_path / f"photo{index}.png")
        Image.fromarray(photo).save(files[-1])
    for command in (["caption", *files, "--max-new-tokens", 4], ["tokenize", *files],
                    ["vqa", files[0], "--question", "what is it?", "--max-new-tokens", 3],
                    ["caption", *files, "--max-new-tokens", 4, "--do-sample"]):
        outputs = []
        for _ in range(2):
            code, out, _ = run(capsys, *command, "--model", sampling_lavit_folder, "--json")
            assert code == 0
            outputs.append(json.loads(out))
        assert outputs[0] == outputs[1], command
    tokens = outputs_of(capsys, "tokenize", *files, "--model", sampling_lavit_folder, "--json")
    assert [entry["image"] for entry in tokens] == [str(path) for path in files]
    assert all(entry["token_count"] == len(entry["code_ids"]) for entry in tokens)
    reseeded = outputs_of(capsys, "tokenize", *files, "--model", sampling_lavit_folder, "--json", "--seed", 1)
    assert [entry["code_ids"] for entry in reseeded] != [entry["code_ids"] for entry in tokens]
    answer = outputs_of(capsys, "vqa", files[0], "--question", "what?", "--model", sampling_lavit_folder, "--json",
                        "--max-new-tokens", 2)
    assert set(answer) == {"image", "question", "answer"}


def outputs_of(capsys, *argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    return json.loads(out)


def test_a_stage_help_starts_with_its_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert len(text.split("options:")[0].splitlines()) <= 3  # a short usage line, not every Trainer flag
    own, trainer = text.index("--visual_tokenizer"), text.index("Trainer options")
    assert own < trainer < text.index("--gradient_accumulation_steps") and text.index("--preset") < trainer
    assert "small-data" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "pairs.jsonl", "--preset", "huge"])
    assert exit_info.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_a_short_cpu_run_warns_with_its_numbers_and_nothing_else(tmp_path):
    """A subprocess, as a user runs it: the warning names the steps and what to change; DeepSpeed's accelerator
    detection and pinned memory say nothing on a CPU run that uses neither."""
    from lavit.training.sample_data import write_photo_imagefolder

    photos = write_photo_imagefolder(tmp_path / "photos")
    environment = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-m", "lavit.cli", "train-tokenizer", "--data", str(photos), "--tokenizer_config", "tiny",
         "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--disable_tqdm", "true", "--report_to", "none"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**environment, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this run will learn little: 3 optimizer steps" in result.stderr and "--preset small-data" in result.stderr
    assert "11 records -> 11 rows" in result.stderr, result.stderr
    assert "accelerator" not in result.stderr.lower() and "pin_memory" not in result.stderr, result.stderr


class StopAtFirstStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("stopped")


def test_stage2_defaults_on_400_pairs_warn_that_they_take_six_steps(tmp_path, caplog):
    """The first-contact example: 400 captioned images with the defaults pack into about 15 rows of 2048 tokens,
    2 steps per epoch at batch 8, 6 steps in 3 epochs; the run says so when it starts."""
    from lavit.training.arguments import PretrainingArguments, load_config_preset
    from lavit.training.sample_data import write_photo_crops_imagefolder
    from lavit.training.stage2_pretrain import pretrain

    from lavit import LaVITTokenizerConfig, LaVITTokenizerModel

    data = write_photo_crops_imagefolder(tmp_path / "photos", 400, size=16)  # small files: the encoder resizes
    torch.manual_seed(0)
    LaVITTokenizerModel(LaVITTokenizerConfig(**load_config_preset("small", "tokenizer"))).save_pretrained(
        tmp_path / "tokenizer")
    assert main(["new-language-model", str(tmp_path / "lm"), "--data", str(data), "--hidden-size", "32"]) == 0
    script = PretrainingArguments(data=str(data), visual_tokenizer=str(tmp_path / "tokenizer"),
                                  language_model=str(tmp_path / "lm"), resume="no")
    defaults = training_args(tmp_path / "run", per_device_train_batch_size=8, learning_rate=5e-5, max_steps=-1,
                             num_train_epochs=3)
    with caplog.at_level("WARNING", logger="lavit.training.presets"), pytest.raises(KeyboardInterrupt):
        pretrain(script, defaults, callbacks=[StopAtFirstStep()])  # the warning comes before any step
    warning = " ".join(record.getMessage() for record in caplog.records if "learn little" in record.getMessage())
    assert "6 optimizer steps in total (3 epochs, 2 batches of 8 per epoch" in warning, warning
    assert "rows of up to 2048 tokens" in warning and "--preset small-data" in warning and "--max_length" in warning
