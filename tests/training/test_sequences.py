"""`lavit.training.sequences`: user text never yields a control id, row lengths are refused against the model's context
at its exact boundary, dropped records are carried in the rows (`with_skip_counts`) and counted once
(`count_stored_skips`), the stage-2 builder lays out pre-tokenized images, orders and captions as documented,
`RandomOrderRows` flips only image segments and keeps their tokens, and `InstructionBuilder` refuses what it cannot
supervise.
"""

import datasets
import pytest
from conftest import text_vocab_size, tiny_lavit_config
from lavit.training.data import SKIPPED_FIELD, BadRecordCounter, BadRecordError
from lavit.training.sequences import (
    InstructionBuilder,
    RandomOrderRows,
    SequenceBuilder,
    check_max_length,
    count_stored_skips,
    encode_text,
    with_skip_counts,
)


@pytest.fixture
def config(text_tokenizer):
    return tiny_lavit_config(text_vocab_size(text_tokenizer))


def control_ids(config):
    return config.image_start_token_id, config.image_end_token_id


def test_encode_text_splits_written_markers_and_refuses_a_control_id_that_stays_whole(text_tokenizer, config):
    ids = encode_text(text_tokenizer, "a cat [IMG] on a sofa [/IMG]", control_ids(config))
    assert not set(ids) & set(control_ids(config))
    with pytest.raises(BadRecordError, match=str(config.image_start_token_id)):
        encode_text(text_tokenizer, "a cat [IMG]", control_ids(config), split_special_tokens=False)


def test_max_length_is_refused_one_token_past_the_context_with_the_numbers(config):
    context = config.text_config.max_position_embeddings
    check_max_length(context - 10, config, image_tokens=10)  # exactly the context: fits
    with pytest.raises(ValueError, match=rf"--max_length {context - 10} \+ 11 tokens .*context length of {context}"):
        check_max_length(context - 10, config, image_tokens=11)


def test_skip_counts_ride_on_the_first_row_or_on_an_empty_row_of_their_own():
    rows = with_skip_counts({"input_ids": [[1], [2]], "images": [[], []]}, skipped=3)
    assert rows[SKIPPED_FIELD] == [3, 0]
    assert with_skip_counts({"input_ids": [[1]]}, skipped=0)[SKIPPED_FIELD] == [0]
    empty = with_skip_counts({"input_ids": [], "images": []}, skipped=2)
    assert empty == {"input_ids": [[]], "images": [[]], SKIPPED_FIELD: [2]}
    assert with_skip_counts({"input_ids": []}, skipped=0) == {"input_ids": [], SKIPPED_FIELD: []}


class Collator:
    count_stored_skips = True


def test_stored_skips_of_a_built_dataset_are_counted_once_and_the_collator_told_so():
    counter, collator = BadRecordCounter(), Collator()
    rows = datasets.Dataset.from_dict({"input_ids": [[1], [2], [3]], SKIPPED_FIELD: [2, 0, 5]})
    count_stored_skips(rows, counter, collator)
    assert counter.total == 7 and collator.count_stored_skips is False

    streamed_counter, streamed_collator = BadRecordCounter(), Collator()
    count_stored_skips(rows.to_iterable_dataset(), streamed_counter, streamed_collator)
    assert streamed_counter.total == 0 and streamed_collator.count_stored_skips is True  # counted per batch instead


def test_the_builder_refuses_an_unknown_order(text_tokenizer, config):
    with pytest.raises(ValueError, match="order must be one of .*'sideways'"):
        SequenceBuilder(text_tokenizer, config, order="sideways")


