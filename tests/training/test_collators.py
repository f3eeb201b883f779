"""`lavit.training.collators`: packed rows (greedy up to a row length, positions restarting per segment), the padded
fallback, labels without a target for each segment's first token, the bad records every batch counts, seeded
augmentation, and the image batches of stage 1 and of the detokenizer."""

import numpy as np
import pytest
import torch
from conftest import real_photos, text_vocab_size, tiny_lavit_config
from lavit.training.collators import (
    DetokenizerCollator,
    ImageCollator,
    LaVITDataCollator,
    image_items,
    lm_collator,
)
from lavit.training.data import AUGMENTATION_SEED

IMG = 99  # an `[IMG]` id no text row below uses
PAD = 7


@pytest.fixture(scope="module")
def photos():
    return [photo[::8, ::8] for photo in real_photos()[:2]]  # small copies: the processor resizes anyway


@pytest.fixture(scope="module")
def image_processor():
    from lavit import LaVITImageProcessor

    return LaVITImageProcessor(size={"height": 28, "width": 28})


def text_collator(**settings):
    return LaVITDataCollator(None, IMG, pad_token_id=PAD, **settings)


def row(*segments, **fields):
    return {"input_ids": [token for segment in segments for token in segment],
            "segment_lengths": [len(segment) for segment in segments], **fields}


