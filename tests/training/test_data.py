"""Data sources, bad-record skipping, sequence building and the collators."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
import torch
from conftest import png_bytes, text_vocab_size, tiny_lavit_config
from lavit.training.collators import LaVITDataCollator
from lavit.training.data import (
    SKIPPED_FIELD,
    BadRecordCounter,
    image_dataset,
    load_records,
    load_text_records,
    mix_text_records,
)
from lavit.training.sample_data import photo_images
from lavit.training.sequences import InstructionBuilder, SequenceBuilder
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def photos():
    return list(photo_images().items())[:4]


def test_every_source_gives_image_and_text_columns(tmp_path, photos):
    import pandas

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for index, (name, array) in enumerate(photos):
        (folder / f"{index}.png").write_bytes(png_bytes(array))
        rows.append({"path": f"images/{index}.png", "caption": f"a photo of a {name}"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    pandas.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    pandas.DataFrame([{"image": {"bytes": png_bytes(array), "path": None}, "text": name} for name, array in photos]
                     ).to_parquet(tmp_path / "pairs.parquet")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as shard:
        for index, (name, array) in enumerate(photos):
            for suffix, payload in (("jpg", png_bytes(array)), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))
    (folder / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": f"{index}.png", "text": name}) for index, (name, _) in enumerate(photos)))

    from lavit.training.data import decode_image

    for source in ("pairs.jsonl", "pairs.csv", "pairs.parquet", "shard-000.tar", "images"):
        records = load_records(str(tmp_path / source))
        assert {"image", "text"} <= set(records.column_names), source
        assert len(records) == len(photos), source
        image = decode_image(records[0]["image"])
        assert image.mode == "RGB" and image.size[0] > 100, source
    streamed = load_records(str(tmp_path / "pairs.jsonl"), streaming=True)
    assert [record["text"] for record in streamed] == [row["caption"] for row in rows]
    with pytest.raises(ValueError, match="no text column"):
        load_records(str(tmp_path / "pairs.jsonl"), text_column="missing")


def test_bad_records_are_skipped_and_counted_never_fatal(tmp_path, photos, lavit_processor):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(photos[0][1]))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "truncated.png").write_bytes(png_bytes(photos[1][1])[:200])
    rows = [{"image": name, "text": "a photo"} for name in ("good.png", "corrupt.png", "missing.png",
                                                           "truncated.png", "good.png")]
    rows.append({"image": "good.png", "text": "   "})  # empty text
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    builder = SequenceBuilder(lavit_processor.tokenizer, config, max_length=64, order="image_to_text")
    sequences = builder.build(load_records(str(tmp_path / "pairs.jsonl")))
    assert builder.counter.counts["unusable record"] == 1
    collator = LaVITDataCollator(lavit_processor.image_processor, config.image_start_token_id)
    batch = collator([sequences[index] for index in range(len(sequences))])
    assert collator.counter.counts["unreadable image"] == 3
    assert batch["pixel_values"].shape[0] == 2  # the two good images survive
    assert int((batch["input_ids"] == config.image_start_token_id).sum()) == 2


def test_sequences_pack_both_orders_within_max_length(lavit_processor, photos):
    import datasets

    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    records = datasets.Dataset.from_dict({"image": [png_bytes(array) for _, array in photos] * 3,
                                          "text": [f"a photo of a {name}" for name, _ in photos] * 3})
    builder = SequenceBuilder(lavit_processor.tokenizer, config, max_length=60, order="both",
                              image_token_estimate=8)
    rows = builder.build(records)
    starts = {"image_to_text": 0, "text_to_image": 0}
    for row in rows:
        budget = sum(row["segment_lengths"]) + 8 * len(row["images"])
        assert budget <= 60 and sum(row["segment_lengths"]) == len(row["input_ids"])
        position = 0
        for length in row["segment_lengths"]:
            first = row["input_ids"][position]
            starts["image_to_text" if first == config.image_start_token_id else "text_to_image"] += 1
            position += length
    assert starts == {"image_to_text": 12, "text_to_image": 12}
    assert len(rows) < 24  # several pairs per row


def test_text_only_records_mix_in_by_ratio(tmp_path, photos):
    import datasets

    pairs = datasets.Dataset.from_dict({"image": [png_bytes(photos[0][1])] * 200, "text": ["a photo"] * 200})
    (tmp_path / "corpus.txt").write_text("\n".join(f"line {index}" for index in range(400)))
    mixed = mix_text_records(pairs, load_text_records(str(tmp_path / "corpus.txt")), text_ratio=0.4, seed=0)
    text_only = sum(record["image"] is None for record in mixed)
    assert 0.3 < text_only / len(mixed) < 0.5


def test_packed_and_padded_batches_give_the_same_loss(lavit_model, lavit_processor, photos):
    import datasets

    config = lavit_model.config
    records = datasets.Dataset.from_dict({"image": [png_bytes(array) for _, array in photos],
                                          "text": [f"a photo of a {name}" for name, _ in photos]})
    rows = SequenceBuilder(lavit_processor.tokenizer, config, max_length=80, order="random").build(records)
    rows = [rows[index] for index in range(len(rows))]
    losses = {}
    # one row; rows of at most 21 tokens before the images expand (two segments each, one row right-padded); one
    # padded row per segment
    for packed, max_row_length in ((True, None), (True, 21), (False, None)):
        collator = LaVITDataCollator(lavit_processor.image_processor, config.image_start_token_id,
                                     pad_token_id=lavit_processor.tokenizer.pad_token_id, packed=packed,
                                     max_row_length=max_row_length)
        batch = collator(rows)
        assert int(batch.pop("skipped_records")) == 0
        assert ("attention_mask" in batch) != packed
        if packed:
            assert batch["input_ids"].shape[0] == (1 if max_row_length is None else 2)
            assert ((batch["position_ids"][:, 1:] == 0).sum(dim=1) >= 1).all()  # every row holds two segments
        with torch.no_grad():
            losses[packed, max_row_length] = lavit_model(**batch).loss
    reference = losses[False, None]
    assert all(torch.allclose(loss, reference, atol=1e-5) for loss in losses.values()), losses


def test_instruction_rows_supervise_only_the_answers(lavit_processor, photos):
    vqa = InstructionBuilder(lavit_processor, task="vqa")
    example = vqa.example({"image": png_bytes(photos[0][1]), "question": "what is it?", "answer": "a cat"}, 0)
    tokenizer = lavit_processor.tokenizer
    supervised = [token for token, label in zip(example["input_ids"], example["labels"], strict=True)
                  if label != -100]
    assert tokenizer.decode(supervised, skip_special_tokens=True).strip() == "a cat"
    assert example["input_ids"][0] == lavit_processor.image_start_token_id

    chat = InstructionBuilder(lavit_processor, task="chat")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": "and the colour?"},
                {"role": "assistant", "content": "red"}]
    example = chat.example({"messages": messages, "images": [png_bytes(photos[0][1])]}, 0)
    supervised = [token for token, label in zip(example["input_ids"], example["labels"], strict=True)
                  if label != -100]
    text = tokenizer.decode(supervised, skip_special_tokens=True)
    assert "cat" in text and "red" in text and "colour" not in text
    counter = BadRecordCounter()
    chat.counter = counter
    chat({"messages": [messages], "images": [[]]}, [0])  # one placeholder, no image: skipped and counted
    assert counter.total == 1


def test_record_counts_have_one_owner():
    """Every training module that reads records reports its counts through `training.data`'s owner (`record_fields`,
    `stored_skips`, `BatchRecordCounts`, `BadRecordCounter`): no other module spells the batch fields or reaches into a
    counter's `counts`, so the fields, the checkpoint file and the share check change in one place."""
    from pathlib import Path

    import lavit.training

    folder = Path(lavit.training.__file__).parent
    offenders = [path.name for path in sorted(folder.glob("*.py")) if path.name != "data.py" and any(
        needle in path.read_text() for needle in ('"skipped_records"', '"used_records"', ".counts["))]
    assert not offenders, f"record counts handled outside training/data.py in {offenders}"


