"""Collators: rows from `training.data` -> model batches.

`LaVITDataCollator(packed=True)` packs segments into rows whose position ids restart at every segment (the LM then
attends within segments only). With `max_row_length=None` all segments of the batch form one row and no token is
padding: the layout for kernels that skip the masked blocks (FlexAttention, varlen/flash attention). With a row
length, segments fill rows greedily up to that many tokens and short rows are right-padded: SDPA and eager attention
compute every (query, key) pair of a row, so bounded rows keep their cost at rows x length^2 instead of (batch
tokens)^2. `packed=False` is the padded fallback: one segment per row, right padding and an attention mask. All give
the same loss (the first token of every segment has no target, as the model also enforces).
`ImageCollator` feeds stage 1: decoded images, optional random crops, `pixel_values`.
"""

from dataclasses import dataclass, field

import torch

from .data import BadRecordCounter, BadRecordError, decode_image


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
    A segment whose image cannot be decoded is dropped and counted in `counter`.
    """

    image_processor: object
    image_start_token_id: int
    pad_token_id: int = 0
    packed: bool = True
    max_row_length: int | None = None
    pad_to_multiple_of: int | None = None
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)

    def segments(self, rows: list[dict]) -> list[dict]:
        """Splits rows into segments, each with its ids, labels, decoded images and stored keep masks."""
        segments = []
        for row in rows:
            input_ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
            images, keep_masks = list(row.get("images") or []), row.get("image_keep_mask")
            image_cursor, start = 0, 0
            for length in row.get("segment_lengths") or [len(input_ids)]:
                ids = input_ids[start : start + length]
                num_images = ids.count(self.image_start_token_id)
                segment_images = images[image_cursor : image_cursor + num_images]
                segment_masks = keep_masks[image_cursor : image_cursor + num_images] if keep_masks else []
                segment = {"input_ids": ids, "labels": labels[start : start + length], "keep_masks": segment_masks}
                start, image_cursor = start + length, image_cursor + num_images
                if len(segment_images) != num_images:
                    self.counter.skip("image count", f"a segment has {num_images} [IMG] but "
                                                     f"{len(segment_images)} image(s)")
                    continue
                try:
                    segment["images"] = [decode_image(image, name="segment image") for image in segment_images]
                except BadRecordError as error:
                    self.counter.skip("unreadable image", str(error))
                    continue
                segments.append(segment)
        return segments

    def __call__(self, rows: list[dict]) -> dict:
        segments = self.segments(rows)
        if not segments:
            # every record of the batch was bad: an empty step (no targets) keeps the run alive
            return {"input_ids": torch.tensor([[self.pad_token_id]]), "labels": torch.tensor([[-100]])}
        batch = self.pack(segments) if self.packed else self.pad(segments)
        images = [image for segment in segments for image in segment["images"]]
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


def random_crop(image, crop_scale: tuple[float, float]):
    """A crop covering a uniform fraction in `crop_scale` of the image area, from torch's RNG (which the Trainer
    seeds and checkpoints, so resumed runs draw the same crops)."""
    low, high = crop_scale
    area_fraction = low + (high - low) * float(torch.rand(()))
    side = area_fraction**0.5
    width, height = max(1, round(image.width * side)), max(1, round(image.height * side))
    left = int(torch.randint(0, image.width - width + 1, ()))
    top = int(torch.randint(0, image.height - height + 1, ()))
    return image.crop((left, top, left + width, top + height))


@dataclass
class ImageCollator:
    """Stage-1 batches: decoded images (bad ones already replaced by the dataset) -> `pixel_values`, with random
    crops covering `crop_scale` of the image area (drawn from torch's RNG, which the Trainer seeds and checkpoints)."""

    image_processor: object
    crop_scale: tuple[float, float] | None = (0.5, 1.0)

    def __call__(self, images: list) -> dict:
        if self.crop_scale is not None:
            images = [random_crop(image, self.crop_scale) for image in images]
        return {"pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"]}


def expand_compact_images(batch: dict, code_ids: list[list[int]], keep_mask: torch.Tensor, config,
                          pad_token_id: int = 0) -> dict:
    """
    A training batch (`input_ids`, `labels`, and `attention_mask` or packed `position_ids`) with every compact
    `[IMG] [/IMG]` pair filled with its image's visual ids (`code_ids`, one list per image of the batch in reading
    order, as the frozen tokenizer gives them; expanded spans keep theirs), the same targets the model would add
    (the slots of a compact image are supervised when its `[IMG]` label is), `image_keep_mask`, and rows right-padded
    again. The Trainer then counts every target the model supervises.
    """
    offset = config.visual_token_offset
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    rows, image = [], 0
    for row, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True)):
        real = mask[row].tolist() if mask is not None else [1] * len(ids)
        starts = (positions[row] == 0).tolist() if positions is not None else [False] * len(ids)
        new = {"input_ids": [], "labels": [], "starts": []}
        for column, (token, label) in enumerate(zip(ids, labels, strict=True)):
            if not real[column]:
                continue
            new["input_ids"].append(token)
            new["labels"].append(label)
            new["starts"].append(starts[column])
            if token != config.image_start_token_id:
                continue
            if column + 1 < len(ids) and ids[column + 1] == config.image_end_token_id:  # compact: fill it
                new["input_ids"] += [offset + code for code in code_ids[image]]
                new["labels"] += [offset + code if label != -100 else -100 for code in code_ids[image]]
                new["starts"] += [False] * len(code_ids[image])
            image += 1
        rows.append(new)
    length = max(len(new["input_ids"]) for new in rows)
    expanded = {"input_ids": torch.full((len(rows), length), pad_token_id), "labels": torch.full((len(rows), length),
                                                                                                -100)}
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, new in enumerate(rows):
        size = len(new["input_ids"])
        expanded["input_ids"][row, :size] = torch.tensor(new["input_ids"])
        expanded["labels"][row, :size] = torch.tensor(new["labels"])
        attention_mask[row, :size] = 1
    if positions is not None:  # packed rows: positions restart where a segment starts; padding continues the last
        position_ids = torch.arange(length).repeat(len(rows), 1)
        for row, new in enumerate(rows):
            for column in [index for index, start in enumerate(new["starts"]) if start]:
                position_ids[row, column:] -= position_ids[row, column].clone()
        expanded["position_ids"] = position_ids
    else:
        expanded["attention_mask"] = attention_mask
    device = batch["input_ids"].device
    return {**batch, **{name: value.to(device) for name, value in expanded.items()}, "image_keep_mask": keep_mask}
