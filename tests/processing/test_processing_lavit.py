"""LaVITImageProcessor and LaVITProcessor: official preprocessing, input kinds, placeholders, truncation, saving."""

import numpy as np
import pytest
import torch
from conftest import real_photos
from PIL import Image
from transformers import AutoProcessor

from lavit import LaVITImageProcessor, LaVITProcessor


def test_default_preprocessing_is_the_official_one():
    photo = real_photos()[0]
    pixel_values = LaVITImageProcessor()(photo)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    resized = np.asarray(Image.fromarray(photo).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(pixel_values[0], expected)


def test_every_input_kind_and_mode_becomes_the_same_rgb_image(tmp_path):
    processor = LaVITImageProcessor(size={"height": 32, "width": 32})
    photo = real_photos()[1]
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    reference = processor(photo)["pixel_values"]
    for image in (Image.fromarray(photo), str(path), path, torch.from_numpy(photo).permute(2, 0, 1).float() / 255,
                  photo.astype(np.float32) / 255, np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])):
        torch.testing.assert_close(processor(image)["pixel_values"], reference, atol=2e-2, rtol=0)
    gray = photo.mean(axis=2).astype(np.uint8)
    gray_16bit = gray.astype(np.uint16) * 257
    from_16bit = processor(Image.fromarray(gray_16bit))["pixel_values"]
    torch.testing.assert_close(from_16bit, processor(gray)["pixel_values"], atol=1e-5, rtol=0)
    assert processor(Image.fromarray(photo).convert("CMYK"))["pixel_values"].shape == (1, 3, 32, 32)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.allclose(processor(transparent)["pixel_values"], processor(Image.new("RGB", (8, 8), "white"))[
        "pixel_values"])


def test_aspect_preserving_resize_and_crop():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white centre band: the crop keeps exactly it
    processor = LaVITImageProcessor(size={"height": 20, "width": 20}, resize_mode="shortest_edge_crop",
                                    do_normalize=False)
    assert torch.allclose(processor(wide)["pixel_values"], torch.ones(1, 3, 20, 20))


def test_bad_images_raise_clear_errors(tmp_path):
    processor = LaVITImageProcessor(max_image_pixels=10_000)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image file .*broken.jpg"):
        processor(str(broken))
    with pytest.raises(ValueError, match="image 1 is empty"):
        processor([real_photos()[0][:50, :50], np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0 is too large: 512 x 512"):
        processor(real_photos()[0])
    with pytest.raises(ValueError, match="unsupported image type"):
        processor([{"not": "an image"}])


def test_placeholders_padding_and_truncation(lavit_processor):
    photos = real_photos()
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image"):
        lavit_processor(images=[photos[0]], text="<image> and <image>")
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\).*1 image"):
        lavit_processor(images=[photos[0]], text="no placeholder here")
    start, end = lavit_processor.image_start_token_id, lavit_processor.image_end_token_id
    batch = lavit_processor(images=photos[:2], text=["<image>a cat", "a dog on a sofa and more words <image>"],
                            padding_side="left")
    assert batch["pixel_values"].shape[0] == 2
    assert bool((batch["attention_mask"][:, -1] == 1).all()) and int(batch["attention_mask"][0, 0]) == 0
    for row in batch["input_ids"]:
        starts = (row == start).nonzero().flatten()
        assert torch.equal(row[starts + 1], torch.full_like(starts, end))
    # truncation never splits a placeholder pair; images cut off are dropped with their placeholders
    full = lavit_processor(text="a dog on a sofa and more words <image>", images=[photos[1]])
    length = full["input_ids"].shape[1]
    cut = lavit_processor(text="a dog on a sofa and more words <image>", images=[photos[1]], truncation=True,
                          max_length=length - 1)
    assert cut["input_ids"].shape[1] == length - 2 and "pixel_values" not in cut
    assert start not in cut["input_ids"][0].tolist()
    captions = lavit_processor(images=photos[:2])  # images only: one placeholder each
    assert (captions["input_ids"] == start).sum() == 2


def test_processor_round_trip_through_auto_processor(lavit_processor, tmp_path):
    lavit_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "LaVITProcessor"
    assert loaded.image_processor.size == {"height": 56, "width": 56}
    assert loaded.chat_template == lavit_processor.chat_template
    photo = real_photos()[3]
    expected = lavit_processor(images=[photo], text="<image>a rocket")
    actual = loaded(images=[photo], text="<image>a rocket")
    assert torch.equal(actual["input_ids"], expected["input_ids"])
    assert torch.equal(actual["pixel_values"], expected["pixel_values"])


def test_tokenizer_without_image_tokens_is_rejected():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocabulary))
    with pytest.raises(ValueError, match="does not know"):
        LaVITProcessor(LaVITImageProcessor(), plain)
    assert LaVITProcessor.add_image_tokens(plain) == 2
    assert LaVITProcessor(LaVITImageProcessor(), plain).image_start_token_id == 2


