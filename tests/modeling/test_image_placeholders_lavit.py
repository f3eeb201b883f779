"""The pure placeholder functions (image_placeholders_lavit.py) on hand-built tiny tensors, without a model."""

import pytest
import torch
from conftest import tiny_lavit_config
from lavit.modeling.image_placeholders_lavit import (
    expand_image_placeholders,
    find_image_spans,
    generation_target_images,
)

CONFIG = tiny_lavit_config(10)
START, END, VISUAL = CONFIG.image_start_token_id, CONFIG.image_end_token_id, CONFIG.visual_token_offset
PAD = 0


def as_tensor(value):
    return None if value is None else torch.tensor(value)


def expand(ids, mask=None, token_counts=None, code_ids=None, labels=None, position_ids=None, **kwargs):
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    spans = find_image_spans(ids, mask, CONFIG)
    return expand_image_placeholders(
        ids, mask, spans, as_tensor(token_counts), as_tensor(code_ids), visual_token_offset=VISUAL, pad_token_id=PAD,
        labels=as_tensor(labels), position_ids=as_tensor(position_ids), **kwargs,
    )


def test_right_padded_batch_opens_slots_after_each_compact_image():
    expanded = expand([[3, START, END, 4], [5, 6, PAD, PAD]], [[1, 1, 1, 1], [1, 1, 0, 0]],
                      token_counts=[2], code_ids=[7, 8])
    assert expanded.input_ids.tolist() == [[3, START, VISUAL + 7, VISUAL + 8, END, 4], [5, 6, PAD, PAD, PAD, PAD]]
    assert expanded.attention_mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert expanded.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 0, 0, 0, 0]]
    assert [t.tolist() for t in expanded.token_positions] == [[0, 0, 0, 0, 1, 1], [0, 1, 4, 5, 0, 1]]
    assert [t.tolist() for t in expanded.slot_positions] == [[0, 0], [2, 3]]
    assert expanded.slot_images.tolist() == [0, 0] and expanded.image_token_counts.tolist() == [2]
    assert expanded.labels is None and not expanded.packed


def test_left_padded_batch_stays_left_padded():
    expanded = expand([[PAD, 3, START, END], [5, 6, 7, 8]], [[0, 1, 1, 1], [1, 1, 1, 1]],
                      token_counts=[3], code_ids=[1, 2, 3])
    assert expanded.input_ids.tolist() == [[3, START, VISUAL + 1, VISUAL + 2, VISUAL + 3, END],
                                           [PAD, PAD, 5, 6, 7, 8]]
    assert expanded.attention_mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert expanded.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    # the side can be forced: the same batch re-padded on the right
    right = expand([[PAD, 3, START, END], [5, 6, 7, 8]], [[0, 1, 1, 1], [1, 1, 1, 1]], token_counts=[3],
                   code_ids=[1, 2, 3], padding_side="right")
    assert right.input_ids[1].tolist() == [5, 6, 7, 8, PAD, PAD]


def test_text_only_rows_are_copied_unchanged():
    ids, mask = [[PAD, 4, 5], [6, 7, 8]], [[0, 1, 1], [1, 1, 1]]
    expanded = expand(ids, mask, labels=[[-100, 4, 5], [6, 7, 8]])
    assert expanded.input_ids.tolist() == ids and expanded.attention_mask.tolist() == mask
    assert expanded.labels.tolist() == [[-100, 4, 5], [6, 7, 8]]
    assert expanded.position_ids.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert expanded.slot_positions is None and expanded.image_token_counts is None


def test_targets_follow_the_label_of_each_images_start():
    labels = [[START, END, -100, END]]  # the second image is a prompt only: its [IMG] is not supervised
    expanded = expand([[START, END, START, END]], token_counts=[1, 2], code_ids=[4, 5, 6], labels=labels)
    assert expanded.input_ids.tolist() == [[START, VISUAL + 4, END, START, VISUAL + 5, VISUAL + 6, END]]
    assert expanded.labels.tolist() == [[START, VISUAL + 4, END, -100, -100, -100, END]]
    assert expanded.slot_images.tolist() == [0, 1, 1]


def test_expanded_span_keeps_its_ids_and_its_slot_labels():
    ids = [[3, START, VISUAL + 5, VISUAL + 6, END]]
    labels = [[3, START, -100, VISUAL, END]]  # any visual id supervises a slot; -100 leaves it out
    expanded = expand(ids, token_counts=[2], labels=labels)
    assert expanded.input_ids.tolist() == ids
    assert expanded.labels.tolist() == [[3, START, -100, VISUAL + 6, END]]
    # no code ids and no labels (features fed by the model): the slots read as visual code 0
    assert expand(ids, token_counts=[2]).input_ids.tolist() == [[3, START, VISUAL, VISUAL, END]]
    # without images, expanded spans are plain discrete ids
    assert expand(ids).input_ids.tolist() == ids


def test_packed_row_keeps_its_segments():
    expanded = expand([[3, 4, START, END, 5]], position_ids=[[0, 1, 0, 1, 2]], token_counts=[2], code_ids=[0, 1])
    assert expanded.packed
    assert expanded.input_ids.tolist() == [[3, 4, START, VISUAL, VISUAL + 1, END, 5]]
    assert expanded.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 4]]  # the image extends the second segment
    unpacked = expand([[3, 4, START, END, 5]], position_ids=[[0, 1, 2, 3, 4]], token_counts=[2], code_ids=[0, 1])
    assert not unpacked.packed and unpacked.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6]]


def test_counts_that_do_not_fit_the_placeholders_are_refused():
    with pytest.raises(ValueError, match="image 0 fills 2 visual slots in input_ids but the tokenizer keeps 3"):
        expand([[START, VISUAL, VISUAL, END]], token_counts=[3])
    with pytest.raises(ValueError, match=r"token_counts give 2 image\(s\) but input_ids hold 1"):
        expand([[START, END]], token_counts=[1, 1], code_ids=[0, 0])
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) \[IMG\]\[/IMG\] but no pixel_values"):
        expand([[3, START, END]])
    with pytest.raises(ValueError, match=r"labels have shape \(1, 2\), input_ids \(1, 3\)"):
        expand([[3, START, END]], token_counts=[1], code_ids=[0], labels=[[3, START]])


def test_find_image_spans_reads_compact_expanded_and_open_images():
    ids = torch.tensor([[START, END, 3, START, VISUAL, VISUAL + 1, END], [4, START, VISUAL + 2, PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
    spans = find_image_spans(ids, mask, CONFIG)
    # the open [IMG] ending row 1 (an image being generated) is not a span
    assert (spans.rows.tolist(), spans.starts.tolist(), spans.lengths.tolist()) == ([0, 0], [0, 3], [0, 2])
    with pytest.raises(ValueError, match="holds non-visual ids"):
        find_image_spans(torch.tensor([[START, 3, END]]), None, CONFIG)
    with pytest.raises(ValueError, match="is never closed"):
        find_image_spans(torch.tensor([[START, 3]]), None, CONFIG)


def test_generation_targets_are_supervised_images_after_text():
    ids = torch.tensor([[START, END, 3, START, END]])
    spans = find_image_spans(ids, None, CONFIG)
    positions = torch.arange(5)[None]
    assert generation_target_images(spans, ids.clone(), positions).tolist() == [False, True]
    prompt_only = torch.tensor([[START, END, 3, -100, END]])
    assert generation_target_images(spans, prompt_only, positions).tolist() == [False, False]
