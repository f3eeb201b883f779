"""LaVIT unified model (paper section 3.2): one causal LM reads and writes text and dynamic visual tokens.

Input side: the continuous merger features of each image's kept tokens, projected to the LM width, wrapped in
`[IMG]` ... `[/IMG]`. Target side: the discrete code ids of the same tokens (frozen tokenizer), shifted into the LM
vocabulary, and text ids; one cross-entropy over one shared head.

Placeholder contract. An image in `input_ids` is either
- compact: the pair `[IMG] [/IMG]` (what `LaVITProcessor` writes for `<image>` by default); the model runs the visual
  tokenizer, learns the image's token count n and inserts n tokens between the pair; or
- expanded: `[IMG] v_1 ... v_n [/IMG]` with n visual ids (what `LaVITProcessor` writes, with `image_keep_mask`, after
  `set_visual_tokenizer`; pre-tokenized data, generated images, discrete prompts). Then `input_ids` already is the
  LM's sequence, so Trainer, TRL and the LM see the same length and the same targets.
With `pixel_values`, every closed span takes one image in order and its visual slots get the continuous features (an
expanded span must hold exactly as many slots as the image keeps, and its ids are the image's targets: pre-tokenized
data with `image_keep_mask` skips the frozen target path). Without `pixel_values`, expanded spans are read as
discrete ids through the LM embedding table. Expansion happens once, before the LM runs; the sequence length never
changes inside a cached forward.
"""

import math
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from .configuration_lavit import LaVITConfig
from .convert_original_lavit import (
    assign_tensors,
    check_materialized,
    convert_detokenizer,
    convert_original_lm_visual_state_dict,
    convert_original_tokenizer_state_dict,
    iter_lm_checkpoint,
    load_original_state_dict,
    materialize_unsaved_buffers,
    original_tokenizer_config,
)
from .modeling_lavit_detokenizer import LaVITDetokenizer
from .modeling_lavit_tokenizer import (
    LaVITFeaturesOutput,
    LaVITTokenizationOutput,
    LaVITTokenizerModel,
    build_token_merger,
)
from .transformers_compat import cache_kwargs, output_cache, takes_cache

logger = logging.get_logger(__name__)


@dataclass
class LaVITMultimodalInputs:
    """
    The LM-ready form of a batch after image placeholders are expanded.

    Args:
        inputs_embeds (`torch.FloatTensor` of shape `(B, L, H)`): text embeddings with the image features in place.
        input_ids (`torch.LongTensor` of shape `(B, L)`): the expanded ids; visual slots hold their code ids when
            they were computed, else the id of visual code 0.
        attention_mask (`torch.LongTensor` of shape `(B, L)`), position_ids (`torch.LongTensor` of shape `(B, L)`):
            positions restart at 0 for every sequence (each row, or each packed segment).
        labels (`torch.LongTensor` of shape `(B, L)`): targets aligned with `input_ids` (-100: not predicted).
        image_token_counts (`torch.LongTensor` of shape `(num_images,)`): visual tokens per image.
        packed (`bool`): rows hold several sequences (position ids restart inside a row).
    """

    inputs_embeds: torch.FloatTensor
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor | None = None
    image_token_counts: torch.LongTensor | None = None
    packed: bool = False


@dataclass
class LaVITModelOutputWithPast(BaseModelOutputWithPast):
    """
    [`LaVITModel`] output: the LM output on the expanded sequence, plus what the expansion produced.

    Args:
        labels (`torch.LongTensor` of shape `(B, L)`): expanded targets, aligned with the hidden states.
        image_token_counts (`torch.LongTensor` of shape `(num_images,)`): visual tokens per image.
    """

    labels: torch.LongTensor | None = None
    image_token_counts: torch.LongTensor | None = None


@dataclass
class LaVITCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    [`LaVITForCausalLM`] output: the fields of transformers' `CausalLMOutputWithPast` (`loss`, `logits`, the KV cache
    under the installed release's name, `hidden_states`, `attentions`), plus the per-modality losses and what the
    image expansion produced.

    Args:
        loss (`torch.FloatTensor` of shape `()`): cross-entropy summed over the supervised targets, divided by
            `num_items_in_batch` when given (gradient accumulation), else by the number of targets.
        text_loss (`torch.FloatTensor`), image_loss (`torch.FloatTensor`): mean cross-entropy over text targets and
            over image targets (`[IMG]`, visual ids, `[/IMG]`), detached, for logging; `None` without such targets.
        logits (`torch.FloatTensor` of shape `(B, L, vocab_size)`): prediction scores of the shared head.
        labels (`torch.LongTensor` of shape `(B, L)`): the expanded targets the loss used.
        image_token_counts (`torch.LongTensor` of shape `(num_images,)`): visual tokens per image.
    """

    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    image_token_counts: torch.LongTensor | None = None


@dataclass
class ImageSpans:
    """Closed `[IMG] ... [/IMG]` spans of a batch in reading order (row-major): the order of `pixel_values`."""

    rows: torch.LongTensor  # (K,) batch row of each span
    starts: torch.LongTensor  # (K,) column of its [IMG]
    lengths: torch.LongTensor  # (K,) visual slots already inside (0 = compact placeholder)


def find_image_spans(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: LaVITConfig):
    """Locates and validates the image spans. A row may end with an unclosed `[IMG]` (an image being generated)."""
    start_id, end_id = config.image_start_token_id, config.image_end_token_id
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    starts = ((input_ids == start_id) & valid).nonzero().tolist()
    ends = ((input_ids == end_id) & valid).nonzero().tolist()
    rows, columns, lengths = [], [], []
    ends_by_row: dict[int, list[int]] = {}
    for row, column in ends:
        ends_by_row.setdefault(row, []).append(column)
    starts_by_row: dict[int, list[int]] = {}
    for row, column in starts:
        starts_by_row.setdefault(row, []).append(column)
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
                text_after = bool(((after < config.visual_token_offset) | (after >= config.visual_token_end)).any())
                if following is not None or text_after:
                    raise ValueError(f"row {row} of input_ids: [IMG] at position {start} is never closed (an image "
                                     f"being generated ends its row; anything else needs [IMG] ... [/IMG])")
                break
            if end < start or (following is not None and following < end):
                raise ValueError(f"row {row} of input_ids: [IMG] at {start} and [/IMG] at {end} are not paired")
            inside = input_ids[row, start + 1 : end]
            if bool(((inside < config.visual_token_offset) | (inside >= config.visual_token_end)).any()):
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


def _real_number(name: str, value, allowed: str, inside) -> float:
    """`value` as a float when it is a finite real number (not a bool) for which `inside(value)` holds, else a
    `ValueError` naming the argument, the allowed range and the value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not inside(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_sampling_arguments(guidance_scale, top_k, top_p, temperature, do_sample) -> None:
    """The ranges of the image-sampling arguments (those of transformers' guidance and logits processors)."""
    _real_number("guidance_scale", guidance_scale, "a finite number >= 1 (1 turns guidance off)", lambda v: v >= 1)
    if top_k is not None:
        _real_number("top_k", top_k, "None or an integer >= 0 (0 turns top-k off)", lambda v: v >= 0 and v == int(v))
    if top_p is not None:
        _real_number("top_p", top_p, "None or a number in (0, 1] (1 turns nucleus sampling off)",
                     lambda v: 0 < v <= 1)
    _real_number("temperature", temperature, "a finite number > 0", lambda v: v > 0)
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")


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


class SuppressImageTokensLogitsProcessor(LogitsProcessor):
    """Text mode: `[IMG]`, `[/IMG]` and every visual id get -inf (the official `suppress_tokens=range(32000, V)`)."""

    def __init__(self, text_vocab_size: int, visual_token_end: int):
        self.text_vocab_size = text_vocab_size
        self.visual_token_end = visual_token_end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.text_vocab_size : self.visual_token_end] = -float("inf")
        return scores


