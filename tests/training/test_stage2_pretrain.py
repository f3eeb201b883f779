"""`lavit.training.stage2_pretrain.pretraining_dataset`, the stage's own data step, from tiny settings: the rows a
fixed order writes are a dataset of packed rows within `--max_length`, `order="random"` wraps them so each pair's order
is drawn per epoch from the run's seed (a stream's too), `--max_samples` limits the pairs read from `--data`, and
`--text_data` mixes text-only segments in, but never into held-out rows (`mix_text=False`). Its training runs are the
stage tests'.
"""

import datasets
import pytest
from conftest import text_vocab_size, tiny_lavit_config
from lavit.training.arguments import PretrainingArguments
from lavit.training.evaluation import stage_records
from lavit.training.sample_data import write_imagefolder
from lavit.training.sequences import RandomOrderRows, SequenceBuilder, StreamedRandomOrderRows
from lavit.training.stage2_pretrain import make_parser, pretraining_dataset
from PIL import Image

CAPTIONS = ["a photo of a cat", "a rocket on the launch pad", "a bowl of coffee", "an astronaut in a suit"]


@pytest.fixture
def config(text_tokenizer):
    return tiny_lavit_config(text_vocab_size(text_tokenizer))


def pairs(count: int = 4) -> datasets.Dataset:
    # the rows are built from paths: no image is decoded before the collator
    return datasets.Dataset.from_dict({"image": [f"{n}.png" for n in range(count)], "text": CAPTIONS[:count]})


def image_segments(rows, config) -> int:
    starts = 0
    for row in rows:
        position = 0
        for length in row["segment_lengths"]:
            starts += config.image_start_token_id in row["input_ids"][position : position + length]
            position += length
    return starts


def test_a_fixed_order_gives_packed_rows_within_max_length(text_tokenizer, config):
    script_args = PretrainingArguments(data="unused", order="both", max_length=48, image_token_estimate=8)
    rows, builder = pretraining_dataset(script_args, text_tokenizer, config, records=pairs())
    assert isinstance(rows, datasets.Dataset) and isinstance(builder, SequenceBuilder)
    assert (builder.max_length, builder.order, builder.image_token_estimate) == (48, "both", 8)
    assert all(len(row["input_ids"]) + 8 * len(row["images"]) <= 48 for row in rows)
    assert image_segments(rows, config) == 8  # every pair, once per order


def test_random_order_rows_draw_from_the_runs_seed_and_ratio(text_tokenizer, config):
    script_args = PretrainingArguments(data="unused", order="random", image_to_text_ratio=0.25, max_length=48,
                                       image_token_estimate=8)
    rows, builder = pretraining_dataset(script_args, text_tokenizer, config, seed=11, records=pairs())
    assert type(rows) is RandomOrderRows
    assert (rows.seed, rows.image_to_text_ratio, rows.end_ids) == (11, 0.25, builder.end_ids)
    streamed, _ = pretraining_dataset(script_args, text_tokenizer, config, seed=11,
                                      records=pairs().to_iterable_dataset())
    assert type(streamed) is StreamedRandomOrderRows
    assert [row["input_ids"] for row in streamed] == [rows[index]["input_ids"] for index in range(len(rows))]


def test_pairs_are_read_from_data_up_to_max_samples_through_stage_records(tmp_path, text_tokenizer, config):
    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue", "white")]
    data = write_imagefolder(tmp_path / "pairs", images, CAPTIONS)
    script_args = PretrainingArguments(data=str(data), max_samples=3, order="image_to_text", max_length=16,
                                       image_token_estimate=8)
    rows, _ = pretraining_dataset(script_args, text_tokenizer, config, stage_records(script_args, 0).records)
    assert image_segments(rows, config) == 3


def test_text_data_mixes_in_text_segments_but_not_into_held_out_rows(tmp_path, text_tokenizer, config):
    (tmp_path / "texts.txt").write_text("".join(f"the quick brown fox number {n}\n" for n in range(40)))
    script_args = PretrainingArguments(data="unused", text_data=str(tmp_path / "texts.txt"), text_ratio=0.6,
                                       order="image_to_text", max_length=48, image_token_estimate=8)
    rows, _ = pretraining_dataset(script_args, text_tokenizer, config, records=pairs())
    segments = sum(len(row["segment_lengths"]) for row in rows)
    assert image_segments(rows, config) == 4 and segments > 4
    held_out, _ = pretraining_dataset(script_args, text_tokenizer, config, records=pairs(), mix_text=False)
    assert sum(len(row["segment_lengths"]) for row in held_out) == image_segments(held_out, config) == 4


def test_the_stage_parser_reads_the_flags_into_the_stage_arguments(tmp_path):
    script_args, arguments = make_parser().parse_args_and_config(
        ["--data", "pairs.jsonl", "--visual_tokenizer", "tokenizer", "--language_model", "lm", "--order", "both",
         "--max_length", "128", "--output_dir", str(tmp_path / "run")])
    assert isinstance(script_args, PretrainingArguments)
    assert (script_args.order, script_args.max_length, script_args.language_model) == ("both", 128, "lm")
    assert arguments.output_dir == str(tmp_path / "run")
