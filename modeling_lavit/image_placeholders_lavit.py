"""Image placeholders of the LaVIT LM (paper section 3.2): where each image's visual tokens go in the LM sequence.

Pure tensor functions, no model: `find_image_spans` locates the `[IMG] ... [/IMG]` spans of `input_ids`, and
`expand_image_placeholders` turns a padded (or packed) batch plus the images' token counts and code ids into the LM's
sequence (ids, attention mask, targets, positions) and says where each input token and each visual slot went.
`LaVITModel.prepare_multimodal_inputs` runs the visual tokenizer, then these functions, then the embedding lookup.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configuration_lavit import LaVITConfig


@dataclass
class ImageSpans:
    """Closed `[IMG] ... [/IMG]` spans of a batch in reading order (row-major): the order of `pixel_values`."""

    rows: torch.LongTensor  # (K,) batch row of each span
    starts: torch.LongTensor  # (K,) column of its [IMG]
    lengths: torch.LongTensor  # (K,) visual slots already inside (0 = compact placeholder)


@dataclass(kw_only=True)
class ExpandedImagePlaceholders:
    """
    A batch with every image placeholder expanded to its visual slots ([`expand_image_placeholders`]).

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`): the expanded ids; visual slots hold their code ids when
            they were computed, else the id of visual code 0.
        attention_mask (`torch.LongTensor` of shape `(B, L)`), position_ids (`torch.LongTensor` of shape `(B, L)`):
            positions restart at 0 for every sequence (each row, or each packed segment).
        labels (`torch.LongTensor` of shape `(B, L)`): targets aligned with `input_ids` (-100: not predicted).
        image_token_counts (`torch.LongTensor` of shape `(num_images,)`): visual tokens per image.
        packed (`bool`): rows hold several sequences (position ids restart inside a row).
        token_positions (`tuple` of two `torch.LongTensor` of shape `(num_real_tokens,)`): row and column of every
            attended input token in the expanded batch, in row-major input order.
        slot_positions (`tuple` of two `torch.LongTensor` of shape `(T,)`): row and column of every visual slot,
            packed in image order (the order of the tokenizer's packed features); `None` without images.
        slot_images (`torch.LongTensor` of shape `(T,)`): the image (span index) of every visual slot.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_token_counts: torch.LongTensor | None = None
    packed: bool = False
    token_positions: tuple[torch.LongTensor, torch.LongTensor] | None = None
    slot_positions: tuple[torch.LongTensor, torch.LongTensor] | None = None
    slot_images: torch.LongTensor | None = None


@dataclass(kw_only=True)
class LaVITMultimodalInputs(ExpandedImagePlaceholders):
    """
    The LM-ready form of a batch after image placeholders are expanded: [`ExpandedImagePlaceholders`] plus

    Args:
        inputs_embeds (`torch.FloatTensor` of shape `(B, L, H)`): text embeddings with the image features in place.
    """

    inputs_embeds: torch.FloatTensor


def find_image_spans(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: LaVITConfig):
    """Locates and validates the image spans. A row may end with an unclosed `[IMG]` (an image being generated)."""
    # 1. the columns of every attended [IMG] and [/IMG], row by row
    start_id, end_id = config.image_start_token_id, config.image_end_token_id
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    starts_by_row = _columns_by_row(input_ids == start_id, valid)
    ends_by_row = _columns_by_row(input_ids == end_id, valid)
    # 2. pair them in order: each [IMG] with the next [/IMG], visual ids only in between
    rows, columns, lengths = [], [], []
    for row in sorted(set(starts_by_row) | set(ends_by_row)):
        row_starts, row_ends = starts_by_row.get(row, []), ends_by_row.get(row, [])
        if len(row_ends) not in (len(row_starts), len(row_starts) - 1):
            raise ValueError(f"row {row} of input_ids has {len(row_starts)} [IMG] (id {start_id}) but "
                             f"{len(row_ends)} [/IMG] (id {end_id}); every image is [IMG] ... [/IMG]")
        for index, start in enumerate(row_starts):
            end = row_ends[index] if index < len(row_ends) else None
            following = row_starts[index + 1] if index + 1 < len(row_starts) else None
            if end is None:  # an open [IMG] is only allowed as the last one of its row, followed by visual ids only
                after = input_ids[row, start + 1 :][valid[row, start + 1 :]]
                if following is not None or _holds_text(after, config):
                    raise ValueError(f"row {row} of input_ids: [IMG] at position {start} is never closed (an image "
                                     f"being generated ends its row; anything else needs [IMG] ... [/IMG])")
                break
            if end < start or (following is not None and following < end):
                raise ValueError(f"row {row} of input_ids: [IMG] at {start} and [/IMG] at {end} are not paired")
            if _holds_text(input_ids[row, start + 1 : end], config):
                raise ValueError(f"row {row} of input_ids: the image at position {start} holds non-visual ids "
                                 f"between [IMG] and [/IMG] (visual ids are in [{config.visual_token_offset}, "
                                 f"{config.visual_token_end}))")
            rows.append(row)
            columns.append(start)
            lengths.append(end - start - 1)
    device = input_ids.device
    return ImageSpans(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        starts=torch.tensor(columns, dtype=torch.long, device=device),
        lengths=torch.tensor(lengths, dtype=torch.long, device=device),
    )


def _columns_by_row(is_token: torch.Tensor, valid: torch.Tensor) -> dict[int, list[int]]:
    """Row -> ascending columns where `is_token & valid`."""
    by_row: dict[int, list[int]] = {}
    for row, column in (is_token & valid).nonzero().tolist():
        by_row.setdefault(row, []).append(column)
    return by_row


def _holds_text(ids: torch.LongTensor, config: LaVITConfig) -> bool:
    """Whether any of `ids` lies outside the visual ids `[visual_token_offset, visual_token_end)`."""
    return bool(((ids < config.visual_token_offset) | (ids >= config.visual_token_end)).any())


def sequence_positions(valid: torch.Tensor, segment_starts: torch.Tensor) -> torch.LongTensor:
    """Position of every valid token inside its sequence: 0 at each segment start, counting valid tokens only."""
    count = valid.long().cumsum(dim=1)
    offset = torch.cummax(torch.where(segment_starts & valid, count - 1, 0), dim=1).values
    return torch.where(valid, count - 1 - offset, 0)


def restarts_inside_rows(position_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> bool:
    """
    Whether rows hold several packed sequences: a position id that does not exceed the one of the previous attended
    token of its row. Only attended tokens count: padding may carry any positions (transformers gives left pads
    position 1, so the usual `position_ids` of a left-padded row fall back to 0 after its pads without any packing).
    """
    if attention_mask is None:
        return bool((position_ids[:, 1:] <= position_ids[:, :-1]).any())
    valid = attention_mask.bool()
    columns = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last_attended = torch.cummax(torch.where(valid, columns, -1), dim=1).values
    previous = F.pad(last_attended[:, :-1], (1, 0), value=-1)  # the last attended column before each token
    previous_positions = position_ids.gather(1, previous.clamp(min=0))
    return bool((valid & (previous >= 0) & (position_ids <= previous_positions)).any())


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions of a padded batch (either side): 0 at each row's first real token."""
    valid = attention_mask.bool()
    return sequence_positions(valid, valid & (valid.long().cumsum(dim=1) == 1))


def generation_target_images(
    spans: ImageSpans, labels: torch.LongTensor, position_ids: torch.LongTensor
) -> torch.BoolTensor:
    """(K,) whether each image is a generation target: its `[IMG]` is supervised and text comes before it in its
    sequence (position > 0), as in a text-to-image pair."""
    return (labels[spans.rows, spans.starts] != -100) & (position_ids[spans.rows, spans.starts] > 0)


def expand_image_placeholders(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    spans: ImageSpans,
    token_counts: torch.LongTensor | None = None,
    code_ids: torch.LongTensor | None = None,
    *,
    visual_token_offset: int,
    pad_token_id: int = 0,
    labels: torch.LongTensor | None = None,
    position_ids: torch.LongTensor | None = None,
    padding_side: str | None = None,
) -> ExpandedImagePlaceholders:
    """
    Expands the image placeholders of a batch into the LM's sequence (no model involved).

    Every attended input token is copied once, in order; a compact `[IMG] [/IMG]` opens room for its image's
    `token_counts` visual slots right after `[IMG]`, an expanded span keeps its slots. Pads are dropped and the rows
    re-padded on `padding_side` (default: left if the input is left-padded, else right), so a row's tokens stay
    contiguous whatever side it was padded on.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, S)`), attention_mask (`torch.Tensor` of shape `(B, S)`): the batch.
        spans ([`ImageSpans`]): its images, from [`find_image_spans`].
        token_counts (`torch.LongTensor` of shape `(K,)`): visual tokens of each span's image; `None` without images
            (then every span must already be expanded).
        code_ids (`torch.LongTensor` of shape `(sum(token_counts),)`): the images' code ids, packed in span order;
            without them the slots of compact spans hold code 0 (and, with `labels`, expanded spans their own ids).
        visual_token_offset (`int`): LM id of visual code 0. pad_token_id (`int`): id written into padding.
        labels (`torch.LongTensor` of shape `(B, S)`): targets; visual slots of a compact image get its code ids
            unless the label of its `[IMG]` is -100; in an expanded image, each slot whose label is not -100 keeps
            the code id it holds.
        position_ids (`torch.LongTensor` of shape `(B, S)`): restarting inside a row marks packed sequences, which
            keep their segments; visual tokens extend the segment of their image.

    Raises:
        `ValueError`: `token_counts` do not give one count per span, an expanded span holds another number of slots
        than its image keeps, compact spans come without `token_counts`, or `labels` have another shape.
    """
    # 1. spans: every image's token count fits its placeholder
    _check_token_counts(spans, token_counts)
    # 2. new columns: where each attended token goes once compact spans make room for their visual tokens
    destination, new_length = _new_columns(attention_mask, spans, token_counts, padding_side)
    # 3. copy the input tokens (ids, mask, targets, packed segment starts) to their new columns
    expanded, segment_starts = _copy_tokens(
        input_ids, attention_mask, destination, new_length, pad_token_id, labels, position_ids
    )
    if token_counts is not None:
        # 4. visual slots: right after each image's [IMG], filled with its code ids
        code_ids = _fill_visual_slots(expanded, spans, token_counts, code_ids, destination, visual_token_offset,
                                      labels is not None)
        # 5. targets of the visual slots
        if labels is not None:
            _visual_targets(expanded, spans, labels, code_ids, visual_token_offset)
    # 6. positions: restarting at every row, or at every packed segment
    valid = expanded.attention_mask.bool()
    expanded.position_ids = (
        sequence_positions(valid, segment_starts) if expanded.packed else positions_from_mask(expanded.attention_mask)
    )
    return expanded


def _check_token_counts(spans: ImageSpans, token_counts: torch.LongTensor | None):
    """Raises unless there is one count per span and every expanded span holds exactly its image's count."""
    if token_counts is None:
        if bool((spans.lengths == 0).any()):
            raise ValueError(f"input_ids hold {int((spans.lengths == 0).sum())} image placeholder(s) [IMG][/IMG] "
                             f"but no pixel_values were given")
        return
    if token_counts.numel() != spans.lengths.numel():
        raise ValueError(f"token_counts give {token_counts.numel()} image(s) but input_ids hold "
                         f"{spans.lengths.numel()} image placeholder(s)")
    mismatch = (spans.lengths > 0) & (spans.lengths != token_counts)
    if bool(mismatch.any()):
        index = int(mismatch.nonzero()[0])
        raise ValueError(f"image {index} fills {int(spans.lengths[index])} visual slots in input_ids but the "
                         f"tokenizer keeps {int(token_counts[index])} tokens for it; pass its image_keep_mask")


