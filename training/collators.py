"""Collators: rows from `training.data` -> model batches.

`LaVITDataCollator(packed=True)` packs segments into rows whose position ids restart at every segment (the LM then
attends within segments only). With `max_row_length=None` all segments of the batch form one row and no token is
padding: the layout for kernels that skip the masked blocks (FlexAttention, varlen/flash attention). With a row
length, segments fill rows greedily up to that many tokens and short rows are right-padded: SDPA and eager attention
compute every (query, key) pair of a row, so bounded rows keep their cost at rows x length^2 instead of (batch
tokens)^2. `packed=False` is the padded fallback: one segment per row, right padding and an attention mask. All give
the same loss (the first token of every segment has no target, as the model also enforces).
`ImageCollator` feeds stage 1: decoded (and cropped) images -> `pixel_values`; `DetokenizerCollator` feeds the
detokenizer: the same images for the visual tokenizer and, at the decoder's resolution, for the VAE.
Every batch carries `skipped_records`, the bad records met while building it (from the stored rows, the dataset and
the collator itself), and `used_records`, the records (segments, images) it holds, so both counts reach the trainer
from dataloader workers and from cached datasets alike (it enforces `training.data.MAX_SKIPPED_SHARE` with them).
"""

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from lavit.processing import LaVITImageProcessor
from PIL import Image

from .data import (
    AUGMENTATION_SEED,
    USED_FIELD,
    BadRecordCounter,
    BadRecordError,
    augment_image,
    decode_image,
    record_fields,
    stored_skips,
)


@dataclass
class LaVITDataCollator:
    """
    Args:
        image_processor: a [`LaVITImageProcessor`].
        image_start_token_id: id of `[IMG]` (each one in a segment takes the next image of its row).
        pad_token_id: id written into padding (padded mode).
        packed: packed rows (default) or the padded fallback.
        max_row_length: packed mode: the most tokens per row (before compact images expand), or `None` for one row.
        pad_to_multiple_of: rounds the batch length up.
        crop_scale, horizontal_flip: training images are random crops keeping this range of their area (`None`: whole)
            and mirrored half of the time, drawn from each row's `augmentation_seed` (`training.data.EpochSeeds`, set
            by `LaVITTrainer`: the same with or without dataloader workers; rows without one draw from torch's
            RNG); images with a stored keep mask (pre-tokenized) stay whole, as their stored tokens describe
            them. [`without_augmentation`] is the collator of held-out batches.
    A segment whose image cannot be decoded is dropped and counted in `counter`. Every batch carries
    `skipped_records`: the segments dropped here plus, with `count_stored_skips`, the records its rows dropped while
    they were built (see `training.data.count_stored_skips`).
    """

    image_processor: object
    image_start_token_id: int
    pad_token_id: int = 0
    packed: bool = True
    max_row_length: int | None = None
    pad_to_multiple_of: int | None = None
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)
    count_stored_skips: bool = True
    crop_scale: tuple[float, float] | None = None
    horizontal_flip: bool = False

    def without_augmentation(self) -> "LaVITDataCollator":
        """This collator with whole, unmirrored images (held-out batches); the same skip counter."""
        return replace(self, crop_scale=None, horizontal_flip=False)

    def augmented(self, segments: list[dict]) -> list:
        """The images of `segments` in reading order, each augmented unless it has a stored keep mask."""
        images = [(image, mask) for segment in segments
                  for image, mask in zip(segment["images"], segment["keep_masks"] or [None] * len(segment["images"]),
                                         strict=True)]
        if self.crop_scale is None and not self.horizontal_flip:
            return [image for image, _ in images]
        unseeded = np.random.default_rng(int(torch.randint(2**62, ()))) if any(
            segment["seed"] is None for segment in segments) else None
        per_segment = [np.random.default_rng(segment["seed"]) if segment["seed"] is not None else unseeded
                       for segment in segments]  # one stream per segment, its images drawn in turn
        generators = [generator for generator, segment in zip(per_segment, segments, strict=True)
                      for _ in segment["images"]]
        return [image if mask is not None else augment_image(image, self.crop_scale, self.horizontal_flip, generator)
                for (image, mask), generator in zip(images, generators, strict=True)]

    def segments(self, rows: list[dict]) -> tuple[list[dict], int]:
        """Splits rows into segments, each with its ids, labels, decoded images and stored keep masks; also returns
        the bad records met: those the rows carry (`skipped_records`, dropped while the rows were built) and the
        segments dropped here."""
        segments, skipped = [], 0
        for row in rows:
            skipped += stored_skips(row) if self.count_stored_skips else 0
            if not row["input_ids"]:  # a row that only carries the count of a batch without usable records
                continue
            input_ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
            images, keep_masks = list(row.get("images") or []), row.get("image_keep_mask")
            image_cursor, start, row_seed = 0, 0, row.get(AUGMENTATION_SEED)
            for number, length in enumerate(row.get("segment_lengths") or [len(input_ids)]):
                ids = input_ids[start : start + length]
                num_images = ids.count(self.image_start_token_id)
                segment_images = images[image_cursor : image_cursor + num_images]
                segment_masks = keep_masks[image_cursor : image_cursor + num_images] if keep_masks else []
                segment = {"input_ids": ids, "labels": labels[start : start + length], "keep_masks": segment_masks,
                           "seed": None if row_seed is None else [*row_seed, number]}
                start, image_cursor = start + length, image_cursor + num_images
                if len(segment_images) != num_images:
                    self.counter.skip("image count", f"a segment has {num_images} [IMG] but "
                                                     f"{len(segment_images)} image(s)")
                    skipped += 1
                    continue
                try:
                    segment["images"] = [decode_image(image, name="segment image") for image in segment_images]
                except BadRecordError as error:
                    self.counter.skip("unreadable image", str(error))
                    skipped += 1
                    continue
                segments.append(segment)
        return segments, skipped

    def __call__(self, rows: list[dict]) -> dict:
        segments, skipped = self.segments(rows)
        if not segments:
            # every record of the batch was bad: an empty step (no targets) keeps the run alive
            return {"input_ids": torch.tensor([[self.pad_token_id]]), "labels": torch.tensor([[-100]]),
                    **record_fields(skipped, 0)}
        batch = self.pack(segments) if self.packed else self.pad(segments)
        batch.update(record_fields(skipped, len(segments)))
        images = self.augmented(segments)
        if images:
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            keep_masks = [mask for segment in segments for mask in segment["keep_masks"]]
            if keep_masks and all(mask is not None for mask in keep_masks):
                batch["image_keep_mask"] = torch.tensor(keep_masks, dtype=torch.bool)
        return batch

    @staticmethod
    def _segment_labels(segment: dict) -> list[int]:
        return [-100] + list(segment["labels"][1:])  # the first token of a sequence has no predecessor

    def pack(self, segments: list[dict]) -> dict:
        """Segments (`input_ids`, `labels`) -> packed rows: `input_ids`, `labels` and restarting `position_ids`."""
        rows, row_length = [], 0
        for segment in segments:
            length = len(segment["input_ids"])
            if not rows or (self.max_row_length is not None and row_length + length > self.max_row_length):
                rows.append([])
                row_length = 0
            rows[-1].append(segment)
            row_length += length
        return self._right_padded(rows, with_positions=True)

    def pad(self, segments: list[dict]) -> dict:
        """Segments -> one right-padded row each, with an `attention_mask`."""
        return self._right_padded([[segment] for segment in segments], with_positions=False)

    def _right_padded(self, rows: list[list[dict]], with_positions: bool) -> dict:
        lengths = [sum(len(segment["input_ids"]) for segment in row) for row in rows]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        # padding continues the last segment's positions: causal attention keeps it out of every real token's view
        position_ids = torch.arange(length).repeat(len(rows), 1)
        for index, (row, row_length) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[index, :row_length] = torch.tensor([token for segment in row for token in segment["input_ids"]])
            labels[index, :row_length] = torch.tensor([label for segment in row
                                                       for label in self._segment_labels(segment)])
            attention_mask[index, :row_length] = 1
            start = 0
            for segment in row:
                position_ids[index, start:] -= position_ids[index, start].clone()
                start += len(segment["input_ids"])
        if with_positions:
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def lm_collator(processor, config, packed: bool, max_row_length: int | None = None, crop_scale: float = 1.0,
                horizontal_flip: bool = False) -> LaVITDataCollator:
    """The [`LaVITDataCollator`] of the LM stages (stage 2, fine-tuning) for a model's `config` and its
    [`LaVITProcessor`]: its image processor, `[IMG]` id and padding id (0 when the text tokenizer has none);
    training images cropped to between `crop_scale` and all of their area (1: no crops) and mirrored when
    `horizontal_flip`."""
    return LaVITDataCollator(processor.image_processor, config.image_start_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id or 0, packed=packed,
                             max_row_length=max_row_length, crop_scale=None if crop_scale >= 1 else (crop_scale, 1.0),
                             horizontal_flip=horizontal_flip)


