"""`lavit.training.pretokenize`: the refusals made before any image is read (missing flags, an output that would
overwrite the data), and a run's contract: one row per readable image holding the visual tokenizer's own keep mask and
code ids, unreadable images dropped and counted in the summary, the dataset written under `--output`.
"""

import json

import datasets
import pytest
import torch
from conftest import real_photos, tiny_tokenizer_config
from lavit.training.arguments import PretokenizeArguments
from lavit.training.pretokenize import pretokenize
from PIL import Image

from lavit import LaVITImageProcessor, LaVITTokenizerModel
from lavit.paths import PathConflictError


def write_photos(folder, count: int, corrupt: bool = False):
    folder.mkdir(parents=True)
    lines = []
    for index, photo in enumerate(real_photos()[:count]):
        Image.fromarray(photo).resize((56, 56)).save(folder / f"{index}.png")
        lines.append({"file_name": f"{index}.png", "text": f"photo {index}"})
    if corrupt:
        (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
        lines.append({"file_name": "corrupt.png", "text": "a corrupt image"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_pretokenize_refuses_missing_flags_and_an_output_over_its_data(tmp_path):
    with pytest.raises(ValueError, match="give --visual_tokenizer and --output"):
        pretokenize(PretokenizeArguments(data=str(tmp_path), visual_tokenizer="runs/tokenizer"))
    data = write_photos(tmp_path / "photos", 1)
    with pytest.raises(PathConflictError, match="--output"):
        pretokenize(PretokenizeArguments(data=str(data), visual_tokenizer=str(tmp_path / "tokenizer"),
                                         output=str(data)))
    assert sorted(path.name for path in data.iterdir()) == ["0.png", "metadata.jsonl"]


def test_every_readable_image_gets_the_visual_tokenizers_own_tokens_and_bad_ones_are_counted(tmp_path, capsys):
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config()).eval()
    model.save_pretrained(tmp_path / "tokenizer")
    data = write_photos(tmp_path / "photos", 3, corrupt=True)
    output = pretokenize(PretokenizeArguments(data=str(data), visual_tokenizer=str(tmp_path / "tokenizer"),
                                              output=str(tmp_path / "tokenized"), batch_size=2, device="cpu"))
    assert output == tmp_path / "tokenized"
    rows = datasets.load_from_disk(str(output))
    assert len(rows) == 3 and rows["text"] == ["photo 0", "photo 1", "photo 2"]
    images = [Image.open(data / f"{index}.png").convert("RGB") for index in range(3)]
    pixel_values = LaVITImageProcessor.from_tokenizer_config(model.config)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = model.tokenize(pixel_values)
    assert rows["keep_mask"] == tokens.keep_mask.tolist()
    assert rows["code_ids"] == [ids.tolist() for ids in tokens.per_image()]
    assert all(len(ids) == sum(mask) for ids, mask in zip(rows["code_ids"], rows["keep_mask"], strict=True))
    assert "3 records tokenized, 1 skipped" in capsys.readouterr().out


def test_runs_over_a_saved_dataset_never_write_into_its_folder(tmp_path):
    """A `save_to_disk` folder given as --data is the user's: `datasets` writes a map's `cache-*.arrow` beside its
    input by default (a new one per run here, and a resume then saw the data's files change). Two runs leave it as it
    was, and give the same rows."""
    from lavit.training.pretokenize import main

    torch.manual_seed(0)
    LaVITTokenizerModel(tiny_tokenizer_config()).eval().save_pretrained(tmp_path / "tokenizer")
    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(write_photos(tmp_path / "photos", 2)),
                          split="train").save_to_disk(str(saved))
    before = sorted(path.name for path in saved.iterdir())
    outputs = []
    for run in range(2):
        main(PretokenizeArguments(data=str(saved), visual_tokenizer=str(tmp_path / "tokenizer"),
                                  output=str(tmp_path / f"tokenized{run}"), device="cpu"))
        outputs.append(datasets.load_from_disk(str(tmp_path / f"tokenized{run}"))["code_ids"])
    assert sorted(path.name for path in saved.iterdir()) == before
    assert outputs[0] == outputs[1] and datasets.is_caching_enabled()