def _new_columns(attention_mask, spans, token_counts, padding_side) -> tuple[torch.LongTensor, int]:
    """(B, S) new column of every attended token, and the new length; a trailing pad must never sit between a prompt
    and the tokens generated after it, hence the re-padding on one side."""
    if padding_side is None:
        padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
    inserted = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    if token_counts is not None:
        inserted[spans.rows, spans.starts] = torch.where(spans.lengths == 0, token_counts, 0)
    span_width = (1 + inserted) * attention_mask.bool()
    new_lengths = span_width.sum(dim=1)
    new_length = max(int(new_lengths.max()), 1)
    shift = (new_length - new_lengths) if padding_side == "left" else torch.zeros_like(new_lengths)
    return span_width.cumsum(dim=1) - span_width + shift[:, None], new_length


def _copy_tokens(input_ids, attention_mask, destination, new_length, pad_token_id, labels, position_ids):
    """The expanded batch holding the copied input tokens (visual slots still empty), and the packed segment starts."""
    batch_size, length = input_ids.shape
    real = attention_mask.bool()
    rows = torch.arange(batch_size, device=input_ids.device)[:, None].expand(-1, length)[real]
    columns = destination[real]
    new_ids = input_ids.new_full((batch_size, new_length), pad_token_id)
    new_ids[rows, columns] = input_ids[real]
    new_mask = attention_mask.new_zeros(batch_size, new_length)
    new_mask[rows, columns] = attention_mask[real]
    segment_starts = torch.zeros(batch_size, new_length, dtype=torch.bool, device=input_ids.device)
    packed = position_ids is not None and restarts_inside_rows(position_ids, attention_mask)
    if packed:
        segment_starts[rows, columns] = position_ids[real] == 0
    new_labels = None
    if labels is not None:
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
        new_labels = labels.new_full((batch_size, new_length), -100)
        new_labels[rows, columns] = labels[real]
    expanded = ExpandedImagePlaceholders(
        input_ids=new_ids, attention_mask=new_mask, labels=new_labels, packed=packed,
        token_positions=(rows, columns),
    )
    return expanded, segment_starts