class RowSeededSamplingLogitsProcessor(LogitsProcessor):
    """
    Draws each row's next token from its own random stream (see `row_generators`; `rows_per_prompt` rows per prompt,
    as `num_return_sequences` expands them) and leaves only that token at 0, every other score at -inf, so the
    sampler of `generate` picks it. Put it after the warpers.
    """

    def __init__(self, generator: torch.Generator, rows_per_prompt: int = 1):
        self.generator = generator
        self.rows_per_prompt = rows_per_prompt
        self.generators = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = row_generators(self.generator, scores.shape[0], self.rows_per_prompt, scores.device)
        tokens = sample_rows(scores.float().softmax(dim=-1), self.generators)
        chosen = torch.full_like(scores, -float("inf"))
        return chosen.scatter_(1, tokens[:, None], 0.0)


class LaVITPreTrainedModel(PreTrainedModel):
    config_class = LaVITConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaVITAttentionLayer", "LaVITEvaLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class LaVITModel(LaVITPreTrainedModel):
    """
    The frozen visual tokenizer (selector + merger + quantizer make the targets, its decoder serves detokenization),
    the trainable LM-side merger copy and visual projection (`visual_weight.bin` of the official release), and the
    language model without its head.
    """

    def __init__(self, config: LaVITConfig):
        super().__init__(config)
        self.visual_tokenizer = LaVITTokenizerModel._from_config(config.tokenizer_config)
        self.visual_tokenizer.requires_grad_(False)
        self.visual_merger = build_token_merger(config.tokenizer_config)
        self.visual_projection = nn.Linear(config.tokenizer_config.vision_hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual_tokenizer.eval()  # frozen: its selector stays deterministic and its encoder in eval mode
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------------- images

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        return_code_ids: bool = False,
    ) -> tuple[LaVITFeaturesOutput, torch.LongTensor | None]:
        """
        Images -> LM-input embeddings of their kept tokens, packed (T, H), with `token_counts` and `keep_mask`; and,
        with `return_code_ids`, the frozen tokenizer's code ids (T,) of the same tokens (the targets).

        The kept tokens come from `image_keep_mask` (num_images, N) when given, else from the frozen selector with
        `image_selection` (`mode`, `max_tokens`, `keep_ratio`, `generator`; see `LaVITTokenizerModel.select_tokens`).
        """
        tokenizer = self.visual_tokenizer
        if self.training:
            warn_on_frozen_adapters(tokenizer)
        image_features = tokenizer.encode_patches(pixel_values)
        with torch.no_grad():
            keep_log_probs, keep_weights = tokenizer.select(image_features, image_keep_mask, **(image_selection or {}))
            code_ids = None
            if return_code_ids:
                code_ids = tokenizer.quantize(tokenizer.merge(image_features, keep_weights))
        merged = self.visual_merger(image_features.to(self.visual_projection.weight.dtype), keep_weights)
        keep_mask = keep_weights > 0.5
        features = LaVITFeaturesOutput(
            features=self.visual_projection(merged),
            token_counts=keep_mask.sum(dim=1),
            keep_mask=keep_mask,
            keep_probs=keep_log_probs[..., 0].exp(),
        )
        return features, code_ids

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        labels: torch.LongTensor | None = None,
        padding_side: str | None = None,
        image_inputs: str = "features",
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> LaVITMultimodalInputs:
        """
        Expands the image placeholders of `input_ids` (see the module docstring) into an LM-ready batch.

        `image_inputs="features"` feeds continuous merger features (training and understanding); `"codes"` feeds the
        images as discrete code ids through the embedding table (the official multimodal prompts of image generation).
        Rows are re-padded on `padding_side` (default: left if the input is left-padded, else right). Packed rows
        (`position_ids` restarting inside a row) keep their segments; visual tokens extend the segment of their image.
        Targets: visual slots of a compact image get its code ids (offset into the LM vocabulary) unless the label of
        its `[IMG]` is -100; in an expanded image, every slot whose label is not -100 keeps the code id it holds.
        With labels and `config.generated_image_inputs="codes"`, an image that is a generation target (supervised
        `[IMG]`, text before it in its sequence) is fed as its code ids even in `"features"` mode.
        `inputs_embeds` (B, S, H), aligned with `input_ids`, replaces the embedding lookup of the input tokens (soft
        prompts, embeddings from elsewhere); the image features are placed as usual.
        """
        config = self.config
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("input_ids must be a (batch, sequence) tensor of token ids")
        batch_size, length = input_ids.shape
        device = input_ids.device
        if length == 0:
            raise ValueError("input_ids is empty: give at least one token per row")
        self.check_token_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        if padding_side is None:
            padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
        spans = find_image_spans(input_ids, attention_mask, config)
        num_spans = spans.rows.numel()

        visual_embeds = visual_code_ids = token_counts = None
        if pixel_values is not None:
            num_images = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else len(pixel_values)
            if num_images != num_spans:
                raise ValueError(f"input_ids hold {num_spans} image placeholder(s) but {num_images} image(s) were "
                                 f"given in pixel_values; each image needs exactly one placeholder, in order")
            expanded = spans.lengths > 0
            # expanded spans hold their code ids (pre-tokenized data): the frozen target path is skipped for them
            needs_codes = image_inputs == "codes" or (labels is not None and not bool(expanded.all()))
            if image_inputs == "codes":
                tokens = self.visual_tokenizer.tokenize(pixel_values, image_keep_mask, **(image_selection or {}))
                token_counts, visual_code_ids = tokens.token_counts, tokens.code_ids
            elif image_inputs == "features":
                features, visual_code_ids = self.get_image_features(
                    pixel_values, image_keep_mask, image_selection, return_code_ids=needs_codes
                )
                token_counts, visual_embeds = features.token_counts, features.features
            else:
                raise ValueError(f"image_inputs must be 'features' or 'codes', got {image_inputs!r}")
            mismatch = expanded & (spans.lengths != token_counts)
            if bool(mismatch.any()):
                index = int(mismatch.nonzero()[0])
                raise ValueError(f"image {index} fills {int(spans.lengths[index])} visual slots in input_ids but the "
                                 f"tokenizer keeps {int(token_counts[index])} tokens for it; pass its image_keep_mask")
        elif bool((spans.lengths == 0).any()):
            raise ValueError(f"input_ids hold {int((spans.lengths == 0).sum())} image placeholder(s) [IMG][/IMG] "
                             f"but no pixel_values were given")

        # every real input token is copied once and a compact [IMG] additionally opens room for its image's tokens;
        # pads are dropped and the rows re-padded on `padding_side`, so a row's tokens stay contiguous whatever side
        # its input was padded on (a trailing pad must never sit between a prompt and the tokens generated after it)
        real = attention_mask.bool()
        inserted = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        if token_counts is not None:
            inserted[spans.rows, spans.starts] = torch.where(spans.lengths == 0, token_counts, 0)
        span_width = (1 + inserted) * real
        new_lengths = span_width.sum(dim=1)
        new_length = max(int(new_lengths.max()), 1)
        shift = (new_length - new_lengths) if padding_side == "left" else torch.zeros_like(new_lengths)
        destination = span_width.cumsum(dim=1) - span_width + shift[:, None]  # new column of every real token

        rows = torch.arange(batch_size, device=device)[:, None].expand(-1, length)[real]
        columns = destination[real]
        new_ids = input_ids.new_full((batch_size, new_length), self._pad_token_id())
        new_ids[rows, columns] = input_ids[real]
        new_mask = attention_mask.new_zeros(batch_size, new_length)
        new_mask[rows, columns] = attention_mask[real]
        segment_starts = torch.zeros(batch_size, new_length, dtype=torch.bool, device=device)
        packed = position_ids is not None and restarts_inside_rows(position_ids, attention_mask)
        if packed:
            segment_starts[rows, columns] = position_ids[real] == 0
        new_labels = None
        if labels is not None:
            if tuple(labels.shape) != tuple(input_ids.shape):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
            new_labels = labels.new_full((batch_size, new_length), -100)
            new_labels[rows, columns] = labels[real]

        slot_rows = slot_columns = None
        if token_counts is not None:
            # slots of the visual tokens, packed in image order: right after each image's [IMG]
            image_index = torch.repeat_interleave(torch.arange(num_spans, device=device), token_counts)
            image_offsets = token_counts.cumsum(0) - token_counts
            within_image = torch.arange(image_index.numel(), device=device) - image_offsets[image_index]
            slot_rows = spans.rows[image_index]
            start_columns = destination[spans.rows, spans.starts]
            slot_columns = start_columns[image_index] + 1 + within_image
            new_mask[slot_rows, slot_columns] = 1
            if visual_code_ids is not None:
                new_ids[slot_rows, slot_columns] = visual_code_ids + config.visual_token_offset
            elif labels is not None:  # expanded spans only; `find_image_spans` checked that they hold visual ids
                visual_code_ids = new_ids[slot_rows, slot_columns] - config.visual_token_offset
            else:
                new_ids[slot_rows, slot_columns] = config.visual_token_offset
            if new_labels is not None:
                compact = (spans.lengths == 0)[image_index]
                start_label_kept = (labels[spans.rows, spans.starts] != -100)[image_index]
                slot_labels = new_labels[slot_rows, slot_columns]
                supervised = torch.where(compact, start_label_kept, slot_labels != -100)
                new_labels[slot_rows, slot_columns] = torch.where(
                    supervised, visual_code_ids + config.visual_token_offset, -100
                )

        valid = new_mask.bool()
        new_position_ids = sequence_positions(valid, segment_starts) if packed else positions_from_mask(new_mask)
        text_embeds = inputs_embeds
        inputs_embeds = self.get_input_embeddings()(new_ids)
        if text_embeds is not None:
            if tuple(text_embeds.shape[:2]) != (batch_size, length):
                raise ValueError(f"inputs_embeds has shape {tuple(text_embeds.shape)}, expected ({batch_size}, "
                                 f"{length}, hidden) like input_ids")
            inputs_embeds = inputs_embeds.index_put((rows, columns), text_embeds[real].to(inputs_embeds.dtype))
        if visual_embeds is not None:
            if labels is not None and config.generated_image_inputs == "codes":
                # generation feeds sampled code ids back through the embedding table: train the same inputs
                positions = position_ids if position_ids is not None else positions_from_mask(attention_mask)
                generated = (labels[spans.rows, spans.starts] != -100) & (positions[spans.rows, spans.starts] > 0)
                continuous = ~generated[image_index]
                slot_rows, slot_columns = slot_rows[continuous], slot_columns[continuous]
                visual_embeds = visual_embeds[continuous]
            inputs_embeds = inputs_embeds.index_put((slot_rows, slot_columns), visual_embeds.to(inputs_embeds.dtype))
        return LaVITMultimodalInputs(
            inputs_embeds=inputs_embeds,
            input_ids=new_ids,
            attention_mask=new_mask,
            position_ids=new_position_ids,
            labels=new_labels,
            image_token_counts=token_counts,
            packed=packed,
        )

    def check_token_ids(self, input_ids: torch.LongTensor):
        """Ids outside the LM vocabulary would fail deep inside the embedding lookup; name them here instead (and a
        tensor of another shape than (batch, sequence), which would give logits of another shape)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a (batch, sequence) tensor of token ids, got shape "
                             f"{tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")

    def has_image_inputs(self, input_ids: torch.LongTensor | None, pixel_values) -> bool:
        """Whether `input_ids` need the image expansion: images given, or image spans among the ids."""
        return input_ids is not None and (
            pixel_values is not None or bool((input_ids == self.config.image_start_token_id).any())
        )

    @staticmethod
    def _check_input_kinds(input_ids, inputs_embeds, pixel_values, has_images: bool):
        """Text comes as ids or embeddings (both only with images); images need ids, which locate them."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("give input_ids or inputs_embeds")
        if input_ids is None and pixel_values is not None:
            raise ValueError("pixel_values need input_ids: their [IMG] [/IMG] placeholders say where each image goes "
                             "(inputs_embeds cannot); give input_ids together with inputs_embeds")
        if input_ids is not None and inputs_embeds is not None and not has_images:
            raise ValueError("give exactly one of input_ids and inputs_embeds (both only with image placeholders)")

    def _pad_token_id(self) -> int:
        pad_token_id = getattr(self.config.text_config, "pad_token_id", None)
        return 0 if pad_token_id is None else int(pad_token_id)

    @can_return_tuple
    @takes_cache
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> LaVITModelOutputWithPast:
        r"""
        Args as [`LaVITForCausalLM.forward`]. `inputs_embeds` alone replaces `input_ids` for text; with images, give
        both (the ids' `[IMG]` `[/IMG]` placeholders say where each image goes, the embeddings are the text's).
        `return_dict=False` (argument or config) returns a tuple of the non-`None` fields.
        """
        image_token_counts = None
        prefill = cache is None or cache.get_seq_length() == 0
        # decoding steps read new ids as they are; only a prefill (or an image batch) is expanded
        has_images = self.has_image_inputs(input_ids, pixel_values) and (prefill or pixel_values is not None)
        self._check_input_kinds(input_ids, inputs_embeds, pixel_values, has_images)
        if input_ids is not None and prefill and not has_images and input_ids.numel():
            self.check_token_ids(input_ids)  # the image path checks them while expanding
        if has_images:
            prepared = self.prepare_multimodal_inputs(
                input_ids, attention_mask, position_ids, pixel_values, image_keep_mask, image_selection, labels,
                inputs_embeds=inputs_embeds,
            )
            inputs_embeds, input_ids, labels = prepared.inputs_embeds, None, prepared.labels
            position_ids, image_token_counts = prepared.position_ids, prepared.image_token_counts
            # packed rows: no 2-D mask, so the LM builds a block-diagonal mask from the restarting position ids
            attention_mask = None if prepared.packed else prepared.attention_mask
        elif position_ids is None and attention_mask is not None and cache is None:
            position_ids = positions_from_mask(attention_mask)  # left and right padding give the same positions
        if attention_mask is None and position_ids is not None and cache is None and restarts_inside_rows(
            position_ids
        ):
            use_cache = False  # transformers builds the block-diagonal mask of packed rows only without a cache
        if labels is not None and position_ids is not None:
            # the first token of a sequence has no predecessor; in packed rows this also stops a sequence's last
            # token from predicting the next sequence's first one, and in left-padded rows a pad from predicting it
            labels = labels.masked_fill(position_ids.to(labels.device) == 0, -100)
        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **cache_kwargs(cache),
            **kwargs,
        )
        return LaVITModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            labels=labels,
            image_token_counts=image_token_counts,
        )


