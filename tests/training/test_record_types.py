"""Issue 24 (U2): a record whose field has the wrong type (a number as the caption, a list where text is expected,
a column whose kind changes from record to record) is skipped and counted, never an Arrow or library traceback.

The surface is enumerated: every kind of local source in `SOURCE_LOADERS` gets data with such records."""

import io
import json
import tarfile

import datasets
import pytest
from lavit.training.data import SOURCE_LOADERS, BadRecordCounter, load_records
from PIL import Image

# good records, then records whose caption (or another column) has the wrong type
GOOD = [{"file_name": f"{index}.png", "text": f"photo {index}", "score": index} for index in range(4)]
BAD = [{"file_name": "0.png", "text": 42, "score": 1}, {"file_name": "1.png", "text": ["a", 3], "score": 2},
       {"file_name": "2.png", "text": {"en": "x"}, "score": 3}, {"file_name": "3.png", "text": "fine", "score": "n/a"}]


def images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(folder / f"{index}.png")


def as_table(records):
    return [{"image": record["file_name"], **{k: v for k, v in record.items() if k != "file_name"}}
            for record in records]


def write_imagefolder(tmp_path):
    folder = tmp_path / "photos"
    images(folder)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in GOOD + BAD))
    return folder, len(BAD)


def write_jsonl(tmp_path):
    images(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in as_table(GOOD + BAD)))
    return tmp_path / "pairs.jsonl", len(BAD)


def write_json(tmp_path):
    images(tmp_path)
    (tmp_path / "pairs.json").write_text(json.dumps(as_table(GOOD + BAD)))
    return tmp_path / "pairs.json", len(BAD)


def write_csv(tmp_path):  # every CSV field is text: a number caption is the text "42"
    images(tmp_path)
    lines = ["image,text"] + [f"{record['file_name']},{record['text']}" for record in GOOD] + ["0.png,42"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv", 0


def write_parquet(tmp_path):  # a typed column: a caption column of numbers is wrong for every record
    images(tmp_path)
    datasets.Dataset.from_list([{"image": f"{index}.png", "text": index} for index in range(4)]).to_parquet(
        tmp_path / "pairs.parquet")
    return tmp_path / "pairs.parquet", 4


def write_saved(tmp_path):
    images(tmp_path)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"image": str(tmp_path / f"{index}.png"), "text": index}
                                for index in range(4)]).save_to_disk(str(folder))
    return folder, 4


def write_tar(tmp_path, name="shard.tar"):  # WebDataset: every field is bytes of its file; text is always text
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / name, "w") as shard:
        for index in range(4):
            for suffix, payload in (("png", _png_bytes(index)), ("txt", b"42" if index == 0 else b"photo")):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))
    return folder / name, 0


def _png_bytes(index):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_webdataset(tmp_path):
    path, bad = write_tar(tmp_path)
    return path.parent, bad


WRITERS = {"imagefolder": write_imagefolder, ".jsonl": write_jsonl, ".json": write_json, ".csv": write_csv,
           ".parquet": write_parquet, "saved": write_saved, ".tar": write_tar, "webdataset": write_webdataset}


def test_every_source_kind_is_covered():
    assert set(WRITERS) == set(SOURCE_LOADERS)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_records_of_the_wrong_type_are_skipped_and_counted_in_every_source_kind(tmp_path, kind, lavit_processor):
    from conftest import text_vocab_size, tiny_lavit_config
    from lavit.training.sequences import SequenceBuilder

    path, bad = WRITERS[kind](tmp_path)
    counter = BadRecordCounter(max_skipped_share=1.0)
    records = load_records(str(path), counter=counter)  # never an Arrow error
    rows = records.to_list() if hasattr(records, "to_list") else list(records)
    # what loading did not skip, the sequence builder does (a caption that is not text), counted in the same counter
    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    builder = SequenceBuilder(lavit_processor.tokenizer, config, max_length=96, image_token_estimate=4)
    builder.counter = counter
    builder({"image": [row["image"] for row in rows], "text": [row.get("text") for row in rows]},
            list(range(len(rows))))
    assert counter.total == bad, (kind, counter.counts)
    if kind in ("imagefolder", ".jsonl", ".json"):  # the mixed-type lines are named when loading
        assert counter.counts["a field of the wrong type"] == len(BAD) and len(rows) == len(GOOD)
        assert "is number (42), expected text" in counter.examples["a field of the wrong type"]