def _fill_visual_slots(expanded, spans, token_counts, code_ids, destination, visual_token_offset, has_labels):
    """Opens the visual slots (packed in image order, right after each `[IMG]`), writes their ids and records them in
    `expanded`; returns the code ids of the slots (read back from expanded spans when none were given, for targets)."""
    device = token_counts.device
    image_index = torch.repeat_interleave(torch.arange(spans.rows.numel(), device=device), token_counts)
    image_offsets = token_counts.cumsum(0) - token_counts
    within_image = torch.arange(image_index.numel(), device=device) - image_offsets[image_index]
    slot_rows = spans.rows[image_index]
    slot_columns = destination[spans.rows, spans.starts][image_index] + 1 + within_image
    expanded.attention_mask[slot_rows, slot_columns] = 1
    if code_ids is not None:
        expanded.input_ids[slot_rows, slot_columns] = code_ids + visual_token_offset
    elif has_labels:  # expanded spans only; `find_image_spans` checked that they hold visual ids
        code_ids = expanded.input_ids[slot_rows, slot_columns] - visual_token_offset
    else:
        expanded.input_ids[slot_rows, slot_columns] = visual_token_offset
    expanded.image_token_counts = token_counts
    expanded.slot_positions, expanded.slot_images = (slot_rows, slot_columns), image_index
    return code_ids