def test_unknown_arguments_raise_and_tokenizer_arguments_pass(lavit_processor):
    with pytest.raises(ValueError, match=r"does not take the arguments \['max_new_tokens', 'temprature'\]"):
        lavit_processor(text="a cat", max_new_tokens=5, temprature=0.7)
    with pytest.raises(ValueError, match=r"reads images and text only, got \['videos'\]"):
        lavit_processor(text="a cat", videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    with_offsets = lavit_processor(text=["a cat", "a red bus"], return_offsets_mapping=True)
    plain = lavit_processor(text=["a cat", "a red bus"])
    assert torch.equal(with_offsets["input_ids"], plain["input_ids"])
    assert with_offsets["offset_mapping"].shape == (*plain["input_ids"].shape, 2)


@pytest.mark.parametrize(("given", "message"), [
    ({"text_kwargs": {"padding_sde": "left"}}, r"\['padding_sde'\] in text_kwargs"),
    ({"images_kwargs": {"padding_side": "right"}}, r"\['padding_side'\] in images_kwargs"),
    ({"common_kwargs": {"padding": True}}, r"\['padding'\] in common_kwargs, which holds return_tensors"),
    ({"text_kwargs": ["padding"]}, "text_kwargs must be a dict of arguments, got list"),
    ({"padding_side": "middle"}, "padding_side must be 'left' or 'right', got 'middle'"),
    ({"text_kwargs": {"padding_side": 1}}, "padding_side must be 'left' or 'right', got 1"),
])
def test_structured_arguments_are_checked_as_flat_ones(lavit_processor, given, message):
    """atk37 F5/F6: a misspelt argument in `text_kwargs` was passed on silently (the batch stayed right-padded), a
    text argument in `common_kwargs` or `images_kwargs` ended in transformers' internal TypeError, and a bad
    `padding_side` was called a "padding strategy". Each group is checked as the flat arguments are."""
    with pytest.raises(ValueError, match=message):
        lavit_processor(text=["a cat", "a red bus on the street"], **given)
    left = lavit_processor(text=["a cat", "a red bus on the street"], text_kwargs={"padding_side": "left"},
                           common_kwargs={"return_tensors": "pt"})
    assert left["attention_mask"][0, 0] == 0  # the structured argument is read
    plain = lavit_processor(text=["a cat", "a red bus on the street"])
    nothing = lavit_processor(text=["a cat", "a red bus on the street"], text_kwargs=None, images_kwargs=None,
                              videos_kwargs=None, audio_kwargs=None, common_kwargs=None)  # atk38: raw errors
    assert torch.equal(nothing["input_ids"], plain["input_ids"])


def test_apply_chat_template_calls_the_processor_with_what_it_accepts(lavit_processor):
    """`apply_chat_template` passes `videos=None` and `audio=None` and its processor arguments: all accepted."""
    photo = Image.fromarray(real_photos()[0])
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "a cat"}]}]
    chat = lavit_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               processor_kwargs={"padding": True, "pad_to_multiple_of": 8})
    rendered = lavit_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    direct = lavit_processor(images=[photo], text=rendered, pad_to_multiple_of=8)
    assert torch.equal(chat["input_ids"], direct["input_ids"])
    assert torch.equal(chat["pixel_values"], direct["pixel_values"])


def test_clip_statistics_copy_matches_the_image_processor():
    """configuration_lavit.py keeps a copy of the CLIP statistics (Hub folders are flat: no cross-folder import)."""
    from lavit.modeling import configuration_lavit
    from lavit.processing import image_processing_lavit

    assert configuration_lavit.OPENAI_CLIP_MEAN == image_processing_lavit.OPENAI_CLIP_MEAN
    assert configuration_lavit.OPENAI_CLIP_STD == image_processing_lavit.OPENAI_CLIP_STD


def test_span_filling_truncation_and_offset_padding_are_pure_list_functions():
    from lavit.processing.processing_lavit import fill_image_spans, fill_per_token_values, pad_offsets, truncate_row

    start, end = 100, 101  # [IMG], [/IMG]
    ids = [5, start, end, 6, start, end]
    assert fill_image_spans(ids, start, [[102, 103], [104]]) == [5, start, 102, 103, end, 6, start, 104, end]
    offsets = [(0, 1), (1, 6), (6, 12), (12, 13), (13, 18), (18, 24)]
    assert fill_per_token_values(ids, offsets, start, [2, 1]) == [
        (0, 1), (1, 6), (6, 6), (6, 6), (6, 12), (12, 13), (13, 18), (18, 18), (18, 24)]
    assert fill_per_token_values(ids, [0, 1, 1, 0, 1, 1], start, [2, 1]) == [0, 1, 1, 1, 1, 0, 1, 1, 1]
    expanded = [5, start, 102, 103, end, 6]
    assert truncate_row(expanded, 5, start, end) == expanded[:5]  # the whole span fits
    assert truncate_row(expanded, 4, start, end) == [5]  # never [IMG] without its [/IMG]
    assert truncate_row(expanded, 10, start, end) == expanded
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    assert pad_offsets([[(0, 1), (1, 2)], [(0, 3), (3, 4)]], mask) == [
        [(0, 1), (1, 2), (0, 0)], [(0, 0), (0, 3), (3, 4)]]


def test_set_visual_tokenizer_refuses_unknown_selection_arguments(lavit_processor, lavit_model):
    """A misspelt selection argument fails when it is given, not at the next processor call."""
    with pytest.raises(ValueError, match=r"does not take 'max_tokenz' \(did you mean 'max_tokens'\?\)"):
        lavit_processor.set_visual_tokenizer(lavit_model, max_tokenz=3)
    lavit_processor.set_visual_tokenizer(lavit_model, max_tokens=3)
    ids = lavit_processor(text="<image>a cat", images=real_photos()[0])["input_ids"][0].tolist()
    start, end = (ids.index(lavit_processor.tokenizer.convert_tokens_to_ids(token)) for token in ("[IMG]", "[/IMG]"))
    assert end - start - 1 == 3  # the budget reached the visual tokenizer