def image_items(items: list) -> tuple[list, int, int]:
    """Items of `training.data.image_dataset` (`{image, skipped_records, used_records}`) -> their images, the bad
    records they stand for and the readable records among them (an image standing in for a bad record is not one)."""
    used = sum(int(item.get(USED_FIELD, 1)) for item in items)
    return [item["image"] for item in items], sum(stored_skips(item) for item in items), used


@dataclass
class ImageCollator:
    """Stage-1 batches: items of `training.data.image_dataset` (decoded, cropped images; bad records already replaced
    and counted) -> `pixel_values`, plus `skipped_records`, the bad records met while reading the batch (the trainer
    takes it out before the model sees the batch)."""

    image_processor: object

    def __call__(self, items: list) -> dict:
        images, skipped, used = image_items(items)
        return {"pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"],
                **record_fields(skipped, used)}


@dataclass
class DetokenizerCollator:
    """Items of `training.data.image_dataset` (decoded, cropped images) -> `tokenizer_pixel_values` (the visual
    tokenizer's preprocessing) and `pixel_values` (the same crop, squashed to the detokenizer's resolution like the
    visual tokenizer's input, in [-1, 1] for the VAE), plus the batch's `skipped_records`."""

    image_processor: LaVITImageProcessor
    image_size: int

    def __call__(self, items: list) -> dict:
        images, skipped, used = image_items(items)
        return {
            "tokenizer_pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"],
            "pixel_values": self.target_pixel_values(images),
            **record_fields(skipped, used),
        }

    def target_pixel_values(self, images: list) -> torch.Tensor:
        """Images -> (B, 3, image_size, image_size) in [-1, 1], the VAE's input."""
        targets = [np.asarray(image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC),
                              dtype=np.float32) for image in images]
        return torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2) / 127.5 - 1