def test_batch_record_counts_take_check_and_survive_a_checkpoint(tmp_path):
    from types import SimpleNamespace

    from lavit.training.data import BatchRecordCounts, TooManyBadRecordsError, record_fields

    counts = BatchRecordCounts()
    batches = [{"input_ids": torch.ones(1, 2), **record_fields(2, 3)}, {"input_ids": torch.ones(1, 2)}, [1, 2]]
    for batch in batches:
        counts.take(batch)
    assert list(batches[0]) == ["input_ids"] and (counts.skipped, counts.used) == (2, 3)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    totals = counts.totals(accelerator)
    BatchRecordCounts.save(tmp_path, totals)
    assert BatchRecordCounts.load(tmp_path) == counts
    assert BatchRecordCounts.load(tmp_path / "none") == BatchRecordCounts()
    BatchRecordCounts.check(totals, 0.5, "training")
    with pytest.raises(TooManyBadRecordsError, match="training: more than 30% .* 3 used, 2 skipped of 5"):
        BatchRecordCounts.check(totals, 0.3, "training")


# good (G) and bad (B: an empty image) records: runs of bad ones at the start, in the middle and at the end
@pytest.mark.parametrize("pattern", ["GBBBGGBG", "BBBGGG", "GGGBBB", "GBGBGB", "BBBBBBBG"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_image_items_count_each_bad_record_once_per_pass(pattern, streaming):
    """The items of `image_dataset` carry the bad records: summed over one pass, each bad record counts once, wherever
    it lies (a run of n bad records counted n(n+1)/2 map-style, and the bad records after the last readable image of
    a stream were never counted)."""
    records = datasets.Dataset.from_dict(
        {"image": [png_bytes(np.full((8, 8, 3), 200, np.uint8)) if kind == "G" else b"" for kind in pattern]})
    source = records.to_iterable_dataset() if streaming else records
    dataset = image_dataset(source, BadRecordCounter(log_first=0))
    items = list(dataset) if streaming else [dataset[index] for index in range(len(dataset))]
    assert sum(item[SKIPPED_FIELD] for item in items) == pattern.count("B")
    assert len(items) == (pattern.count("G") if streaming else len(pattern))


@pytest.mark.parametrize("name, text", [("metadata.jsonl", "\n"), ("metadata.jsonl", "\n" * 5000),
                                        ("metadata.csv", ""), ("metadata.csv", "file_name,text\n\n")])
def test_a_metadata_file_without_records_is_named_with_the_fix(tmp_path, name, text):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "0.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{name} holds no record: write one line per image"):
        load_records(str(tmp_path))


def test_a_metadata_file_saved_with_a_byte_order_mark_loses_no_record(tmp_path):
    for index in range(2):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{index}.png")
    lines = "".join(json.dumps({"file_name": f"{index}.png", "text": f"t{index}"}) + "\n" for index in range(2))
    (tmp_path / "metadata.jsonl").write_text(lines + "not JSON\n", encoding="utf-8-sig")  # the bad line: read by lavit
    counter = BadRecordCounter(log_first=0)
    assert sorted(load_records(str(tmp_path), counter=counter)["text"]) == ["t0", "t1"]
    assert counter.total == 1


def test_a_webdataset_shard_without_members_is_named(tmp_path):
    tarfile.open(tmp_path / "empty.tar", "w").close()
    with pytest.raises(ValueError, match="empty.tar holds no file"):
        load_records(str(tmp_path))


@pytest.mark.parametrize("pattern", ["GBBBBBBBBB", "GGGGGGGBBB", "BBBGGGGGGG"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_image_items_count_the_readable_records_as_used(pattern, streaming):
    """A pass uses the readable records only, however the bad ones are stood in for: the skipped share is that of
    the data (9 of 10 here, refused), in both kinds of dataset."""
    records = datasets.Dataset.from_dict(
        {"image": [png_bytes(np.full((8, 8, 3), 200, np.uint8)) if kind == "G" else b"" for kind in pattern]})
    source = records.to_iterable_dataset() if streaming else records
    dataset = image_dataset(source, BadRecordCounter(log_first=0))
    items = list(dataset) if streaming else [dataset[index] for index in range(len(dataset))]
    assert sum(item["used_records"] for item in items) == pattern.count("G")


def test_a_stream_without_a_readable_image_says_how_many_records_it_read():
    records = datasets.Dataset.from_dict({"image": [b""] * 6}).to_iterable_dataset()
    with pytest.raises(ValueError, match="none of the 6 records of the stream holds a readable image"):
        list(image_dataset(records, BadRecordCounter(log_first=0)))
