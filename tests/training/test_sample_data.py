"""`lavit.training.sample_data`: the offline image-text datasets are written in the `imagefolder` layout every stage
reads (PNG files and `metadata.jsonl` in order, extra columns kept), their captions name their classes, digits follow
scikit-learn's labels, and photo crops are reproducible from their seed with held-out crops apart from training ones.
"""

import json

import numpy as np
import pytest
from lavit.training.sample_data import (
    DIGIT_NAMES,
    PHOTO_CLASSES,
    digit_caption,
    digit_images,
    photo_caption,
    photo_crops,
    write_digits_imagefolder,
    write_imagefolder,
)
from PIL import Image
from sklearn.datasets import load_digits


def metadata_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_an_imagefolder_lists_each_image_with_its_text_and_extra_columns_in_order(tmp_path):
    images = [Image.new("RGB", (4, 4), colour) for colour in ("red", "green", "blue")]
    folder = write_imagefolder(tmp_path / "set", images, ["a", "b", "c"], [{"label": n} for n in range(3)])
    rows = metadata_of(folder)
    assert [row["text"] for row in rows] == ["a", "b", "c"]
    assert [row["label"] for row in rows] == [0, 1, 2]
    for row, image in zip(rows, images, strict=True):
        with Image.open(folder / row["file_name"]) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))
    assert not [path for path in folder.iterdir() if path.name not in {row["file_name"] for row in rows}
                | {"metadata.jsonl"}], "no temporary file is left behind"


def test_an_imagefolder_refuses_texts_that_do_not_match_the_images(tmp_path):
    with pytest.raises(ValueError):
        write_imagefolder(tmp_path / "set", [Image.new("RGB", (4, 4))] * 2, ["only one text"])
    assert not (tmp_path / "set" / "metadata.jsonl").exists()


def test_captions_name_the_class():
    assert [digit_caption(label).split()[-1] for label in range(10)] == list(DIGIT_NAMES)
    assert [photo_caption(label).removeprefix("a photo of a ") for label in range(10)] == list(PHOTO_CLASSES)


def test_digit_images_follow_scikit_learns_digits_from_the_offset():
    images, labels = digit_images(count=5, size=24, offset=10)
    assert labels == [int(label) for label in load_digits().target[10:15]]
    assert all(image.size == (24, 24) and image.mode == "RGB" for image in images)
    # the stroke is bright where scikit-learn's 8x8 digit is: a blank image would carry no class
    assert all(np.asarray(image).max() > 100 for image in images)


def test_digit_imagefolder_captions_agree_with_its_labels(tmp_path):
    rows = metadata_of(write_digits_imagefolder(tmp_path / "digits", count=4, size=16))
    assert len(rows) == 4
    assert all(row["text"] == digit_caption(row["label"]) for row in rows)


def test_photo_crops_cycle_the_classes_repeat_from_their_seed_and_hold_out_other_pixels():
    images, labels = photo_crops(10, size=8)
    again, _ = photo_crops(10, size=8)
    held_out, held_out_labels = photo_crops(10, size=8, held_out=True)
    assert labels == held_out_labels == list(range(len(PHOTO_CLASSES)))
    assert all(image.size == (8, 8) and image.mode == "RGB" for image in images)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, held_out, strict=True))