def test_stored_code_ids_become_visual_tokens_between_the_markers_and_count_exactly(text_tokenizer, config):
    builder = SequenceBuilder(text_tokenizer, config, max_length=64, order="text_to_image")
    caption = encode_text(text_tokenizer, "a cat", control_ids(config))
    (segment,) = builder.segments_of({"image": "cat.png", "text": "  a cat  ", "code_ids": [0, 5, 31]}, 0)
    visual = [config.visual_token_offset + code for code in (0, 5, 31)]
    assert segment["input_ids"] == caption + [config.image_start_token_id, *visual, config.image_end_token_id,
                                              text_tokenizer.eos_token_id]
    assert segment["budget"] == len(segment["input_ids"])  # known tokens: no estimate added


def test_an_image_without_codes_reserves_its_estimate_and_the_caption_is_cut_to_fit(text_tokenizer, config):
    builder = SequenceBuilder(text_tokenizer, config, max_length=12, order="image_to_text", image_token_estimate=6)
    text = "the quick brown fox jumps over the lazy dog"
    (segment,) = builder.segments_of({"image": "fox.png", "text": text}, 0)
    assert segment["budget"] == 12
    assert segment["input_ids"][:2] == list(control_ids(config))
    assert segment["input_ids"][2:-1] == encode_text(text_tokenizer, text)[:3]
    with pytest.raises(BadRecordError, match="the image alone needs more than max_length=9"):
        SequenceBuilder(text_tokenizer, config, max_length=9, image_token_estimate=6).segments_of(
            {"image": "fox.png", "text": text}, 4)


def test_a_record_with_several_captions_takes_the_one_its_index_picks(text_tokenizer, config):
    builder = SequenceBuilder(text_tokenizer, config, max_length=64)
    captions = ["a dog", "a cat", "a rocket"]
    for index in range(4):
        (segment,) = builder.segments_of({"image": None, "text": captions}, index)
        assert segment["input_ids"][:-1] == encode_text(text_tokenizer, captions[index % 3])
    with pytest.raises(BadRecordError, match="record 7: empty or missing text"):
        builder.segments_of({"image": None, "text": []}, 7)


def random_order_row(config, eos):
    start, end = control_ids(config)
    image_segment = [start, 200, 201, end, 10, 11, eos]
    text_segment = [12, 13, eos]
    return {"input_ids": image_segment * 2 + text_segment, "segment_lengths": [7, 7, 3]}


def test_random_order_refuses_a_ratio_outside_zero_to_one(config):
    with pytest.raises(ValueError, match="image_to_text_ratio must be in \\[0, 1\\], got 1.5"):
        RandomOrderRows([], config, [2], image_to_text_ratio=1.5)


def test_random_order_flips_image_segments_only_and_keeps_their_tokens(text_tokenizer, config):
    eos = text_tokenizer.eos_token_id
    row = random_order_row(config, eos)
    start, end = control_ids(config)
    assert RandomOrderRows([row], config, [eos], image_to_text_ratio=1.0)[0]["input_ids"] == row["input_ids"]
    flipped = RandomOrderRows([row], config, [eos], image_to_text_ratio=0.0)[0]
    assert flipped["input_ids"] == [10, 11, start, 200, 201, end, eos] * 2 + [12, 13, eos]
    assert flipped["segment_lengths"] == row["segment_lengths"]


def test_random_order_draws_again_per_epoch_and_repeats_for_the_same_epoch(text_tokenizer, config):
    eos = text_tokenizer.eos_token_id
    rows = RandomOrderRows([random_order_row(config, eos)] * 8, config, [eos], seed=3)

    def orders():
        return [tuple(rows[index]["input_ids"]) for index in range(len(rows))]

    first = orders()
    assert orders() == first
    rows.set_epoch(1)
    assert orders() != first


def test_instruction_rows_refuse_an_unknown_task(lavit_processor):
    with pytest.raises(ValueError, match="task must be 'caption', 'vqa' or 'chat', got 'translate'"):
        InstructionBuilder(lavit_processor, task="translate")


