"""LaVIT unified model (paper section 3.2): one causal LM reads and writes text and dynamic visual tokens.

Input side: the continuous merger features of each image's kept tokens, projected to the LM width, wrapped in
`[IMG]` ... `[/IMG]`. Target side: the discrete code ids of the same tokens (frozen visual tokenizer), shifted into the
LM vocabulary, and text ids; one cross-entropy over one shared head.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessorList
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.utils import can_return_tuple, logging

from .configuration_lavit import LaVITConfig, LaVITImageSelection
from .generation_lavit import (
    LaVITImageGenerationMixin,
    PromptRepetitionPenaltyLogitsProcessor,
    SuppressImageTokensLogitsProcessor,
    generation_setting,
    left_padded,
    override_generation_settings,
    row_seeded_sampling_processors,
)
from .image_placeholders_lavit import (
    ImageSpans,
    LaVITMultimodalInputs,
    expand_image_placeholders,
    find_image_spans,
    generation_target_images,
    positions_from_mask,
    restarts_inside_rows,
)
from .kernels_lavit import speed_defaults
from .modeling_lavit_tokenizer import LaVITTokenizerModel, build_token_merger, kept_token_fields
from .saving_lavit import SaveBesideSourcesMixin
from .transformers_compat import cache_kwargs, output_cache, takes_cache
from .validation_lavit import check_generation_budget, refuse_typos

logger = logging.get_logger(__name__)


@dataclass
class LaVITImageFeaturesOutput(BaseModelOutputWithPooling):
    """
    Output of [`LaVITModel.get_image_features`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(num_images, N, D)`): the frozen encoder's patch features.
        pooler_output (`tuple(torch.FloatTensor)`): one `(n_i, H)` tensor per image, the LM-input embeddings of its
            kept tokens (`n_i = token_counts[i]`, content-dependent).
        hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states`): the frozen encoder's.
        features (`torch.FloatTensor` of shape `(T, H)`): `pooler_output` packed, `T = token_counts.sum()`.
        code_ids (`torch.LongTensor` of shape `(T,)`, with `return_code_ids`): the frozen visual tokenizer's codes.
        token_counts, keep_mask, keep_probs: as in [`LaVITFeaturesOutput`].
    """

    features: torch.FloatTensor | None = None
    code_ids: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    keep_probs: torch.FloatTensor | None = None


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


class LaVITPreTrainedModel(SaveBesideSourcesMixin, PreTrainedModel):
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

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: LaVITImageSelection | dict | None = None,
        return_code_ids: bool = False,
        output_hidden_states: bool | None = None,
        image_patch_features: torch.Tensor | None = None,
        **kwargs,
    ) -> LaVITImageFeaturesOutput:
        """
        Images (num_images, 3, H, W) -> the LM-input embeddings of their kept tokens, as transformers' vision-language
        models return them: `pooler_output` one (n_i, H) tensor per image (n_i varies with the content), the same
        packed in `features` (T, H) with `token_counts`, `keep_mask` and `keep_probs`; `last_hidden_state` the frozen
        encoder's patch features (num_images, N, D) and, with `output_hidden_states` (argument or config), its
        `hidden_states`; with `return_code_ids`, the frozen visual tokenizer's code ids (T,) of the same tokens (the
        targets).

        The kept tokens come from `image_keep_mask` (num_images, N) when given, else from the frozen selector with
        `image_selection`: a [`LaVITImageSelection`] or a dict of its fields (see `LaVITTokenizerModel.select_tokens`).
        `image_patch_features` (num_images, N, D): the frozen encoder's output for `pixel_values` when the caller
        already has it (the Trainer's count of image targets), so the encoder runs once per image and step.
        `return_dict=False` (argument or config) returns a tuple of the non-`None` fields.
        """
        # 1. the frozen visual tokenizer's stages: patch features, kept tokens and (targets) their code ids
        visual_tokenizer = self.visual_tokenizer
        if self.training:
            warn_on_frozen_adapters(visual_tokenizer)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        encoder_outputs = visual_tokenizer.encode_image(pixel_values, output_hidden_states=output_hidden_states) \
            if image_patch_features is None else BaseModelOutput(last_hidden_state=image_patch_features)
        image_features = encoder_outputs.last_hidden_state
        with torch.no_grad():
            keep_log_probs, keep_weights = visual_tokenizer.select(image_features, image_keep_mask, image_selection)
            code_ids = None
            if return_code_ids:
                code_ids = visual_tokenizer.quantize(visual_tokenizer.merge(image_features, keep_weights))
        # 2. the trainable LM-side merger and projection make the LM inputs
        merged = self.visual_merger(image_features.to(self.visual_projection.weight.dtype), keep_weights)
        features = self.visual_projection(merged)
        kept = kept_token_fields(keep_log_probs, keep_weights)
        return LaVITImageFeaturesOutput(
            last_hidden_state=image_features, pooler_output=torch.split(features, kept["token_counts"].tolist()),
            hidden_states=encoder_outputs.hidden_states, features=features, code_ids=code_ids, **kept,
        )

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: LaVITImageSelection | dict | None = None,
        labels: torch.LongTensor | None = None,
        padding_side: str | None = None,
        image_inputs: str = "features",
        inputs_embeds: torch.FloatTensor | None = None,
        image_patch_features: torch.Tensor | None = None,
    ) -> LaVITMultimodalInputs:
        """
        Expands the image placeholders of `input_ids` (see the module docstring) into an LM-ready batch: the images'
        tokens from the visual tokenizer, then [`expand_image_placeholders`], then the embedding lookup.

        `image_inputs="features"` feeds continuous merger features (training and understanding); `"codes"` feeds the
        images as discrete code ids through the embedding table (the official multimodal prompts of image generation).
        Rows are re-padded on `padding_side` (default: left if the input is left-padded, else right). Packed rows
        (`position_ids` restarting inside a row) keep their segments; visual tokens extend the segment of their image.
        Targets: visual slots of a compact image get its code ids (offset into the LM vocabulary) unless the label of
        its `[IMG]` is -100; in an expanded image, every slot whose label is not -100 keeps the code id it holds.
        With labels and `config.generated_image_inputs="codes"`, an image that is a generation target (supervised
        `[IMG]`, text before it in its sequence) is fed as its code ids even in `"features"` mode.
        `inputs_embeds` (B, S, H), aligned with `input_ids`, replaces the embedding lookup of the input tokens (soft
        prompts, embeddings from elsewhere); the image features are placed as usual. `image_patch_features`: see
        [`get_image_features`].
        """
        # 1. check the ids and locate the images
        attention_mask = self._checked_attention_mask(input_ids, attention_mask)
        spans = find_image_spans(input_ids, attention_mask, self.config)
        # 2. the images' tokens: counts, code ids (targets or discrete inputs) and continuous features
        token_counts = code_ids = visual_embeds = None
        if pixel_values is not None:
            token_counts, code_ids, visual_embeds = self._image_tokens(
                pixel_values, spans, image_keep_mask, image_selection, image_inputs, needs_targets=labels is not None,
                image_patch_features=image_patch_features,
            )
        # 3. the expanded sequence: ids, mask, targets, positions (a pure tensor function)
        expanded = expand_image_placeholders(
            input_ids, attention_mask, spans, token_counts, code_ids,
            visual_token_offset=self.config.visual_token_offset, pad_token_id=self.pad_token_id, labels=labels,
            position_ids=position_ids, padding_side=padding_side,
        )
        # 4. embeddings: the expanded ids (or the given text embeddings), with the image features in their slots
        feature_slots = None
        if visual_embeds is not None:
            feature_slots = self._feature_slots(expanded, spans, labels, position_ids, attention_mask)
        embeds = self._embed_expanded(expanded, input_ids.shape, attention_mask, inputs_embeds, visual_embeds,
                                      feature_slots)
        return LaVITMultimodalInputs(inputs_embeds=embeds, **vars(expanded))

    def _checked_attention_mask(self, input_ids, attention_mask) -> torch.Tensor:
        """The attention mask (all ones when `None`) after checking `input_ids` and its shape."""
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("input_ids must be a (batch, sequence) tensor of token ids")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token per row")
        self.check_token_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        return attention_mask

    def _image_tokens(self, pixel_values, spans: ImageSpans, image_keep_mask, image_selection, image_inputs: str,
                      needs_targets: bool, image_patch_features=None):
        """(token_counts, code_ids, features) of the images: code ids where they are fed or are targets of compact
        spans (expanded spans hold theirs: pre-tokenized data skips the frozen target path), features in
        `"features"` mode."""
        num_images = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else len(pixel_values)
        if num_images != spans.rows.numel():
            raise ValueError(f"input_ids hold {spans.rows.numel()} image placeholder(s) (counted where attention_mask "
                             f"is 1) but {num_images} image(s) were given in pixel_values; each image needs exactly "
                             f"one placeholder, in order, not masked out")
        if image_inputs == "codes":
            tokens = self.visual_tokenizer.tokenize(pixel_values, image_keep_mask, image_selection)
            return tokens.token_counts, tokens.code_ids, None
        if image_inputs == "features":
            needs_codes = needs_targets and not bool((spans.lengths > 0).all())
            features = self.get_image_features(
                pixel_values, image_keep_mask, image_selection, return_code_ids=needs_codes, return_dict=True,
                image_patch_features=image_patch_features,
            )
            return features.token_counts, features.code_ids, features.features
        raise ValueError(f"image_inputs must be 'features' or 'codes', got {image_inputs!r}")

    def _feature_slots(self, expanded, spans, labels, position_ids, attention_mask) -> torch.BoolTensor | None:
        """(T,) which visual slots take continuous features; `None`: all. With labels and
        `config.generated_image_inputs="codes"`, generation targets keep their code embeddings: generation feeds
        sampled code ids back through the embedding table, so training feeds the same inputs."""
        if labels is None or self.config.generated_image_inputs != "codes":
            return None
        positions = position_ids if position_ids is not None else positions_from_mask(attention_mask)
        return ~generation_target_images(spans, labels, positions)[expanded.slot_images]

    def _embed_expanded(self, expanded, input_shape, attention_mask, text_embeds, visual_embeds, feature_slots):
        """(B, L, H) embeddings of the expanded ids; given text embeddings replace those of the input tokens, and
        the image features fill their visual slots (those `feature_slots` selects)."""
        inputs_embeds = self.get_input_embeddings()(expanded.input_ids)
        if text_embeds is not None:
            if tuple(text_embeds.shape[:2]) != tuple(input_shape):
                raise ValueError(f"inputs_embeds has shape {tuple(text_embeds.shape)}, expected ({input_shape[0]}, "
                                 f"{input_shape[1]}, hidden) like input_ids")
            real_embeds = text_embeds[attention_mask.bool()].to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.index_put(expanded.token_positions, real_embeds)
        if visual_embeds is not None:
            slot_rows, slot_columns = expanded.slot_positions
            if feature_slots is not None:
                slot_rows, slot_columns = slot_rows[feature_slots], slot_columns[feature_slots]
                visual_embeds = visual_embeds[feature_slots]
            inputs_embeds = inputs_embeds.index_put((slot_rows, slot_columns), visual_embeds.to(inputs_embeds.dtype))
        return inputs_embeds

    def check_token_ids(self, input_ids: torch.LongTensor):
        """Ids outside the LM vocabulary would fail deep inside the embedding lookup; name them here instead (and a
        tensor of another shape than (batch, sequence), which would give logits of another shape)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a (batch, sequence) tensor of token ids, got shape "
                             f"{tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")

    def placeholder_ids_from_embeddings(self, inputs_embeds: torch.FloatTensor) -> torch.LongTensor:
        """
        (B, S) ids for `inputs_embeds` given without `input_ids`: `[IMG]` and `[/IMG]` where a row equals their
        embedding (as LLaVA finds its image tokens), the pad id elsewhere (those positions keep the given embeddings).
        Compact placeholders only: an expanded span's visual ids cannot be read back from embeddings, give input_ids.
        """
        table = self.get_input_embeddings().weight
        ids = torch.full(inputs_embeds.shape[:2], self.pad_token_id, dtype=torch.long, device=inputs_embeds.device)
        for token_id in (self.config.image_start_token_id, self.config.image_end_token_id):
            is_token = (inputs_embeds == table[token_id].to(inputs_embeds)).all(dim=-1)
            ids = ids.masked_fill(is_token, token_id)
        return ids

    def has_image_inputs(self, input_ids: torch.LongTensor | None, pixel_values) -> bool:
        """Whether `input_ids` need the image expansion: images given, or image spans among the ids."""
        return input_ids is not None and (
            pixel_values is not None or bool((input_ids == self.config.image_start_token_id).any())
        )

    @property
    def pad_token_id(self) -> int:
        """The id written into padding: the text config's `pad_token_id`, else 0."""
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
        image_selection: LaVITImageSelection | dict | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        image_patch_features: torch.Tensor | None = None,
        **kwargs,
    ) -> LaVITModelOutputWithPast:
        r"""
        Args as [`LaVITForCausalLM.forward`]. `inputs_embeds` alone replaces `input_ids` for text; with images, give
        both (the ids' `[IMG]` `[/IMG]` placeholders say where each image goes, the embeddings are the text's).
        `return_dict=False` (argument or config) returns a tuple of the non-`None` fields.
        """
        refuse_typos(self.forward, kwargs)  # the language model would drop a mistyped `pixel_value` in silence
        # 1. expand the image placeholders and embed (prefill with images), or take the text as it is
        lm_inputs, labels, image_token_counts = self._language_model_inputs(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, pixel_values, image_keep_mask,
            image_selection, labels, image_patch_features,
        )
        if lm_inputs["attention_mask"] is None and lm_inputs["position_ids"] is not None and cache is None and (
            restarts_inside_rows(lm_inputs["position_ids"])
        ):
            use_cache = False  # transformers builds the block-diagonal mask of packed rows only without a cache
        if labels is not None and lm_inputs["position_ids"] is not None:
            # the first token of a sequence has no predecessor; in packed rows this also stops a sequence's last
            # token from predicting the next sequence's first one, and in left-padded rows a pad from predicting it
            labels = labels.masked_fill(lm_inputs["position_ids"].to(labels.device) == 0, -100)
        # 2. the language model
        outputs = self.language_model(
            **lm_inputs, use_cache=use_cache, return_dict=True, **cache_kwargs(cache), **kwargs
        )
        return LaVITModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            labels=labels,
            image_token_counts=image_token_counts,
        )

    def _language_model_inputs(
        self, input_ids, attention_mask, position_ids, cache, inputs_embeds, pixel_values, image_keep_mask,
        image_selection, labels, image_patch_features=None,
    ) -> tuple[dict, torch.LongTensor | None, torch.LongTensor | None]:
        """The language model's `input_ids` / `inputs_embeds` / `attention_mask` / `position_ids`, the (expanded)
        labels and the images' token counts."""
        prefill = cache is None or cache.get_seq_length() == 0
        if input_ids is None and inputs_embeds is not None and pixel_values is not None:
            input_ids = self.placeholder_ids_from_embeddings(inputs_embeds)
        # decoding steps read new ids as they are; only a prefill (or an image batch) is expanded
        has_images = self.has_image_inputs(input_ids, pixel_values) and (prefill or pixel_values is not None)
        check_input_kinds(input_ids, inputs_embeds, pixel_values, has_images)
        if not has_images:
            if input_ids is not None and prefill and input_ids.numel():
                self.check_token_ids(input_ids)  # the image path checks them while expanding
            if position_ids is None and attention_mask is not None and cache is None:
                position_ids = positions_from_mask(attention_mask)  # left and right padding give the same positions
            lm_inputs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids)
            return lm_inputs, labels, None
        prepared = self.prepare_multimodal_inputs(
            input_ids, attention_mask, position_ids, pixel_values, image_keep_mask, image_selection, labels,
            inputs_embeds=inputs_embeds, image_patch_features=image_patch_features,
        )
        # packed rows: no 2-D mask, so the LM builds a block-diagonal mask from the restarting position ids
        lm_inputs = dict(input_ids=None, inputs_embeds=prepared.inputs_embeds, position_ids=prepared.position_ids,
                         attention_mask=None if prepared.packed else prepared.attention_mask)
        return lm_inputs, prepared.labels, prepared.image_token_counts