def compact_image_targets(spans: ImageSpans, labels: torch.LongTensor) -> torch.BoolTensor:
    """(K,) which images get targets added by the expansion: compact spans (`[IMG][/IMG]`) whose `[IMG]` label is
    kept. The one statement of the rule: the Trainer asks it before counting targets (their number is only known
    once the frozen selector ran)."""
    return (spans.lengths == 0) & (labels[spans.rows, spans.starts] != -100)


def _visual_targets(expanded, spans, labels, code_ids, visual_token_offset):
    """Targets of the visual slots: a compact image is supervised where its `[IMG]` is, an expanded one slot by slot."""
    slot_rows, slot_columns = expanded.slot_positions
    compact = (spans.lengths == 0)[expanded.slot_images]
    slot_labels = expanded.labels[slot_rows, slot_columns]
    supervised = torch.where(compact, compact_image_targets(spans, labels)[expanded.slot_images], slot_labels != -100)
    expanded.labels[slot_rows, slot_columns] = torch.where(supervised, code_ids + visual_token_offset, -100)


__all__ = [
    "ExpandedImagePlaceholders",
    "ImageSpans",
    "LaVITMultimodalInputs",
    "compact_image_targets",
    "expand_image_placeholders",
    "find_image_spans",
    "generation_target_images",
    "positions_from_mask",
    "restarts_inside_rows",
    "sequence_positions",
]