def test_a_caption_row_supervises_the_caption_and_its_end_only(lavit_processor):
    builder = InstructionBuilder(lavit_processor, task="caption")
    example = builder.example({"image": "cat.png", "text": " a cat "}, 0)
    answer = encode_text(lavit_processor.tokenizer, "a cat") + [lavit_processor.tokenizer.eos_token_id]
    assert example["input_ids"] == list(control_ids_of(lavit_processor)) + answer
    assert example["labels"] == [-100, -100] + answer
    assert example["segment_lengths"] == [len(example["input_ids"])] and example["images"] == ["cat.png"]


def control_ids_of(processor):
    return processor.image_start_token_id, processor.image_end_token_id


def test_instruction_records_it_cannot_supervise_are_skipped_and_counted(lavit_processor):
    short = InstructionBuilder(lavit_processor, task="vqa").example({"image": "a.png", "question": "what?",
                                                                      "answer": "red"}, 0)
    limit = len(short["input_ids"])
    builder = InstructionBuilder(lavit_processor, task="vqa", max_length=limit)
    with pytest.raises(BadRecordError, match="record 2: no image"):
        builder.example({"image": None, "question": "what?", "answer": "a cat"}, 2)
    with pytest.raises(BadRecordError, match="record 3: empty or missing answer"):
        builder.example({"image": "a.png", "question": "what?", "answer": "  "}, 3)
    with pytest.raises(BadRecordError, match=f"over max_length={limit}"):
        builder.example({"image": "a.png", "question": "what is in the picture?", "answer": "a cat"}, 4)
    rows = builder({"image": ["a.png", None], "question": ["what?", "what?"], "answer": ["red", "red"]}, [0, 1])
    assert len(rows["input_ids"]) == 1 and rows[SKIPPED_FIELD] == [1] and builder.counter.total == 1


def test_builders_replace_every_column_of_a_stream_whose_columns_are_not_known_yet(tmp_path, text_tokenizer, config,
                                                                                    lavit_processor):
    """A streamed imagefolder with a metadata column of its own (`label`) and a bad metadata line has no
    `column_names` until read: the
    builders' rows must still replace every record column (they kept `image`, `text`, `label` beside shorter rows:
    a raw `datasets` length error in `lavit train --streaming`)."""
    from lavit.training.data import load_records
    from lavit.training.sample_data import write_imagefolder
    from PIL import Image

    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    folder = write_imagefolder(tmp_path / "data", images, ["a red square", "a green one", "a blue one"],
                               extra=[{"label": index} for index in range(3)])
    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.write("not JSON\n")  # a bad line: the records are read past it, as a stream of unknown columns
    records = load_records(str(folder), streaming=True, counter=BadRecordCounter(log_first=0))
    assert records.column_names is None
    builders = {"pretraining": SequenceBuilder(text_tokenizer, config, max_length=8, order="image_to_text",
                                               image_token_estimate=2),
                "caption": InstructionBuilder(lavit_processor, "caption", 32)}
    for name, builder in builders.items():
        rows = list(builder.build(records))
        assert rows, name
        assert not {"image", "text", "label"} & set(rows[0]) - {"images"}, (name, sorted(rows[0]))


def test_text_records_mix_into_a_stream_whose_columns_are_not_known_yet(tmp_path):
    from lavit.training.data import load_records, load_text_records, mix_text_records
    from lavit.training.sample_data import write_imagefolder
    from PIL import Image

    folder = write_imagefolder(tmp_path / "data", [Image.new("RGB", (8, 8), "red")] * 4, ["a red square"] * 4,
                               extra=[{"label": 1}] * 4)
    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.write("not JSON\n")
    pairs = load_records(str(folder), streaming=True, counter=BadRecordCounter(log_first=0))
    (tmp_path / "texts.txt").write_text("".join(f"plain text {n}\n" for n in range(20)))
    mixed = list(mix_text_records(pairs, load_text_records(str(tmp_path / "texts.txt"), streaming=True), 0.5))
    assert sum(record["image"] is None for record in mixed) >= 1
    assert sum(record["image"] is not None for record in mixed) >= 1