def test_packing_fills_rows_greedily_and_restarts_positions_at_every_segment():
    batch = text_collator(max_row_length=5)([row([1, 2, 3], [4, 5]), row([6, 7, 8, 9])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert "attention_mask" not in batch
    assert (int(batch["skipped_records"]), int(batch["used_records"])) == (0, 3)


def test_without_a_row_length_every_segment_shares_one_unpadded_row():
    batch = text_collator()([row([1, 2, 3], [4, 5]), row([6, 7])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_the_padded_fallback_gives_one_row_per_segment_rounded_up_with_an_attention_mask():
    batch = text_collator(packed=False, pad_to_multiple_of=4)([row([1, 2, 3], [4, 5, 6, 7, 8])])
    assert batch["input_ids"].tolist() == [[1, 2, 3] + [PAD] * 5, [4, 5, 6, 7, 8, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3] + [-100] * 5, [-100, 5, 6, 7, 8, -100, -100, -100]]


def test_a_rows_own_labels_are_kept_past_each_segments_first_token():
    batch = text_collator()([row([1, 2, 3, 4], labels=[1, -100, 3, 4])])
    assert batch["labels"].tolist() == [[-100, -100, 3, 4]]


def test_a_batch_without_a_usable_record_is_an_empty_step_that_counts_them():
    batch = text_collator()([{"input_ids": [], "skipped_records": 2}, row([IMG, 5])])  # [IMG] without its image
    assert batch["input_ids"].tolist() == [[PAD]] and batch["labels"].tolist() == [[-100]]
    assert (int(batch["skipped_records"]), int(batch["used_records"])) == (3, 0)


def test_a_segment_whose_images_do_not_match_its_img_tokens_is_dropped_and_counted():
    collator = text_collator()
    batch = collator([row([IMG, 5], [6, 7], images=[])])
    assert batch["input_ids"].tolist() == [[6, 7]]
    assert collator.counter.counts["image count"] == 1
    assert (int(batch["skipped_records"]), int(batch["used_records"])) == (1, 1)


def test_stored_skips_are_left_out_when_counted_elsewhere():
    batch = text_collator(count_stored_skips=False)([row([1, 2], skipped_records=4)])
    assert int(batch["skipped_records"]) == 0


def test_an_unreadable_image_drops_its_segment_with_the_reason(image_processor, photos):
    collator = LaVITDataCollator(image_processor, IMG)
    batch = collator([row([IMG, 5], [IMG, 6], images=[b"not an image", photos[0]])])
    assert batch["input_ids"].tolist() == [[IMG, 6]] and batch["pixel_values"].shape == (1, 3, 28, 28)
    assert collator.counter.counts["unreadable image"] == 1


def test_seeded_augmentation_repeats_per_seed_and_differs_between_seeds(image_processor, photos):
    collator = LaVITDataCollator(image_processor, IMG, crop_scale=(0.2, 0.3), horizontal_flip=True)

    def pixels(seed):
        return collator([row([IMG, 5], images=[photos[0]], **{AUGMENTATION_SEED: [0, 0, seed]})])["pixel_values"]

    assert torch.equal(pixels(1), pixels(1))
    assert not torch.equal(pixels(1), pixels(2))
    whole = collator.without_augmentation()
    assert whole.counter is collator.counter and (whole.crop_scale, whole.horizontal_flip) == (None, False)
    assert not torch.equal(pixels(1), whole([row([IMG, 5], images=[photos[0]])])["pixel_values"])


def test_images_with_a_stored_keep_mask_stay_whole_and_carry_their_mask(image_processor, photos):
    augmenting = LaVITDataCollator(image_processor, IMG, crop_scale=(0.2, 0.3), horizontal_flip=True)
    stored = row([IMG, 5], images=[photos[1]], image_keep_mask=[[True, False, True, True]],
                 **{AUGMENTATION_SEED: [0, 0, 1]})
    batch = augmenting([stored])
    plain = LaVITDataCollator(image_processor, IMG)([row([IMG, 5], images=[photos[1]])])
    assert torch.equal(batch["pixel_values"], plain["pixel_values"])
    assert batch["image_keep_mask"].tolist() == [[True, False, True, True]]


def test_lm_collator_takes_the_models_ids_and_turns_crop_scale_into_a_range(lavit_processor):
    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    collator = lm_collator(lavit_processor, config, packed=True, max_row_length=32, crop_scale=0.5)
    assert collator.image_start_token_id == config.image_start_token_id
    assert collator.pad_token_id == lavit_processor.tokenizer.pad_token_id
    assert (collator.crop_scale, collator.max_row_length) == ((0.5, 1.0), 32)
    assert lm_collator(lavit_processor, config, packed=False).crop_scale is None  # 1: whole images


def test_image_items_give_the_images_and_the_sum_of_their_skips(photos):
    items = [{"image": photos[0], "skipped_records": 2}, {"image": photos[1]}]
    images, skipped, used = image_items(items)
    assert images[0] is photos[0] and images[1] is photos[1] and (skipped, used) == (2, 2)


def test_an_image_standing_in_for_a_bad_record_is_not_a_used_record(photos):
    """Map-style image data replaces a bad record by the next readable image: that item counts the bad record and
    no used one, so 9 bad records of 10 are 9 skipped of 10 (the stand-ins counted as used let it through)."""
    items = [{"image": photos[0], "skipped_records": 1, "used_records": 0}, {"image": photos[1], "used_records": 1}]
    assert image_items(items)[1:] == (1, 1)


def test_image_collator_gives_pixel_values_and_record_counts(image_processor, photos):
    batch = ImageCollator(image_processor)([{"image": photo, "skipped_records": 1} for photo in photos])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert (int(batch["skipped_records"]), int(batch["used_records"])) == (2, 2)


def test_detokenizer_collator_gives_the_vae_targets_at_its_size_in_minus_one_to_one(image_processor, photos):
    from PIL import Image

    images = [Image.fromarray(photo) for photo in photos]
    batch = DetokenizerCollator(image_processor, image_size=16)([{"image": image} for image in images])
    assert batch["tokenizer_pixel_values"].shape == (2, 3, 28, 28)
    targets = batch["pixel_values"]
    assert targets.shape == (2, 3, 16, 16) and targets.min() >= -1 and targets.max() <= 1
    expected = np.asarray(images[0].resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32)[0, 0] / 127.5 - 1
    assert torch.allclose(targets[0, :, 0, 0], torch.from_numpy(expected))