class LaVITForCausalLM(LaVITPreTrainedModel, GenerationMixin):
    """
    LaVIT: [`LaVITModel`] plus one prediction head over text ids, `[IMG]`, `[/IMG]` and visual ids.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoProcessor
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/lavit", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/lavit", trust_remote_code=True)
    >>> inputs = processor(images=image, text="<image>Question: what is in the picture? Answer:", return_tensors="pt")
    >>> output = model.generate(**inputs, num_beams=5, max_new_tokens=10)
    >>> answer = processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    >>> image_tokens = model.generate_image_tokens(**processor(text="a red bus", return_tensors="pt"))
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the head is sharded over the vocabulary like the embedding it may be tied to (as LLaMA's), then gathered
    _tp_plan = {"lm_head": "colwise_gather_output"}
    output_modalities = ("image", "text")

    def __init__(self, config: LaVITConfig):
        super().__init__(config)
        self.model = LaVITModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.vocab_size, bias=False)
        # the pixel decoder is kept beside the model, not inside it: it is not trained with the LM, lives in its own
        # `detokenizer/` sub-folder and stays out of the LM's state dict, optimizer and device map
        object.__setattr__(self, "_detokenizer", None)
        self.post_init()

    @property
    def detokenizer(self) -> LaVITDetokenizer | None:
        """The pixel decoder ([`LaVITDetokenizer`]) used by `generate_images`, `reconstruct` and the pipelines."""
        return self._detokenizer

    def set_detokenizer(self, detokenizer: LaVITDetokenizer | None):
        if detokenizer is not None and detokenizer.config.codebook_size != self.config.tokenizer_config.codebook_size:
            raise ValueError(f"the detokenizer decodes {detokenizer.config.codebook_size} codes, the model's visual "
                             f"tokenizer has {self.config.tokenizer_config.codebook_size}")
        object.__setattr__(self, "_detokenizer", detokenizer)

    @property
    def can_decode_pixels(self) -> bool:
        return self._detokenizer is not None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        `PreTrainedModel.save_pretrained`, plus what a LaVIT folder needs beyond the model's own code files: the
        `pipelines_lavit.py` of the text-to-image pipeline and the pixel decoder in `detokenizer/` with its code. The
        folder is complete on every save path (lavit installed or not: a folder loaded with `trust_remote_code`,
        `Trainer` checkpoints, a PEFT-merged model), because all of them call this method.
        """
        pipeline_file = _pipeline_source_file(self.name_or_path) if self._auto_class is not None else None
        if self._auto_class is not None:
            # transformers writes only the saved class's Auto entry; every head of the folder must resolve
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_lavit.LaVITModel",
                "AutoModelForCausalLM": "modeling_lavit.LaVITForCausalLM",
                "AutoModelForImageTextToText": "modeling_lavit.LaVITForCausalLM",
                "AutoModelForMultimodalLM": "modeling_lavit.LaVITForCausalLM",
            }
            if pipeline_file is not None:
                # `pipeline("lavit-text-to-image", model=folder, trust_remote_code=True)` without `lavit` installed
                self.config.custom_pipelines = {TEXT_TO_IMAGE_TASK: {
                    "impl": "pipelines_lavit.LaVITTextToImagePipeline", "pt": ["AutoModelForCausalLM"], "tf": [],
                    "type": "multimodal",
                }}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if pipeline_file is not None:
            shutil.copyfile(pipeline_file, Path(save_directory) / pipeline_file.name)
        if self._detokenizer is not None:
            if self._auto_class is not None:
                # loaded from its sub-folder by class, not through an Auto class: without these, a process that runs
                # the remote code would write the detokenizer's weights but not its code files and `auto_map`
                type(self._detokenizer).register_for_auto_class("AutoModel")
                type(self._detokenizer.config).register_for_auto_class()
            self._detokenizer.save_pretrained(Path(save_directory) / DETOKENIZER_FOLDER, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_detokenizer: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the `detokenizer/` sub-folder when the folder has one (and
        diffusers is installed); `load_detokenizer=False` skips it."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if load_detokenizer and isinstance(model, LaVITForCausalLM):
            model.set_detokenizer(_load_detokenizer(pretrained_model_name_or_path, kwargs))
        return model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`, refusing any size that would drop `[IMG]`, `[/IMG]` or a visual
        row (ids below `config.visual_token_end`): a tokenizer that lacks the visual tokens is too short, see
        `LaVITProcessor.add_visual_tokens`."""
        config = self.config
        if new_num_tokens is not None and new_num_tokens < config.visual_token_end:
            codebook_size = config.tokenizer_config.codebook_size
            raise ValueError(
                f"resize_token_embeddings({new_num_tokens}) would drop rows of the image vocabulary: ids "
                f"[{config.text_vocab_size}, {config.visual_token_end}) are [IMG], [/IMG] and the {codebook_size} "
                f"visual codes, so at least {config.visual_token_end} rows are needed. A tokenizer that short lacks "
                f"the visual tokens: call LaVITProcessor.add_visual_tokens(tokenizer, {codebook_size}) first"
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    @property
    def visual_tokenizer(self) -> LaVITTokenizerModel:
        return self.model.visual_tokenizer

    @can_return_tuple
    @takes_cache
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_modalities: str | None = None,
        **kwargs,
    ) -> LaVITCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, S)`): text ids with image placeholders (module docstring).
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): one image per placeholder, in order.
            image_keep_mask (`torch.BoolTensor` of shape `(num_images, N)`): which patches each image keeps
                (pre-tokenized data); the frozen selector decides otherwise.
            image_selection (`dict`, *optional*): selector options (`mode`, `max_tokens`, `keep_ratio`, `generator`).
            labels (`torch.LongTensor` of shape `(B, S)`): targets aligned with `input_ids`, -100 where nothing is
                predicted; image targets are filled in by the model (see `LaVITModel.prepare_multimodal_inputs`).
            loss_modalities (`str`, *optional*): `"both"`, `"text"` or `"image"`; defaults to `config.loss_modalities`.
            num_items_in_batch (`int`, *optional*, in `kwargs`): number of targets in the whole accumulated batch
                (passed by `Trainer`); the loss is then the summed cross-entropy divided by it.
            shift_labels (`torch.LongTensor` of shape `(B, S)`, *optional*, in `kwargs`): targets already shifted
                (position t predicts `shift_labels[:, t]`), as sequence/context-parallel training passes them; they
                win over `labels`. Text only: with image placeholders, whose expansion moves every later target, give
                `labels`.
            return_dict (`bool`, *optional*, in `kwargs`): `False` (or `config.return_dict=False`) returns a tuple.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is not None and self.model.has_image_inputs(input_ids, pixel_values):
            raise ValueError("shift_labels cannot be used with image placeholders: the model inserts each image's "
                             "visual tokens, which moves every target after it; give labels (unshifted) instead")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_keep_mask=image_keep_mask,
            image_selection=image_selection,
            labels=labels,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        loss = text_loss = image_loss = None
        if outputs.labels is not None or shift_labels is not None:
            loss, text_loss, image_loss = self.next_token_loss(
                logits, outputs.labels, num_items_in_batch, loss_modalities or self.config.loss_modalities,
                shift_labels=shift_labels,
            )
        return LaVITCausalLMOutputWithPast(
            loss=loss,
            text_loss=text_loss,
            image_loss=image_loss,
            logits=logits,
            labels=outputs.labels,
            image_token_counts=outputs.image_token_counts,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def next_token_loss(self, logits, labels, num_items_in_batch=None, loss_modalities="both", shift_labels=None):
        """
        One cross-entropy over the shared head for text and image targets. Returns (loss, text_loss, image_loss):
        `loss` sums the supervised targets and divides by `num_items_in_batch` (or their count); the per-modality
        losses are detached means for logging. `shift_labels` (targets already shifted) win over `labels`.
        """
        if shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
        if logits.shape[1] != shift_labels.shape[1]:
            raise ValueError(f"logits cover {logits.shape[1]} positions but labels {shift_labels.shape[1]}; "
                             f"compute the loss with logits_to_keep=0")
        targets = shift_labels
        is_image_target = (targets >= self.config.text_vocab_size) & (targets < self.config.visual_token_end)
        if loss_modalities == "text":
            targets = targets.masked_fill(is_image_target, -100)
        elif loss_modalities == "image":
            targets = targets.masked_fill(~is_image_target, -100)
        elif loss_modalities != "both":
            raise ValueError(f"loss_modalities must be 'both', 'text' or 'image', got {loss_modalities!r}")
        token_losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=-100, reduction="none"
        ).view_as(targets)
        supervised = targets != -100
        if num_items_in_batch is None:
            num_items_in_batch = supervised.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(token_losses.device).clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)  # a step without targets (all records bad) gives 0
        loss = token_losses.sum() / num_items_in_batch
        detached = token_losses.detach()
        per_modality = []
        for selected in (supervised & ~is_image_target, supervised & is_image_target):
            per_modality.append(detached[selected].mean() if bool(selected.any()) else None)
        return loss, per_modality[0], per_modality[1]

    # ----------------------------------------------------------------------------------------------- text generation

    @takes_cache
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        prompt_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **cache_kwargs(cache),
            **kwargs,
        )
        without_cache = cache is None or cache.get_seq_length() == 0
        if prompt_embeds is not None and without_cache:
            # an empty cache (no cache at all, or the first call of an assistant model in assisted decoding): the
            # step reads the whole sequence, i.e. the prompt (with its continuous image features, which no id can
            # express) followed by the ids generated so far (none at the first iteration)
            inputs_embeds = torch.cat([prompt_embeds, self.get_input_embeddings()(input_ids)], dim=1)
            if attention_mask is None:
                attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            model_inputs["inputs_embeds"] = inputs_embeds
            model_inputs["input_ids"] = None
            model_inputs["position_ids"] = positions_from_mask(attention_mask)
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        **kwargs,
    ):
        """
        Text generation (captioning, VQA, chat, few-shot prompts with several images): `GenerationMixin.generate`
        with every `GenerationConfig` option. `[IMG]`, `[/IMG]` and visual ids are suppressed. Images are tokenized
        once, placeholders expanded, rows left-padded, then decoding starts from the embeddings. As for text-only
        models, the returned sequences start with the given `input_ids`. `inputs_embeds` with `input_ids` and images
        replaces the text embeddings of the prompt (see `LaVITModel.prepare_multimodal_inputs`).

        Each row gets what it gets alone, whatever the padding side: rows padded on the right are re-padded on the
        left. For seeded sampling that holds too with `generator=torch.Generator().manual_seed(s)` (multinomial
        sampling, `num_beams=1`): every row then samples from its own stream (see `row_generators`) after the
        temperature, top-k, top-p and min-p warpers, and the scores `output_scores` returns are the drawn tokens'
        one-hot ones. Without `generator`, sampling uses torch's global generator, shared by the whole batch.
        """
        if kwargs.pop("generation_mode", None) == "image":
            # the `any-to-any` pipeline's image mode: sequences ending with `[IMG] v_1 .. v_n [/IMG]`, which
            # `decode_image_tokens` turns into pixels
            tokens = self.generate_image_tokens(
                input_ids, attention_mask, pixel_values, image_keep_mask=image_keep_mask,
                image_selection=image_selection, **kwargs,
            )
            return self._image_sequences(input_ids, tokens)
        logits_processor = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        logits_processor.append(
            SuppressImageTokensLogitsProcessor(self.config.text_vocab_size, self.config.visual_token_end)
        )
        generator = kwargs.pop("generator", None)
        if generator is not None:
            logits_processor.extend(self._row_seeded_sampling(kwargs, generator))
        if not self.model.has_image_inputs(input_ids, pixel_values):
            if pixel_values is not None:  # images without ids to place them: the forward's clear error
                self.model._check_input_kinds(input_ids, kwargs.get("inputs_embeds"), pixel_values, False)
            if input_ids is None or attention_mask is None:
                return super().generate(
                    input_ids=input_ids, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs
                )
            # decoding continues every row at its end: rows padded on the right are moved to the left first
            left_ids, left_mask = left_padded(input_ids, attention_mask, self.model._pad_token_id())
            outputs = super().generate(
                input_ids=left_ids, attention_mask=left_mask, logits_processor=logits_processor, **kwargs
            )
            new_tokens_from = input_ids.shape[1]
        else:
            prepared = self.model.prepare_multimodal_inputs(
                input_ids, attention_mask, None, pixel_values, image_keep_mask, image_selection, padding_side="left",
                inputs_embeds=kwargs.pop("inputs_embeds", None),
            )
            outputs = super().generate(
                inputs_embeds=prepared.inputs_embeds,
                attention_mask=prepared.attention_mask,
                prompt_embeds=prepared.inputs_embeds,
                logits_processor=logits_processor,
                **kwargs,
            )
            new_tokens_from = 0
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt.to(sequences.device), sequences[:, new_tokens_from:]], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs

    def _row_seeded_sampling(self, kwargs: dict, generator: torch.Generator) -> list[LogitsProcessor]:
        """The warpers and per-row sampler that `generate(generator=...)` appends to the logits processors; the
        warpers `generate` would add itself are switched off in `kwargs` (they now run before the sampler)."""
        from transformers.generation import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        config = kwargs.get("generation_config") or self.generation_config

        def setting(name):
            return kwargs[name] if name in kwargs else getattr(config, name, None)

        if not setting("do_sample") or (setting("num_beams") or 1) > 1:
            return []  # greedy and beam search draw nothing
        unsupported = [name for name in ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
                       if setting(name) not in (None, 0.0, 1.0)]
        if unsupported:
            raise ValueError(f"generate(generator=...) samples after temperature, top_k, top_p and min_p; "
                             f"{unsupported} are not supported with it (drop the generator to use them)")
        warpers = []
        if setting("temperature") not in (None, 1.0):
            warpers.append(TemperatureLogitsWarper(setting("temperature")))
        if setting("top_k"):
            warpers.append(TopKLogitsWarper(setting("top_k")))
        if setting("top_p") is not None and setting("top_p") < 1.0:
            warpers.append(TopPLogitsWarper(setting("top_p")))
        if setting("min_p") is not None:
            warpers.append(MinPLogitsWarper(setting("min_p")))
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0, min_p=None)
        rows_per_prompt = setting("num_return_sequences") or 1
        return warpers + [RowSeededSamplingLogitsProcessor(generator, rows_per_prompt)]

    # ----------------------------------------------------------------------------------------------- image generation

    def _image_sequences(self, input_ids: torch.LongTensor, tokens: LaVITTokenizationOutput) -> torch.LongTensor:
        """Prompt ids + `[IMG]` + generated visual ids + `[/IMG]` per generated image, right-padded."""
        config = self.config
        rows = []
        for image_ids in tokens.per_image():
            rows.append(torch.cat([
                image_ids.new_tensor([config.image_start_token_id]), image_ids + config.visual_token_offset,
                image_ids.new_tensor([config.image_end_token_id]),
            ]))
        images = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.model._pad_token_id())
        prompt = input_ids.repeat_interleave(images.shape[0] // input_ids.shape[0], dim=0)
        return torch.cat([prompt.to(images.device), images], dim=1)

    @torch.no_grad()
    def generate_image_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_inputs: str = "codes",
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        do_sample: bool = True,
        top_k: int | None = 50,
        top_p: float | None = 1.0,
        temperature: float = 1.0,
        min_new_tokens: int | None = None,
        max_new_tokens: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: dict | None = None,
        cache_implementation: str = "dynamic",
        compile_decoding: bool = False,
        streamer=None,
        **unused_kwargs,
    ) -> LaVITTokenizationOutput:
        """
        Text-to-image and multimodal-to-image: continues each prompt after `[IMG]` with visual ids only, until
        `[/IMG]`. Returns the code ids of every generated image, packed with `token_counts` like
        [`LaVITTokenizerModel.tokenize`] (rows in prompt order, `num_images_per_prompt` per prompt).

        - `input_ids`: text (and image placeholders with `pixel_values`); an `[IMG]` is appended where a prompt does
          not already end with one. Prompt images enter as discrete ids (`image_inputs="codes"`, the official
          multimodal synthesis) or as continuous features (`"features"`).
        - Classifier-free guidance (`guidance_scale != 1`): the unconditional branch is `negative_input_ids` + `[IMG]`,
          or `[IMG]` alone (official); both branches run as one batch in every forward, and the guided scores are
          `uncond + scale * (cond - uncond)` on log-probabilities.
        - Sampling: `temperature`, `top_k`, `top_p` (official defaults: 1.0, 50, 1.0), or greedy with
          `do_sample=False`. Every row samples with its own random stream, seeded by one draw from `generator` (or
          from torch's global generator) plus the row's index among its prompt's images: a prompt gets the same
          images alone or batched with others, whatever the padding side.
        - `streamer` (e.g. `transformers.TextStreamer`): receives the prompt ids, then the LM ids of every step
          (`[/IMG]` for finished rows), then `end()`, as in `generate`.
        - Lengths: at least `min_new_tokens` visual tokens (default: 20 as the official code, capped by the maximum),
          at most `max_new_tokens` (default and upper bound: the tokenizer's number of patches, the most its decoder
          reads); the image is closed at the limit.
        - Speed: `cache_implementation="static"` preallocates the KV cache for the prompt and every step and keeps the
          attention mask at full length, so every decoding step has the same shapes; with `compile_decoding=True`
          the decoding step is `torch.compile`d (the first call compiles; with the static cache on CUDA it is replayed
          as a CUDA graph). Both give the same tokens as the default.
        """
        from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        check_sampling_arguments(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                                 do_sample=do_sample)
        if unused_kwargs:
            logger.warning_once(f"generate_image_tokens ignores {sorted(unused_kwargs)}")
        config = self.config
        max_tokens_limit = config.tokenizer_config.num_patches
        max_new_tokens = max_tokens_limit if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new_tokens <= max_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {max_tokens_limit}] (the decoder reads at most "
                             f"{max_tokens_limit} tokens), got {max_new_tokens}")
        min_new_tokens = min(20, max_new_tokens) if min_new_tokens is None else min_new_tokens
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        conditional = self._image_generation_prompt(
            input_ids, attention_mask, pixel_values, image_keep_mask, image_selection, image_inputs
        )
        conditional = tuple(t.repeat_interleave(num_images_per_prompt, dim=0) for t in conditional)
        batch_size = conditional[0].shape[0]
        guided = guidance_scale != 1.0
        if guided:
            if negative_input_ids is None:
                negative_input_ids = input_ids.new_full((1, 1), config.image_start_token_id)
            if negative_attention_mask is None:
                negative_attention_mask = torch.ones_like(negative_input_ids)
            unconditional = self._image_generation_prompt(negative_input_ids, negative_attention_mask)
            if unconditional[0].shape[0] == 1:
                unconditional = tuple(t.expand(batch_size, *t.shape[1:]) for t in unconditional)
            elif unconditional[0].shape[0] * num_images_per_prompt == batch_size:
                unconditional = tuple(t.repeat_interleave(num_images_per_prompt, dim=0) for t in unconditional)
            else:
                raise ValueError(f"negative_input_ids has {negative_input_ids.shape[0]} rows; expected 1 or "
                                 f"{input_ids.shape[0]} (one per prompt)")
            inputs_embeds, attention_mask = _concat_left_padded([conditional, unconditional])
        else:
            inputs_embeds, attention_mask = conditional

        warpers = []
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        # [/IMG] and the visual ids are one contiguous block of the vocabulary: only those columns are scored. The
        # head runs as a module (not F.linear on its `.weight`), so an offloaded head is loaded by its accelerate hook
        allowed_columns = slice(config.image_end_token_id, config.visual_token_end)
        language_model = self.model.language_model
        prompt_length = inputs_embeds.shape[1]
        if cache_implementation == "static":
            total_length = prompt_length + max_new_tokens
            cache = StaticCache(config=config.text_config, max_cache_len=total_length)
            attention_mask = F.pad(attention_mask, (0, max_new_tokens), value=0)  # filled in step by step
        else:
            cache = DynamicCache(config=config)
        decode = language_model
        if compile_decoding:
            # with the static cache every step has the same shapes, so on CUDA the step is captured as a CUDA graph
            # (one launch instead of one per kernel: a 7B step at batch 2 is launch-bound, not compute-bound)
            graphs = cache_implementation == "static" and self.device.type == "cuda"
            decode = torch.compile(language_model, dynamic=False, mode="reduce-overhead" if graphs else None)
        position_ids = positions_from_mask(attention_mask[:, :prompt_length])
        hidden_states = language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **cache_kwargs(cache),
        ).last_hidden_state[:, -1]
        device = hidden_states.device
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        generators = row_generators(generator, batch_size, num_images_per_prompt, device) if do_sample else None
        if streamer is not None:
            streamer.put(input_ids.cpu())
        generated = []
        for step in range(max_new_tokens + 1):
            scores = self.lm_head(hidden_states)[:, allowed_columns].float()  # column 0: [/IMG], 1 + k: code k
            if guided:
                conditional_scores, unconditional_scores = scores.log_softmax(dim=-1).chunk(2)
                scores = unconditional_scores + guidance_scale * (conditional_scores - unconditional_scores)
            if step < min_new_tokens:
                scores[:, 0] = -float("inf")
            for warper in warpers:
                scores = warper(None, scores)
            if do_sample:
                next_tokens = sample_rows(scores.softmax(dim=-1), generators)
            else:
                next_tokens = scores.argmax(dim=-1)
            if step == max_new_tokens:
                next_tokens = torch.zeros_like(next_tokens)
            next_tokens = next_tokens.masked_fill(finished, 0)
            generated.append(next_tokens)
            if streamer is not None:
                streamer.put((next_tokens + config.image_end_token_id).cpu())
            finished = finished | (next_tokens == 0)
            if bool(finished.all()) or step == max_new_tokens:
                break
            next_ids = (next_tokens + config.image_end_token_id)[:, None]
            if guided:
                next_ids = next_ids.repeat(2, 1)
            if cache_implementation == "static":
                attention_mask[:, prompt_length + step] = 1
            else:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
            position_ids = position_ids[:, -1:] + 1
            hidden_states = decode(
                input_ids=next_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **cache_kwargs(cache),
            ).last_hidden_state[:, -1]
        if streamer is not None:
            streamer.end()
        generated = torch.stack(generated, dim=1)  # (B, steps): code + 1, then 0 from [/IMG] on
        kept = generated > 0
        return LaVITTokenizationOutput(code_ids=generated[kept] - 1, token_counts=kept.sum(dim=1))

    def _require_detokenizer(self) -> LaVITDetokenizer:
        if self._detokenizer is None:
            raise ValueError("no pixel decoder: load a folder with a `detokenizer/` sub-folder, or call "
                             "model.set_detokenizer(LaVITDetokenizer.from_pretrained(...))")
        if self._detokenizer.device != self.device:
            self._detokenizer.to(self.device)  # it is not a submodule, so `model.to(...)` did not move it
        return self._detokenizer

    @torch.no_grad()
    def decode_image_tokens(
        self,
        token_ids: torch.Tensor,
        token_counts: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        **decode_kwargs,
    ):
        """
        Visual tokens -> PIL images through the detokenizer (`decode_kwargs` go to [`LaVITDetokenizer.decode`]).
        `token_ids` is either packed code ids (T,) with `token_counts` (B,), as `generate_image_tokens` returns, or
        LM sequences (B, L) (as `generate(..., generation_mode="image")` returns): each row's visual ids after its
        last `[IMG]` form one image. One `generator` is split into one stream per image (see `row_generators`,
        with consecutive groups of `num_images_per_prompt` images per prompt), so an image's pixels do not depend on
        the other images decoded with it.
        """
        if token_counts is None:
            if token_ids.ndim != 2:
                raise ValueError(f"without token_counts, token_ids must be LM sequences (batch, length), "
                                 f"got shape {tuple(token_ids.shape)}")
            config = self.config
            is_start = token_ids == config.image_start_token_id
            if not bool(is_start.any(dim=1).all()):
                raise ValueError("every sequence needs an [IMG] token before its visual ids")
            columns = torch.arange(token_ids.shape[1], device=token_ids.device)
            last_start = torch.where(is_start, columns, -1).max(dim=1, keepdim=True).values
            is_visual = (token_ids >= config.visual_token_offset) & (token_ids < config.visual_token_end)
            is_visual &= columns > last_start
            token_counts = is_visual.sum(dim=1)
            token_ids = token_ids[is_visual] - config.visual_token_offset
        if not isinstance(generator, list):
            generator = row_generators(generator, token_counts.numel(), num_images_per_prompt, self.device)
        return self._require_detokenizer().decode(token_ids, token_counts, generator=generator, **decode_kwargs)

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        decoder_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        show_progress: bool = False,
        **generation_kwargs,
    ):
        """
        Text-to-image and image+text-to-image: [`generate_image_tokens`] (LM sampling with its own
        `guidance_scale`, official 4.0 for text and 5.0 for multimodal prompts; every argument of it is accepted),
        then [`LaVITDetokenizer.decode`] with `decoder_guidance_scale` (default: the detokenizer's, official 7.0).
        One `generator` seeds both, so a seed fixes the images. Returns `num_images_per_prompt` images per prompt.
        """
        tokens = self.generate_image_tokens(
            input_ids, attention_mask, pixel_values, generator=generator, **generation_kwargs
        )
        return self.decode_image_tokens(
            tokens.code_ids, tokens.token_counts, generator=generator,
            num_images_per_prompt=generation_kwargs.get("num_images_per_prompt", 1), height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=decoder_guidance_scale, output_type=output_type,
            show_progress=show_progress,
        )

    @torch.no_grad()
    def reconstruct(self, pixel_values: torch.FloatTensor, image_selection: dict | None = None, **decode_kwargs):
        """
        Image -> visual tokens -> image: what the discrete tokens keep. `pixel_values` as the processor returns them;
        `image_selection` (e.g. `{"max_tokens": 64}`) goes to the visual tokenizer, `decode_kwargs` to
        [`LaVITDetokenizer.decode`].
        """
        tokens = self.visual_tokenizer.tokenize(pixel_values.to(self.device), **(image_selection or {}))
        return self._require_detokenizer().decode(tokens.code_ids, tokens.token_counts, **decode_kwargs)

    def _image_generation_prompt(
        self, input_ids, attention_mask, pixel_values=None, image_keep_mask=None, image_selection=None,
        image_inputs="codes",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings ending with `[IMG]` and their attention mask."""
        config = self.config
        attention_mask = attention_mask.clone()
        if input_ids.numel() == 0 or not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("every prompt needs at least one token (an empty prompt gives nothing to condition on)")
        # a prompt that already ends with [IMG]: that token is dropped here and appended again below for every row
        last_column = attention_mask.shape[1] - 1 - attention_mask.flip(1).bool().long().argmax(dim=1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        ends_open = input_ids[rows, last_column] == config.image_start_token_id
        attention_mask[rows[ends_open], last_column[ends_open]] = 0
        prepared = self.model.prepare_multimodal_inputs(
            input_ids, attention_mask, None, pixel_values, image_keep_mask, image_selection,
            padding_side="left", image_inputs=image_inputs,
        )
        start = self.get_input_embeddings()(input_ids.new_full((input_ids.shape[0], 1), config.image_start_token_id))
        inputs_embeds = torch.cat([prepared.inputs_embeds, start], dim=1)
        attention_mask = F.pad(prepared.attention_mask, (0, 1), value=1)
        return inputs_embeds, attention_mask

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_components(
        cls,
        visual_tokenizer: LaVITTokenizerModel,
        language_model: PreTrainedModel,
        text_vocab_size: int | None = None,
        **config_kwargs,
    ) -> "LaVITForCausalLM":
        """
        Stage-2 starting point: a trained visual tokenizer plus a text causal LM (e.g. LLaMA-2-7B). The LM vocabulary
        is extended by `[IMG]`, `[/IMG]` and one row per code; new rows start at the mean of the text rows plus
        small noise. The LM-side merger starts as a copy of the tokenizer's merger; the visual projection is new.
        """
        text_config = language_model.config.get_text_config()
        text_vocab_size = text_config.vocab_size if text_vocab_size is None else text_vocab_size
        new_text_config = text_config.__class__(**{
            **text_config.to_dict(), "vocab_size": text_vocab_size + 2 + visual_tokenizer.config.codebook_size
        })
        config = LaVITConfig(
            text_config=new_text_config, tokenizer_config=visual_tokenizer.config, text_vocab_size=text_vocab_size,
            **config_kwargs,
        )
        model = cls(config).to(dtype=language_model.dtype)
        model.model.visual_tokenizer.load_state_dict(visual_tokenizer.state_dict())
        model.model.visual_merger.load_state_dict(visual_tokenizer.merger.state_dict())
        decoder = language_model.get_decoder()
        input_embeddings = language_model.get_input_embeddings().weight
        embedding_key = next(name for name, param in decoder.named_parameters() if param is input_embeddings)
        lm_state = decoder.state_dict()
        old_embeddings = lm_state.pop(embedding_key)
        missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
        if unexpected or [key for key in missing if key != embedding_key]:
            raise ValueError(f"language model does not fit its config: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            std = text_config.initializer_range
            _extend_rows(model.get_input_embeddings().weight, old_embeddings[:text_vocab_size], std)
            if not config.tie_word_embeddings:
                old_head = language_model.get_output_embeddings().weight
                _extend_rows(model.lm_head.weight, old_head[:text_vocab_size], std)
        return model

    @classmethod
    def from_original(
        cls,
        model_path: str | os.PathLike,
        *,
        pixel_decoder: str | None = "highres",
        dtype: torch.dtype | None = None,
        vision_num_heads: int = 16,
        merger_num_heads: int = 16,
        decoder_num_heads: int = 16,
    ) -> "LaVITForCausalLM":
        """
        Builds the model from an official LaVIT release folder (`rain1011/LaVIT-7B-v1` / `-v2` layout):
        `language_model/` (HF LLaMA with the 48386-row vocabulary, plus `visual_weight.bin`: LM-side merger and
        `vit_proj`) and `visual_tokenizer/` (`eva_vitg_psz14.bin`, `tokenizer_encoder.bin`, and the feature decoder
        `highres_tokenizer_decoder.bin` or `tokenizer_decoder.bin` picked by `pixel_decoder`, or none with `None`).
        `.bin` files load with `torch.load(weights_only=True)`; a `.safetensors` file of the same name wins. Every
        official tensor is either mapped or known to be unused; the merger keeps the official attention arithmetic.
        Where the release has the matching diffusers folder (`highres_pixel_decoding/` or `pixel_decoding/`) and
        diffusers is installed, the pixel decoder becomes `model.detokenizer` (see [`convert_detokenizer`]).
        """
        model_path = Path(model_path)
        tokenizer_folder = model_path / "visual_tokenizer"
        tokenizer_state = {f"encoder.{key}": value
                           for key, value in load_original_state_dict(tokenizer_folder / "eva_vitg_psz14.bin").items()}
        tokenizer_state.update(load_original_state_dict(tokenizer_folder / "tokenizer_encoder.bin"))
        decoder_state = None
        if pixel_decoder is not None:
            if pixel_decoder not in ("highres", "lowres"):
                raise ValueError(f"pixel_decoder must be 'highres', 'lowres' or None, got {pixel_decoder!r}")
            name = "highres_tokenizer_decoder.bin" if pixel_decoder == "highres" else "tokenizer_decoder.bin"
            decoder_state = load_original_state_dict(tokenizer_folder / name)
        tokenizer_config = original_tokenizer_config(
            tokenizer_state, decoder_state, vision_num_heads=vision_num_heads, merger_num_heads=merger_num_heads,
            decoder_num_heads=decoder_num_heads,
        )
        text_config = AutoConfig.from_pretrained(model_path / "language_model")
        config = LaVITConfig(
            text_config=text_config, tokenizer_config=tokenizer_config,
            text_vocab_size=text_config.vocab_size - 2 - tokenizer_config.codebook_size,
            tie_word_embeddings=text_config.tie_word_embeddings,
        )
        # built on the meta device and filled file by file (LM shard by shard, memory-mapped): peak memory stays
        # near the size of the weights, and a bf16 release is never held in float32
        with torch.device("meta"):
            model = cls(config)
        for shard in iter_lm_checkpoint(model_path / "language_model"):
            if dtype is None:  # the release's own dtype
                dtype = next(value.dtype for value in shard.values() if value.is_floating_point())
            assign_tensors(model, shard, dtype)
        tokenizer = convert_original_tokenizer_state_dict(tokenizer_state, decoder_state)
        assign_tensors(model.model.visual_tokenizer, tokenizer, dtype)
        del tokenizer_state, decoder_state, tokenizer
        lm_visual_state = convert_original_lm_visual_state_dict(
            load_original_state_dict(model_path / "language_model" / "visual_weight.bin")
        )
        expected = {key for key in model.model.state_dict() if key.startswith(("visual_merger.", "visual_projection."))}
        if set(lm_visual_state) != expected:
            raise ValueError(f"visual_weight.bin does not fit: missing {sorted(expected - set(lm_visual_state))}, "
                             f"unexpected {sorted(set(lm_visual_state) - expected)}")
        assign_tensors(model.model, lm_visual_state, dtype)
        _fill_derived_tokenizer_tensors(model.model.visual_tokenizer, dtype)
        materialize_unsaved_buffers(model)
        if config.tie_word_embeddings:
            model.tie_weights()
        check_materialized(model)
        diffusers_folder = model_path / ("highres_pixel_decoding" if pixel_decoder == "highres" else "pixel_decoding")
        if pixel_decoder is not None and diffusers_folder.is_dir():
            detokenizer = convert_detokenizer(
                model_path, conditioning=pixel_decoder, decoder_num_heads=decoder_num_heads,
                pooling_num_heads=decoder_num_heads, dtype=dtype,
            )
            model.set_detokenizer(detokenizer)
        return model.eval()


DETOKENIZER_FOLDER = "detokenizer"
TEXT_TO_IMAGE_TASK = "lavit-text-to-image"
PIPELINE_FILE = "pipelines_lavit.py"


def _pipeline_source_file(source_folder: str | os.PathLike | None = None) -> Path | None:
    """
    `pipelines_lavit.py`: beside this file in a model folder, in the `processing` package of an install, or in the
    folder (local or Hub) the model was loaded from: remote code runs from transformers' module cache, which holds only
    the files the model's code imports, and the pipeline is not one of them.
    """
    from transformers.utils import cached_file

    here = Path(__file__).resolve().parent
    for candidate in (here / PIPELINE_FILE, here.parent / "processing" / PIPELINE_FILE):
        if candidate.is_file():
            return candidate
    if source_folder:
        found = cached_file(str(source_folder), PIPELINE_FILE, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        if found is not None:
            return Path(found)
    logger.warning(f"{PIPELINE_FILE} not found: the saved folder will not run the {TEXT_TO_IMAGE_TASK} pipeline")
    return None


def _load_detokenizer(pretrained_model_name_or_path, kwargs) -> LaVITDetokenizer | None:
    """The `detokenizer/` sub-folder of a local or Hub model folder, or None where there is none."""
    from transformers.utils import cached_file

    hub_kwargs = {name: kwargs[name] for name in ("cache_dir", "force_download", "local_files_only", "token",
                                                  "revision") if name in kwargs}
    config_file = cached_file(
        pretrained_model_name_or_path, "config.json", subfolder=DETOKENIZER_FOLDER,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False, **hub_kwargs,
    )
    if config_file is None:
        return None
    try:
        return LaVITDetokenizer.from_pretrained(
            pretrained_model_name_or_path, subfolder=DETOKENIZER_FOLDER, dtype=kwargs.get("dtype"), **hub_kwargs
        ).eval()
    except ImportError as error:
        logger.warning(f"the folder has a pixel decoder (detokenizer/) but it is not loaded: {error}")
        return None


def _fill_derived_tokenizer_tensors(visual_tokenizer: LaVITTokenizerModel, dtype: torch.dtype):
    """After a conversion on the meta device: the quantizer's EMA state starts from the official codebook, and a
    feature decoder that no official file filled is initialised at random (with a warning)."""
    quantizer = visual_tokenizer.quantizer
    quantizer.ema_code_sum = quantizer.codebook.clone()
    quantizer.ema_cluster_size = torch.ones(quantizer.codebook_size, dtype=quantizer.codebook.dtype)
    quantizer.initialized = torch.tensor(True)
    if any(parameter.is_meta for parameter in visual_tokenizer.decoder.parameters()):
        logger.warning("no feature decoder in the release folder: the feature decoder is randomly initialised")
        decoder = type(visual_tokenizer.decoder)(visual_tokenizer.config)
        decoder.apply(visual_tokenizer._init_weights)
        visual_tokenizer.decoder = decoder.to(dtype)


def _extend_rows(weight: torch.Tensor, old_rows: torch.Tensor, std: float):
    """Copies the text rows and starts every new row at their mean plus N(0, std) noise."""
    text_rows = old_rows.shape[0]
    weight[:text_rows] = old_rows.to(weight.dtype)
    new_rows = torch.randn_like(weight[text_rows:], dtype=torch.float32) * std + old_rows.float().mean(dim=0)
    weight[text_rows:] = new_rows.to(weight.dtype)


def warn_on_frozen_adapters(visual_tokenizer: nn.Module):
    """Warns (once) when PEFT adapters sit in the frozen visual tokenizer: there they never train, since its selector
    and quantizer run without gradients, and they change the targets it computes (e.g. `target_modules=["q_proj",
    "v_proj"]` also matches its merger); `lavit.training.lora.lora_config` targets the language model only."""
    adapted = sorted({name.split(".lora_")[0] for name, _ in visual_tokenizer.named_parameters() if ".lora_" in name})
    if adapted:
        logger.warning_once(f"{len(adapted)} LoRA adapter(s) sit in the frozen visual tokenizer (e.g. {adapted[0]}): "
                            f"they never train and change its targets; target the language model only (e.g. "
                            f"r'.*language_model.*\\.(q_proj|v_proj)', or lavit.training.lora.lora_config)")


def left_padded(input_ids: torch.LongTensor, attention_mask: torch.Tensor, pad_token_id: int):
    """The same rows padded on the left: each row's real tokens (mask 1), in order, end at the last column."""
    real = attention_mask.bool()
    counts = real.sum(dim=1, keepdim=True)
    columns = real.long().cumsum(dim=1) - 1 + (input_ids.shape[1] - counts)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    new_ids = torch.full_like(input_ids, pad_token_id)
    new_ids[rows[real], columns[real]] = input_ids[real]
    new_mask = torch.zeros_like(attention_mask)
    new_mask[rows[real], columns[real]] = attention_mask[real]
    return new_ids, new_mask


def row_generators(
    generator: torch.Generator | None, batch_size: int, rows_per_prompt: int, device: torch.device
) -> list[torch.Generator]:
    """
    One random stream per row: seeded by one draw from `generator` (torch's global generator when None) plus the
    row's index among its prompt's rows. A row's samples then depend on the seed and on its own prompt only, never on
    the other prompts of the batch (one shared stream would hand each row the draws left by the rows before it).
    """
    seed_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device))
    return [torch.Generator(device=device).manual_seed(seed + row % rows_per_prompt) for row in range(batch_size)]


def sample_rows(probs: torch.FloatTensor, generators: list[torch.Generator]) -> torch.LongTensor:
    """One multinomial draw per row of `probs` (B, V), each from its own generator."""
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators, strict=True)])


def _concat_left_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks left-padded (embeddings, mask) batches along the batch axis, padding all to the longest."""
    length = max(embeds.shape[1] for embeds, _ in parts)
    all_embeds, all_masks = [], []
    for embeds, mask in parts:
        missing = length - embeds.shape[1]
        all_embeds.append(F.pad(embeds, (0, 0, missing, 0)))
        all_masks.append(F.pad(mask, (missing, 0)))
    return torch.cat(all_embeds), torch.cat(all_masks)


__all__ = ["LaVITCausalLMOutputWithPast", "LaVITForCausalLM", "LaVITModel", "LaVITPreTrainedModel"]