def check_input_kinds(input_ids, inputs_embeds, pixel_values, has_images: bool):
    """Text comes as ids or embeddings (both only with images); images need ids, which locate them."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("give input_ids or inputs_embeds")
    if input_ids is None and pixel_values is not None:
        raise ValueError("pixel_values need input_ids or inputs_embeds: their [IMG] [/IMG] placeholders say where "
                         "each image goes")
    if input_ids is not None and inputs_embeds is not None and not has_images:
        raise ValueError("give exactly one of input_ids and inputs_embeds (both only with image placeholders)")


class LaVITForCausalLM(LaVITImageGenerationMixin, LaVITPreTrainedModel, GenerationMixin):
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

    _auto_class = "AutoModelForCausalLM"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the head is sharded over the vocabulary like the embedding it may be tied to (as LLaMA's), then gathered
    _tp_plan = {"lm_head": "colwise_gather_output"}
    output_modalities = ("image", "text")

    def __init__(self, config: LaVITConfig):
        super().__init__(config)
        self.model = LaVITModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`, refusing any size that would drop `[IMG]`, `[/IMG]` or a visual
        row (ids below `config.visual_token_end`): a text tokenizer that lacks the visual tokens is too short, see
        `LaVITProcessor.add_visual_tokens`."""
        config = self.config
        if new_num_tokens is not None and new_num_tokens < config.visual_token_end:
            codebook_size = config.tokenizer_config.codebook_size
            raise ValueError(
                f"resize_token_embeddings({new_num_tokens}) would drop rows of the image vocabulary: ids "
                f"[{config.text_vocab_size}, {config.visual_token_end}) are [IMG], [/IMG] and the {codebook_size} "
                f"visual codes, so at least {config.visual_token_end} rows are needed. A text tokenizer that short "
                f"lacks the visual tokens: call LaVITProcessor.add_visual_tokens(tokenizer, {codebook_size}) first"
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
        image_selection: LaVITImageSelection | dict | None = None,
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
            image_selection ([`LaVITImageSelection`] or `dict`, *optional*): which patches become visual tokens.
            labels (`torch.LongTensor` of shape `(B, S)`): targets aligned with `input_ids`, -100 where nothing is
                predicted; image targets are filled in by the model (see `LaVITModel.prepare_multimodal_inputs`).
            loss_modalities (`str`, *optional*): `"both"`, `"text"` or `"image"`; defaults to `config.loss_modalities`.
            num_items_in_batch (`int`, *optional*, in `kwargs`): number of targets in the whole accumulated batch
                (passed by `Trainer`); the loss is then the summed cross-entropy divided by it.
            shift_labels (`torch.LongTensor` of shape `(B, S)`, *optional*, in `kwargs`): targets already shifted
                (position t predicts `shift_labels[:, t]`), as sequence/context-parallel training passes them; they
                win over `labels`. Text only: with image placeholders, whose expansion moves every later target, give
                `labels`.
            image_patch_features (`torch.FloatTensor` of shape `(num_images, N, D)`, *optional*, in `kwargs`): the
                frozen encoder's output for `pixel_values` when already computed (see `LaVITModel.get_image_features`).
            skip_logits (`bool`, *optional*, in `kwargs`): return no logits (the Trainer's evaluation with
                `use_liger_kernel`); default: skipped in training with targets when `linear_cross_entropy` is set.
            return_dict (`bool`, *optional*, in `kwargs`): `False` (or `config.return_dict=False`) returns a tuple.
        """
        refuse_typos(self.forward, kwargs, passed_to=self.model.forward)  # the LM drops a mistyped name silently
        num_items_in_batch = self.checked_item_count(input_ids, attention_mask, labels, kwargs)
        shift_labels, skip_logits = kwargs.pop("shift_labels", None), kwargs.pop("skip_logits", None)
        if shift_labels is not None and self.model.has_image_inputs(input_ids, pixel_values):
            raise ValueError("shift_labels cannot be used with image placeholders: the model inserts each image's "
                             "visual tokens, which moves every target after it; give labels (unshifted) instead")
        # 1. the base model: placeholders expanded, embedded, through the LM
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, pixel_values=pixel_values, image_keep_mask=image_keep_mask,
            image_selection=image_selection, labels=labels, use_cache=use_cache, return_dict=True, **kwargs,
        )
        # 2. the shared head and one next-token loss over text and image targets
        loss, text_loss, image_loss, logits = self._head_and_loss(
            outputs, logits_to_keep, skip_logits, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
            loss_modalities=loss_modalities or self.config.loss_modalities,
        )
        return LaVITCausalLMOutputWithPast(
            loss=loss, text_loss=text_loss, image_loss=image_loss, logits=logits, labels=outputs.labels,
            image_token_counts=outputs.image_token_counts, **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    def _head_and_loss(self, outputs: LaVITModelOutputWithPast, logits_to_keep, skip_logits, **loss_settings):
        """(loss, text_loss, image_loss, logits) of the base model's outputs: the logits over the kept positions and
        the loss from them, or, in training with `linear_cross_entropy` set (or `skip_logits`), the loss straight from
        the hidden states and no logits (as Liger's forwards)."""
        has_targets = outputs.labels is not None or loss_settings["shift_labels"] is not None
        if skip_logits is None:
            skip_logits = self.training and has_targets and self.linear_cross_entropy is not None
        if skip_logits and has_targets and self.linear_cross_entropy is not None:
            return *self.fused_next_token_loss(outputs.last_hidden_state, outputs.labels, **loss_settings), None
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        losses = (None, None, None)
        if has_targets:
            losses = self.next_token_loss(logits, outputs.labels, **loss_settings)
        return *losses, None if skip_logits else logits

    def checked_item_count(self, input_ids, attention_mask, labels, kwargs: dict):
        """
        `num_items_in_batch` taken out of the forward's `kwargs`, or raises when it cannot be the number of targets:
        it is counted from the `labels`
        given (by `transformers.Trainer`), but a compact `[IMG][/IMG]` span with a supervised `[IMG]` gets its visual
        targets here, so the loss would be divided by too few items (about 3x off with the default processor).
        Fixes: a processor that writes expanded spans (`processor.set_visual_tokenizer(model)`), or `LaVITTrainer`,
        which expands before counting.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if num_items_in_batch is None or labels is None or input_ids is None:
            return num_items_in_batch
        spans = find_image_spans(input_ids, attention_mask, self.config)
        compact = (spans.lengths == 0) & (labels[spans.rows, spans.starts] != -100)
        if bool(compact.any()):
            raise ValueError(
                f"num_items_in_batch counts only the labels given, but {int(compact.sum())} image(s) of this batch "
                f"are compact [IMG][/IMG] placeholders whose visual targets the model adds, so the loss would be "
                f"divided by too few targets. Write expanded image spans with processor.set_visual_tokenizer(model) "
                f"(then transformers.Trainer and TRL count every target), or train with "
                f"lavit.training.trainer.LaVITTrainer")
        return num_items_in_batch

    def next_token_loss(self, logits, labels, num_items_in_batch=None, loss_modalities="both", shift_labels=None):
        """
        One cross-entropy over the shared head for text and image targets. Returns (loss, text_loss, image_loss):
        `loss` sums the supervised targets and divides by `num_items_in_batch` (or their count); the per-modality
        losses are detached means for logging. `shift_labels` (targets already shifted) win over `labels`.
        """
        # 1. targets: position t predicts token t + 1, restricted to the chosen modalities
        targets, is_image_target = self._loss_targets(labels, shift_labels, loss_modalities, logits.shape[1])
        # 2. summed cross-entropy over the targets, divided by their number in the whole accumulated batch
        token_losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=-100, reduction="none"
        ).view_as(targets)
        supervised = targets != -100
        loss = token_losses.sum() / _item_count(num_items_in_batch, supervised, token_losses.device)
        # 3. detached per-modality means, for logging
        detached = token_losses.detach()
        per_modality = []
        for selected in (supervised & ~is_image_target, supervised & is_image_target):
            per_modality.append(detached[selected].mean() if bool(selected.any()) else None)
        return loss, per_modality[0], per_modality[1]

    # `(hidden (N, H), head weight (V, H), targets (N,)) -> summed cross-entropy` without materialising the (N, V)
    # logits, e.g. Liger's fused linear cross-entropy (set by `kernels_lavit.apply_liger_kernel_to_lavit`)
    linear_cross_entropy = None

    def fused_next_token_loss(self, hidden_states, labels, num_items_in_batch=None, loss_modalities="both",
                              shift_labels=None):
        """
        [`next_token_loss`] from the hidden states `(B, L, H)` through `linear_cross_entropy`, so no `(B, L, vocab)`
        logits exist. Only supervised positions enter, text targets and image targets in two calls (each position in
        one), which gives the per-modality losses at no extra cost. Same returns, same values within float rounding.
        """
        # 1. targets as for the logits, then only the supervised positions
        targets, is_image_target = self._loss_targets(labels, shift_labels, loss_modalities, hidden_states.shape[1])
        targets, is_image_target = targets.to(hidden_states.device), is_image_target.to(hidden_states.device)
        supervised = targets != -100
        hidden_states, targets = hidden_states[supervised], targets[supervised]
        is_image_target = is_image_target[supervised]
        # 2. summed cross-entropy per modality, divided by the targets of the whole accumulated batch
        total = hidden_states[:0].sum().float()  # zero, attached to the graph (a batch without targets)
        per_modality = []
        for selected in (~is_image_target, is_image_target):
            count = int(selected.sum())
            if count == 0:
                per_modality.append(None)
                continue
            summed = self.linear_cross_entropy(hidden_states[selected], self.lm_head.weight, targets[selected])
            total = total + summed.float()
            per_modality.append(summed.detach().float() / count)  # 3. detached means, for logging
        loss = total / _item_count(num_items_in_batch, supervised, total.device)
        return loss, per_modality[0], per_modality[1]

    def _loss_targets(self, labels, shift_labels, loss_modalities: str, positions: int):
        """(targets (B, L): the next token of every position, -100 where it is not scored; is_image_target (B, L))."""
        if shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        if positions != shift_labels.shape[1]:
            raise ValueError(f"logits cover {positions} positions but labels {shift_labels.shape[1]}; "
                             f"compute the loss with logits_to_keep=0")
        targets = shift_labels
        is_image_target = (targets >= self.config.text_vocab_size) & (targets < self.config.visual_token_end)
        if loss_modalities == "text":
            targets = targets.masked_fill(is_image_target, -100)
        elif loss_modalities == "image":
            targets = targets.masked_fill(~is_image_target, -100)
        elif loss_modalities != "both":
            raise ValueError(f"loss_modalities must be 'both', 'text' or 'image', got {loss_modalities!r}")
        return targets, is_image_target

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
        if prompt_embeds is not None and kwargs.get("next_sequence_length") is not None and cache is not None:
            # transformers >= 5.25 counts the new positions in ids; here the ids follow the prompt's embeddings, so the
            # positions past the cache are the prompt's length plus the ids' minus the cache's (assisted decoding)
            kwargs["next_sequence_length"] = prompt_embeds.shape[1] + input_ids.shape[1] - cache.get_seq_length()
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
        image_selection: LaVITImageSelection | dict | None = None,
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
            # `LaVITPipeline.decode_visual_tokens(image_tokens_from_sequences(...))` turns into pixels
            tokens = self.generate_image_tokens(
                input_ids, attention_mask, pixel_values, image_keep_mask=image_keep_mask,
                image_selection=image_selection, **kwargs,
            )
            return self._image_sequences(input_ids, tokens)
        # 1. logits processors: no image ids in text; with `generator`, the warpers and one stream per row. On CUDA,
        #    the static cache and compiled decoding unless the caller chose a cache
        has_images = self.model.has_image_inputs(input_ids, pixel_values)  # decoded from the prompt's embeddings
        if has_images and attention_mask is None:
            attention_mask = self._image_prompt_padding(input_ids, kwargs)
        kwargs["logits_processor"] = self._text_logits_processors(kwargs, has_images, input_ids, attention_mask)
        kwargs.update(self.default_cache_settings(kwargs))
        # 2. bound the request, then decode from left-padded ids (text) or the expanded prompt's embeddings (images)
        if not has_images:
            self.check_text_generation_budget(input_ids, kwargs)  # image prompts: once expanded, in real tokens
            if pixel_values is not None:  # images without ids to place them: the forward's clear error
                check_input_kinds(input_ids, kwargs.get("inputs_embeds"), pixel_values, False)
            if input_ids is None or attention_mask is None:
                return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            # decoding continues every row at its end: rows padded on the right are moved to the left first
            left_ids, left_mask = left_padded(input_ids, attention_mask, self.model.pad_token_id)
            outputs = super().generate(input_ids=left_ids, attention_mask=left_mask, **kwargs)
            new_tokens_from = input_ids.shape[1]
        else:
            kwargs.update(lengths_in_given_ids(kwargs, self.generation_config, input_ids.shape[1]))  # user's units
            prepared = self.model.prepare_multimodal_inputs(
                input_ids, attention_mask, None, pixel_values, image_keep_mask, image_selection, padding_side="left",
                inputs_embeds=kwargs.pop("inputs_embeds", None),
            )
            self.check_text_generation_budget(prepared.inputs_embeds, kwargs, given_length=input_ids.shape[1])
            outputs = super().generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                                       prompt_embeds=prepared.inputs_embeds, **kwargs)
            new_tokens_from = 0
        # 3. the returned sequences start with the given ids, as for text-only models
        return _with_prompt_ids(outputs, input_ids, new_tokens_from)

    def _image_prompt_padding(self, input_ids: torch.LongTensor, kwargs: dict) -> torch.LongTensor | None:
        """The attention mask of a batch of image prompts given without one, as transformers infers a text prompt's
        (pads are `pad_token_id`); None where no row holds the pad token. Where the pad token is also the end of
        text, padding cannot be told from text: refused (the pads would be read as the prompt, silently)."""
        eos = generation_setting(kwargs, self.generation_config, "eos_token_id")
        ends = [] if eos is None else eos if isinstance(eos, list) else [eos]
        pad = generation_setting(kwargs, self.generation_config, "pad_token_id")
        pad = pad if pad is not None else next(iter(ends), None)  # transformers' fallback: the (first) end of text
        if pad is None or input_ids.shape[0] == 1 or not (input_ids == pad).any():
            return None
        if pad in ends:
            raise ValueError(f"generate: a batch of image prompts holding the pad token ({pad}, also the end of text "
                             f"here) needs its attention_mask to tell padding from text: pass the processor's "
                             f"attention_mask")
        return (input_ids != pad).long()

    def _text_logits_processors(self, kwargs: dict, from_embeddings: bool = False, prompt_ids=None,
                                attention_mask=None) -> LogitsProcessorList:
        """The caller's `logits_processor` (popped from `kwargs`), then the suppression of image ids in text and, with
        a `generator` (popped too), the warpers and one random stream per row. `from_embeddings` (a prompt with
        images, decoded from its embeddings): lavit applies the repetition penalty over `prompt_ids` and the new
        tokens ([`PromptRepetitionPenaltyLogitsProcessor`]: transformers' would skip a row's first new tokens)."""
        logits_processor = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        config = self.config
        logits_processor.append(SuppressImageTokensLogitsProcessor(config.text_vocab_size, config.visual_token_end))
        penalty = generation_setting(kwargs, self.generation_config, "repetition_penalty")
        if from_embeddings and penalty not in (None, 1.0):  # before the warpers, as transformers places its own
            logits_processor.append(PromptRepetitionPenaltyLogitsProcessor(penalty, prompt_ids, attention_mask))
            override_generation_settings(kwargs, repetition_penalty=1.0)  # transformers' own penalty off
        generator = kwargs.pop("generator", None)
        if generator is not None:
            logits_processor.extend(row_seeded_sampling_processors(kwargs, generator, self.generation_config))
        return logits_processor

    def default_cache_settings(self, kwargs: dict, device=None) -> dict:
        """The settings `generate` adds to `kwargs` on `device` (default: the model's; [`speed_defaults`]): on CUDA
        the static KV cache, with which transformers compiles the decoding step (`disable_compile=True` turns that
        off). None where the call, its generation config or the model's choose a cache, pass one, or decode with an
        assistant (assisted decoding keeps the dynamic cache)."""
        config = kwargs.get("generation_config") or self.generation_config
        chosen = kwargs.get("cache_implementation") or getattr(config, "cache_implementation", None)
        given = any(kwargs.get(name) is not None for name in ("past_key_values", "cache", "assistant_model",
                                                               "prompt_lookup_num_tokens"))
        defaults = speed_defaults(self.device if device is None else device)
        if chosen or given or defaults.cache_implementation == "dynamic":
            return {}
        settings = {"cache_implementation": defaults.cache_implementation}
        if not defaults.compile_decoding:
            settings["disable_compile"] = True
        return settings

    def check_text_generation_budget(self, prompt: torch.Tensor | None, kwargs: dict,
                                     given_length: int | None = None) -> None:
        """[`check_generation_budget`] of a text `generate` call before anything is allocated: `prompt` (ids or
        embeddings, `(batch, length, ...)`; default: `kwargs["inputs_embeds"]`), its new tokens resolved from
        `kwargs` (or the generation config) as transformers resolves them, and its rows
        `batch x max(num_beams, num_return_sequences)`; `given_length`: the caller's ids' length, when `prompt` holds
        the images' visual tokens (the message counts both)."""
        prompt = prompt if prompt is not None else kwargs.get("inputs_embeds")
        if prompt is None:
            return
        batch_size, prompt_length = prompt.shape[:2]
        config = kwargs.get("generation_config") or self.generation_config

        def setting(name):
            return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)

        max_new_tokens = setting("max_new_tokens")
        if max_new_tokens is None:  # `max_length` counts the prompt
            max_new_tokens = max((setting("max_length") or 20) - prompt_length, 1)
        rows = batch_size * max(setting("num_beams") or 1, setting("num_return_sequences") or 1)
        check_generation_budget(self.config.text_config, prompt_length, max_new_tokens, rows,
                                self.dtype.itemsize, self.device, what="generate", given_length=given_length)

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
        small noise. The LM-side merger starts as a copy of the visual tokenizer's merger; the visual projection is new.
        """
        # 1. the config: the LM's, with the vocabulary extended by [IMG], [/IMG] and the codes
        text_config = language_model.config.get_text_config()
        text_vocab_size = text_config.vocab_size if text_vocab_size is None else text_vocab_size
        new_text_config = text_config.__class__(**{
            **text_config.to_dict(), "vocab_size": text_vocab_size + 2 + visual_tokenizer.config.codebook_size
        })
        config = LaVITConfig(
            text_config=new_text_config, tokenizer_config=visual_tokenizer.config, text_vocab_size=text_vocab_size,
            **config_kwargs,
        )
        # 2. the visual side: the frozen visual tokenizer, and the LM-side merger starting as its copy
        model = cls(config).to(dtype=language_model.dtype)
        model.model.visual_tokenizer.load_state_dict(visual_tokenizer.state_dict())
        model.model.visual_merger.load_state_dict(visual_tokenizer.merger.state_dict())
        # 3. the LM's weights, except the embedding (and head) rows that grow
        decoder = language_model.get_decoder()
        input_embeddings = language_model.get_input_embeddings().weight
        embedding_key = next(name for name, param in decoder.named_parameters() if param is input_embeddings)
        lm_state = decoder.state_dict()
        old_embeddings = lm_state.pop(embedding_key)
        missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
        if unexpected or [key for key in missing if key != embedding_key]:
            raise ValueError(f"language model does not fit its config: missing {missing}, unexpected {unexpected}")
        # 4. the grown rows: text rows copied, new rows at the text rows' mean plus noise
        with torch.no_grad():
            std = text_config.initializer_range
            _extend_rows(model.get_input_embeddings().weight, old_embeddings[:text_vocab_size], std)
            if not config.tie_word_embeddings:
                old_head = language_model.get_output_embeddings().weight
                _extend_rows(model.lm_head.weight, old_head[:text_vocab_size], std)
        return model


def lengths_in_given_ids(kwargs: dict, default_config, prompt_length: int) -> dict:
    """
    `max_length` and `min_length` as the user counts them, as `max_new_tokens` / `min_new_tokens`: the returned
    sequences hold the `prompt_length` ids the user gave (compact `[IMG][/IMG]` spans, padding included, as for
    text-only models) plus the new tokens. Decoding starts from embeddings that also hold each image's visual tokens,
    which `transformers` would count against `max_length` (a 20-token limit gave 9 ids, a 10-token one an error).
    Each setting is taken from `kwargs`, then `kwargs["generation_config"]`, then `default_config`; lengths given as
    new tokens are left alone. Returns the settings to update (`max_length`/`min_length` become None).
    """
    def setting(name):
        return generation_setting(kwargs, default_config, name)

    updates = {}
    max_length = setting("max_length")
    if setting("max_new_tokens") is None and max_length is not None:
        if max_length <= prompt_length:
            raise ValueError(f"max_length={max_length} leaves no room after the prompt's {prompt_length} ids (an "
                             f"image counts as its [IMG] [/IMG] pair, not its visual tokens); give a larger "
                             f"max_length, or max_new_tokens")
        updates.update(max_new_tokens=max_length - prompt_length, max_length=None)
    min_length = setting("min_length")
    if setting("min_new_tokens") is None and min_length:
        updates.update(min_new_tokens=max(0, min_length - prompt_length), min_length=None)
    return updates


def _item_count(num_items_in_batch, supervised: torch.Tensor, device):
    """The loss's divisor: `num_items_in_batch` (the targets of the whole accumulated batch) or the supervised
    targets here, at least 1 (a step without targets, all records bad, gives 0)."""
    if num_items_in_batch is None:
        num_items_in_batch = supervised.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device).clamp(min=1)
    return max(num_items_in_batch, 1)


def _with_prompt_ids(outputs, input_ids: torch.LongTensor, new_tokens_from: int):
    """`generate`'s output with each sequence's tokens before `new_tokens_from` replaced by its prompt's ids."""
    sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences = torch.cat([prompt.to(sequences.device), sequences[:, new_tokens_from:]], dim=1)
    if isinstance(outputs, torch.Tensor):
        return sequences
    outputs.sequences = sequences
    return outputs


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


__all__ = [
    "LaVITCausalLMOutputWithPast", "LaVITForCausalLM", "LaVITImageFeaturesOutput", "LaVITModel", "LaVITPreTrainedModel",
]
