"""LaVIT image generation (paper section 3.2, official `generate_image_tokens` / `multimodal_synthesis`) and the
sampling helpers shared with text generation.

`LaVITImageGenerationMixin` gives [`LaVITForCausalLM`] its image side: `generate_image_tokens` (visual ids after
`[IMG]` until `[/IMG]`, with classifier-free guidance; its settings are one typed [`LaVITImageGenerationConfig`]);
its base `LaVITFolderMixin` completes saved folders. The model knows no pixels: `LaVITPipeline` (pipeline_lavit.py)
turns the tokens into images.
"""

import copy
import os
import shutil
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import (
    LogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging

from .configuration_lavit import LaVITImageSelection
from .image_placeholders_lavit import positions_from_mask
from .kernels_lavit import speed_defaults
from .modeling_lavit_tokenizer import LaVITTokenizationOutput
from .transformers_compat import cache_kwargs
from .validation_lavit import (
    GUIDANCE_SCALE,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    Choice,
    Range,
    check_fields,
    check_generation_budget,
    check_keywords,
    unknown_names,
)

logger = logging.get_logger(__name__)

TEXT_TO_IMAGE_TASK = "lavit-text-to-image"
PIPELINE_FILE = "pipelines_lavit.py"


# ----------------------------------------------------------------------------------------------- sampling helpers


def row_generators(
    generator: torch.Generator | list[torch.Generator] | None, batch_size: int, rows_per_prompt: int,
    device: torch.device,
) -> list[torch.Generator]:
    """
    One random stream per row: seeded by one draw from `generator` (torch's global generator when None) plus the
    row's index among its prompt's rows. A row's samples then depend on the seed and on its own prompt only, never on
    the other prompts of the batch (one shared stream would hand each row the draws left by the rows before it).
    A list of `batch_size` generators (diffusers' one per image) seeds each row's stream by one draw from its own; a
    list repeating one generator is used as it is.
    """
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"generator is a list of {len(generator)} generators; give one per image ({batch_size})")
        if len({id(gen) for gen in generator}) < len(generator):
            # one generator repeated: diffusers draws the rows one after another from its one stream, and so does
            # lavit (what `LaVITDetokenizer.decode` asks for with one generator for the batch)
            return list(generator)
        return [row_generators(gen, 1, 1, device)[0] for gen in generator]
    seed_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device))
    return [torch.Generator(device=device).manual_seed(seed + row % rows_per_prompt) for row in range(batch_size)]


def sample_rows(probs: torch.FloatTensor, generators: list[torch.Generator]) -> torch.LongTensor:
    """One multinomial draw per row of `probs` (B, V), each from its own generator."""
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators, strict=True)])


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


def _concat_left_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks left-padded (embeddings, mask) batches along the batch axis, padding all to the longest."""
    length = max(embeds.shape[1] for embeds, _ in parts)
    all_embeds, all_masks = [], []
    for embeds, mask in parts:
        missing = length - embeds.shape[1]
        all_embeds.append(F.pad(embeds, (0, 0, missing, 0)))
        all_masks.append(F.pad(mask, (missing, 0)))
    return torch.cat(all_embeds), torch.cat(all_masks)


class SuppressImageTokensLogitsProcessor(LogitsProcessor):
    """Text mode: `[IMG]`, `[/IMG]` and every visual id get -inf (the official `suppress_tokens=range(32000, V)`)."""

    def __init__(self, text_vocab_size: int, visual_token_end: int):
        self.text_vocab_size = text_vocab_size
        self.visual_token_end = visual_token_end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.text_vocab_size : self.visual_token_end] = -float("inf")
        return scores


class PromptRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """
    transformers' repetition penalty over each row's prompt ids and new tokens, for decoding from a prompt's
    embeddings (an image prompt), where transformers' own processor sees the new tokens alone, shifted by the row's
    left pads: a row gets the penalty it gets alone, and a text-only row batched with image rows the one the text
    path gives it (prompt included).

    Args:
        penalty (`float`): `repetition_penalty`.
        prompt_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): the prompts as given.
        attention_mask (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*): their pads (0).
    """

    def __init__(self, penalty: float, prompt_ids: torch.LongTensor, attention_mask: torch.LongTensor | None = None):
        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)
        real = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        first = prompt_ids.gather(1, real.int().argmax(dim=1, keepdim=True))  # a token of each row's prompt
        self.prompt_ids = torch.where(real, prompt_ids, first)  # a pad counts as that token once more: no effect

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows_per_prompt = input_ids.shape[0] // self.prompt_ids.shape[0]  # num_beams, num_return_sequences
        prompt = self.prompt_ids.to(input_ids.device).repeat_interleave(rows_per_prompt, dim=0)
        return self.penalty(torch.cat([prompt, input_ids], dim=1), scores)


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


def sampling_warpers(temperature=None, top_k=None, top_p=None, min_p=None) -> list[LogitsProcessor]:
    """transformers' warpers for the settings that change the distribution, in `generate`'s order: temperature,
    top-k, top-p, min-p (`None`, 1.0, top-k 0 and top-p 1.0 leave it as it is)."""
    warpers = []
    if temperature not in (None, 1.0):
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


def generation_setting(kwargs: dict, default_config, name: str):
    """The generation setting `name` as `generate` will use it, as transformers merges it: from `kwargs`, else the
    `generation_config` given in `kwargs`, else `default_config` (the model's), where each leaves it None."""
    sources = (kwargs.get(name), getattr(kwargs.get("generation_config"), name, None),
               getattr(default_config, name, None))
    return next((value for value in sources if value is not None), None)


def override_generation_settings(kwargs: dict, **settings) -> None:
    """Sets generation `settings` in `kwargs` that switch off what lavit does itself: as keywords, or, when a
    `generation_config` object is given, in a copy of it (a keyword beside the object is deprecated in transformers;
    a value must not be None there, or the model's own value is merged in)."""
    if kwargs.get("generation_config") is None:
        kwargs.update(settings)
        return
    config = kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
    for name, value in settings.items():
        setattr(config, name, value)
        kwargs.pop(name, None)


def row_seeded_sampling_processors(kwargs: dict, generator: torch.Generator, default_config) -> list[LogitsProcessor]:
    """The warpers and per-row sampler that text `generate(generator=...)` appends to its logits processors; the
    warpers `generate` would add itself are switched off (they now run before the sampler). Settings are read as
    transformers merges them ([`generation_setting`])."""

    def setting(name):
        return generation_setting(kwargs, default_config, name)

    if not setting("do_sample") or (setting("num_beams") or 1) > 1:
        return []  # greedy and beam search draw nothing
    unsupported = [name for name in ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
                   if setting(name) not in (None, 0.0, 1.0)]
    if unsupported:
        raise ValueError(f"generate(generator=...) samples after temperature, top_k, top_p and min_p; "
                         f"{unsupported} are not supported with it (drop the generator to use them)")
    warpers = sampling_warpers(setting("temperature"), setting("top_k"), setting("top_p"), setting("min_p"))
    override_generation_settings(kwargs, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    rows_per_prompt = setting("num_return_sequences") or 1
    return warpers + [RowSeededSamplingLogitsProcessor(generator, rows_per_prompt)]


# ----------------------------------------------------------------------------------------------- image settings


@dataclass
class LaVITImageGenerationConfig:
    """
    Settings of [`LaVITImageGenerationMixin.generate_image_tokens`] (defaults: the official ones). Every field can
    also be given to `generate_image_tokens` as a keyword argument; an unknown name raises a `TypeError`, a value out
    of range a `ValueError` naming it.

    Args:
        guidance_scale (`float`, defaults to 4.0): classifier-free guidance on log-probabilities (official: 4.0 for
            text, 5.0 for multimodal prompts); 1 turns it off.
        do_sample (`bool`), top_k (`int`), top_p (`float`), temperature (`float`): multinomial sampling after the
            temperature, top-k and top-p warpers (official 1.0, 50, 1.0), or greedy with `do_sample=False`.
        min_new_tokens (`int`, *optional*): at least this many visual tokens (default: 20 as the official code,
            capped by the maximum).
        max_new_tokens (`int`, *optional*): at most this many (default and upper bound: the tokenizer's number of
            patches, the most its decoder reads); the image is closed at the limit.
        num_images_per_prompt (`int`, defaults to 1): images per prompt, rows in prompt order.
        image_inputs (`str`, defaults to `"codes"`): how prompt images enter: discrete ids (`"codes"`, the official
            multimodal synthesis) or continuous features (`"features"`).
        cache_implementation (`str`, *optional*): `"static"` preallocates the KV cache for the prompt and every step
            and keeps the attention mask at full length, so every decoding step has the same shapes; `"dynamic"`
            grows it. Default: the device's (`kernels_lavit.speed_defaults`: static on CUDA, else dynamic).
        compile_decoding (`bool`, *optional*): `torch.compile` the decoding step (the first call compiles; with the
            static cache on CUDA it is replayed as a CUDA graph). Default: the device's (on CUDA only). Both speed
            settings give the same tokens.
    """

    guidance_scale: float = 4.0
    do_sample: bool = True
    top_k: int | None = 50
    top_p: float | None = 1.0
    temperature: float = 1.0
    min_new_tokens: int | None = None
    max_new_tokens: int | None = None
    num_images_per_prompt: int = 1
    image_inputs: str = "codes"
    cache_implementation: str | None = None
    compile_decoding: bool | None = None

    # the declared range of every field (those of transformers' guidance and logits processors for sampling)
    field_ranges = {
        "guidance_scale": GUIDANCE_SCALE, "top_k": Range(0, integer=True, optional=True, note="0 turns top-k off"),
        "top_p": Range(0, 1, low_open=True, optional=True, note="1 turns nucleus sampling off"),
        "temperature": POSITIVE_FLOAT, "min_new_tokens": Range(0, integer=True, optional=True),
        "max_new_tokens": Range(1, integer=True, optional=True), "num_images_per_prompt": POSITIVE_INT,
        "image_inputs": Choice(("codes", "features")), "do_sample": Choice((True, False)),
        "cache_implementation": Choice(("dynamic", "static"), optional=True),
        "compile_decoding": Choice((True, False), optional=True),
    }

    def __post_init__(self):
        check_fields(self, self.field_ranges)

    @classmethod
    def resolve(cls, generation_config: "LaVITImageGenerationConfig | None", kwargs: dict, caller=None):
        """`generation_config` (default: the defaults) with `kwargs` replacing its fields; raises `TypeError` for
        another kind of config or unknown names (naming `caller`, the method the user gave them to)."""
        if caller is not None:
            check_keywords(caller, kwargs, [field.name for field in fields(cls)])
        if generation_config is None:
            return cls().updated(**kwargs)
        if not isinstance(generation_config, cls):
            # a model loaded with trust_remote_code runs the folder's copy of this module, whose class is another
            # object than `lavit.LaVITImageGenerationConfig`: the same settings are taken by name
            if type(generation_config).__name__ != cls.__name__ or not is_dataclass(generation_config):
                kind = type(generation_config)
                raise TypeError(f"generation_config must be a LaVITImageGenerationConfig, got "
                                f"{kind.__module__}.{kind.__qualname__}")
            generation_config = cls().updated(**{field.name: getattr(generation_config, field.name)
                                                 for field in fields(generation_config)})
        return generation_config.updated(**kwargs)

    def updated(self, **kwargs) -> "LaVITImageGenerationConfig":
        """A copy with `kwargs` replacing fields; raises `TypeError` naming unknown names."""
        names = [field.name for field in fields(self)]
        unknown = unknown_names(kwargs, names)
        if unknown:
            raise TypeError(f"image generation does not take {', '.join(unknown)}; its settings are {names} (see "
                            f"LaVITImageGenerationConfig)")
        return replace(self, **kwargs)

    def for_device(self, device) -> "LaVITImageGenerationConfig":
        """A copy whose unset speed settings (`cache_implementation`, `compile_decoding`) are `device`'s defaults
        ([`speed_defaults`]: the static cache and compiled decoding on CUDA)."""
        defaults = speed_defaults(device)
        return replace(
            self, cache_implementation=self.cache_implementation or defaults.cache_implementation,
            compile_decoding=defaults.compile_decoding if self.compile_decoding is None else self.compile_decoding,
        )

    def token_limits(self, max_tokens_limit: int) -> tuple[int, int]:
        """(min_new_tokens, max_new_tokens) with their defaults, checked against the decoder's `max_tokens_limit`."""
        max_new_tokens = max_tokens_limit if self.max_new_tokens is None else self.max_new_tokens
        if not 1 <= max_new_tokens <= max_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {max_tokens_limit}] (the decoder reads at most "
                             f"{max_tokens_limit} tokens), got {max_new_tokens}")
        min_new_tokens = min(20, max_new_tokens) if self.min_new_tokens is None else self.min_new_tokens
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
        return min_new_tokens, max_new_tokens


class ImageTokenSampler:
    """
    Picks each step's visual token from the head's `[/IMG]` + code columns (column 0: `[/IMG]`, 1 + k: code k):
    guidance on log-probabilities (`uncond + scale * (cond - uncond)`, conditional rows first), `[/IMG]` forbidden
    before `min_new_tokens`, then the warpers and one draw per row from its own stream (or argmax).
    """

    def __init__(self, settings: LaVITImageGenerationConfig, min_new_tokens: int, generator: torch.Generator | None,
                 num_images: int, device: torch.device):
        self.guidance_scale = settings.guidance_scale
        self.branches = 2 if settings.guidance_scale != 1.0 else 1  # conditional and unconditional rows
        self.min_new_tokens = min_new_tokens
        self.do_sample = settings.do_sample
        self.generators, self.warpers = None, []
        if settings.do_sample:
            # one random stream per image (`num_images` conditional rows), seeded by one draw from `generator` here
            self.generators = row_generators(generator, num_images, settings.num_images_per_prompt, device)
            self.warpers = sampling_warpers(settings.temperature, settings.top_k, settings.top_p)

    def __call__(self, scores: torch.FloatTensor, step: int) -> torch.LongTensor:
        if self.branches == 2:
            conditional_scores, unconditional_scores = scores.log_softmax(dim=-1).chunk(2)
            scores = unconditional_scores + self.guidance_scale * (conditional_scores - unconditional_scores)
        if step < self.min_new_tokens:
            scores[:, 0] = -float("inf")
        for warper in self.warpers:
            scores = warper(None, scores)
        if self.do_sample:
            return sample_rows(scores.softmax(dim=-1), self.generators)
        return scores.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------- the mixins


class LaVITFolderMixin:
    """
    What a saved [`LaVITForCausalLM`] folder needs beyond the model's own code files: the config's `auto_map` for
    every head and the `pipelines_lavit.py` of the `lavit-text-to-image` transformers pipeline. Pixels are not the
    model's: `LaVITPipeline` (a diffusers pipeline with this model as its `language_model`) decodes them.
    """

    def save_pretrained(self, save_directory, *args, max_shard_size: int | str = "50GB", **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the pipeline file and `auto_map` entries. The folder is complete on
        every save path (lavit installed or not: a folder loaded with `trust_remote_code`, `Trainer` checkpoints, a
        PEFT-merged model), because all of them call this method. `max_shard_size` is named so that callers that
        look for it in the signature (`DiffusionPipeline.save_pretrained`) pass it on."""
        if self._auto_class is not None:
            self._register_folder_entries(_pipeline_source_file(self.name_or_path) is not None)
        return super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size, **kwargs)

    def _save_folder(self, folder, *args, **kwargs):
        # the pipeline file is written with the model's files, in the folder the source guard saves into
        saved = super()._save_folder(folder, *args, **kwargs)
        pipeline_file = _pipeline_source_file(self.name_or_path) if self._auto_class is not None else None
        if pipeline_file is not None and kwargs.get("is_main_process", True):
            shutil.copyfile(pipeline_file, Path(folder) / pipeline_file.name)
        return saved

    def _register_folder_entries(self, with_pipeline: bool):
        """The config's `auto_map` for every head of the folder (transformers writes only the saved class's entry)
        and, `with_pipeline`, the custom text-to-image pipeline."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": "modeling_lavit.LaVITModel",
            "AutoModelForCausalLM": "modeling_lavit.LaVITForCausalLM",
            "AutoModelForImageTextToText": "modeling_lavit.LaVITForCausalLM",
            "AutoModelForMultimodalLM": "modeling_lavit.LaVITForCausalLM",
        }
        if with_pipeline:
            # `pipeline("lavit-text-to-image", model=folder, trust_remote_code=True)` without `lavit` installed
            self.config.custom_pipelines = {TEXT_TO_IMAGE_TASK: {
                "impl": "pipelines_lavit.LaVITTextToImagePipeline", "pt": ["AutoModelForCausalLM"], "tf": [],
                "type": "multimodal",
            }}


class LaVITImageGenerationMixin(LaVITFolderMixin):
    """
    The image side of [`LaVITForCausalLM`]: visual-token generation after `[IMG]` (with classifier-free guidance).
    The tokens become pixels in `LaVITPipeline`. Expects `config`, `model` (a `LaVITModel`), `lm_head`,
    `get_input_embeddings` and `device`, as `LaVITForCausalLM` has them.
    """

    # the settings of `generate_image_tokens` (read by the `lavit-text-to-image` pipeline, which cannot import it)
    image_generation_config_class = LaVITImageGenerationConfig

    # ------------------------------------------------------------------------------------------- visual tokens

    @torch.no_grad()
    def generate_image_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        *,
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image_keep_mask: torch.Tensor | None = None,
        image_selection: LaVITImageSelection | dict | None = None,
        streamer=None,
        generation_config: LaVITImageGenerationConfig | None = None,
        **kwargs,
    ) -> LaVITTokenizationOutput:
        """
        Text-to-image and multimodal-to-image: continues each prompt after `[IMG]` with visual ids only, until
        `[/IMG]`. Returns the code ids of every generated image, packed with `token_counts` like
        [`LaVITTokenizerModel.tokenize`] (rows in prompt order, `num_images_per_prompt` per prompt).

        - `input_ids`: text (and image placeholders with `pixel_values`); an `[IMG]` is appended where a prompt does
          not already end with one.
        - Settings: `generation_config` ([`LaVITImageGenerationConfig`]: guidance, sampling, lengths, cache and
          compilation), whose fields can also be given as keyword arguments (they win); unknown ones raise.
        - Classifier-free guidance (`guidance_scale != 1`): the unconditional branch is `negative_input_ids` + `[IMG]`,
          or `[IMG]` alone (official); both branches run as one batch in every forward.
        - Every row samples with its own random stream, seeded by one draw from `generator` (or from torch's global
          generator) plus the row's index among its prompt's images: a prompt gets the same images alone or batched
          with others, whatever the padding side.
        - `streamer` (e.g. `transformers.TextStreamer`): the prompt ids, each step's LM ids, then `end()`.
        """
        # 1. settings: the typed config, keyword arguments overriding its fields
        settings = LaVITImageGenerationConfig.resolve(generation_config, kwargs,
                                                      caller=self.generate_image_tokens).for_device(self.device)
        min_new_tokens, max_new_tokens = settings.token_limits(self.config.tokenizer_config.num_patches)
        self._check_image_generation_budget(settings, input_ids.shape[0], input_ids.shape[1], max_new_tokens)
        # 2. prompts: embeddings ending with [IMG]; with guidance the unconditional rows follow in the same batch
        inputs_embeds, attention_mask = self._image_generation_batch(
            input_ids, attention_mask, pixel_values, negative_input_ids, negative_attention_mask, image_keep_mask,
            image_selection, settings,
        )
        # 3. the KV cache and the (compiled) decoding step
        cache, attention_mask, decode = self._image_decoding_setup(settings, attention_mask, max_new_tokens)
        # 4. prefill: the prompt fills the cache; its last hidden state scores the first visual token
        position_ids = positions_from_mask(attention_mask[:, : inputs_embeds.shape[1]])
        hidden_states = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **cache_kwargs(cache),
        ).last_hidden_state[:, -1]
        # 5. the sampler: guidance, minimum length, warpers, one random stream per row
        num_images = input_ids.shape[0] * settings.num_images_per_prompt
        sampler = ImageTokenSampler(settings, min_new_tokens, generator, num_images, hidden_states.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        # 6. decode step by step until every row has closed its image
        generated = self._decode_visual_tokens(decode, cache, sampler, hidden_states, attention_mask, position_ids,
                                               max_new_tokens, streamer)
        # 7. pack: code + 1 per step, 0 from [/IMG] on
        kept = generated > 0
        return LaVITTokenizationOutput(code_ids=generated[kept] - 1, token_counts=kept.sum(dim=1))

    def _check_image_generation_budget(self, settings, batch_size: int, prompt_length: int, max_new_tokens: int,
                                       given_length: int | None = None):
        """[`check_generation_budget`] of image generation: the prompt (+ `[IMG]`), the visual tokens and `[/IMG]`,
        for every image of every prompt, twice with guidance (the unconditional rows); `given_length`: the caller's
        ids' length when `prompt_length` counts the prompt's images in visual tokens."""
        rows = batch_size * settings.num_images_per_prompt * (1 if settings.guidance_scale == 1 else 2)
        check_generation_budget(self.config.text_config, prompt_length + 1, max_new_tokens + 1, rows,
                                self.dtype.itemsize, self.device, what="generate_image_tokens",
                                given_length=None if given_length is None else given_length + 1)

    def _image_generation_batch(
        self, input_ids, attention_mask, pixel_values, negative_input_ids, negative_attention_mask, image_keep_mask,
        image_selection, settings: LaVITImageGenerationConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings and mask: `num_images_per_prompt` conditional rows per prompt, then (with
        guidance) as many unconditional rows."""
        # 1. the prompts, each repeated for its images
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        conditional = self._image_generation_prompt(
            input_ids, attention_mask, pixel_values, image_keep_mask, image_selection, settings.image_inputs
        )
        if conditional[0].shape[1] > input_ids.shape[1] + 1:  # the prompt's images, now in their visual tokens
            self._check_image_generation_budget(
                settings, input_ids.shape[0], conditional[0].shape[1] - 1,
                settings.token_limits(self.config.tokenizer_config.num_patches)[1], given_length=input_ids.shape[1])
        per_prompt = settings.num_images_per_prompt
        conditional = tuple(t.repeat_interleave(per_prompt, dim=0) for t in conditional)
        if settings.guidance_scale == 1.0:
            return conditional
        # 2. the unconditional branch: the negative prompt (default `[IMG]` alone), one per prompt or shared
        batch_size = conditional[0].shape[0]
        if negative_input_ids is None:
            negative_input_ids = input_ids.new_full((1, 1), self.config.image_start_token_id)
        if negative_attention_mask is None:
            negative_attention_mask = torch.ones_like(negative_input_ids)
        unconditional = self._image_generation_prompt(negative_input_ids, negative_attention_mask)
        if unconditional[0].shape[0] == 1:
            unconditional = tuple(t.expand(batch_size, *t.shape[1:]) for t in unconditional)
        elif unconditional[0].shape[0] * per_prompt == batch_size:
            unconditional = tuple(t.repeat_interleave(per_prompt, dim=0) for t in unconditional)
        else:
            raise ValueError(f"negative_input_ids has {negative_input_ids.shape[0]} rows; expected 1 or "
                             f"{input_ids.shape[0]} (one per prompt)")
        return _concat_left_padded([conditional, unconditional])

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

    def _image_decoding_setup(self, settings: LaVITImageGenerationConfig, attention_mask, max_new_tokens: int):
        """The KV cache, the attention mask decoding starts from and the decoding step: a static cache is
        preallocated for the prompt and every step, with the mask at full length (filled in step by step), so every
        step has the same shapes."""
        decode = self._image_decoding_step(settings)
        if settings.cache_implementation == "static":
            total_length = attention_mask.shape[1] + max_new_tokens
            cache = StaticCache(config=self.config.text_config, max_cache_len=total_length)
            return cache, F.pad(attention_mask, (0, max_new_tokens), value=0), decode
        return DynamicCache(config=self.config), attention_mask, decode

    def _image_decoding_step(self, settings: LaVITImageGenerationConfig):
        """The language model, or with `compile_decoding` its compiled form: with the static cache every step has the
        same shapes, so on CUDA the step is captured as a CUDA graph (one launch instead of one per kernel: a 7B step
        at batch 2 is launch-bound, not compute-bound)."""
        language_model = self.model.language_model
        if not settings.compile_decoding:
            return language_model
        graphs = settings.cache_implementation == "static" and self.device.type == "cuda"
        return torch.compile(language_model, dynamic=False, mode="reduce-overhead" if graphs else None)

    def _decode_visual_tokens(
        self, decode, cache, sampler, hidden_states, attention_mask, position_ids, max_new_tokens: int, streamer
    ) -> torch.LongTensor:
        """(B, steps) code + 1 per step, 0 from `[/IMG]` on; a row still open at `max_new_tokens` is closed."""
        config = self.config
        # [/IMG] and the visual ids are one contiguous block of the vocabulary: only those columns are scored. The
        # head runs as a module (not F.linear on its `.weight`), so an offloaded head is loaded by its accelerate hook
        allowed_columns = slice(config.image_end_token_id, config.visual_token_end)
        prompt_length = position_ids.shape[1]
        static = attention_mask.shape[1] > prompt_length  # preallocated: the mask already spans every step
        batch_size = hidden_states.shape[0] // sampler.branches
        finished = torch.zeros(batch_size, dtype=torch.bool, device=hidden_states.device)
        generated = []
        for step in range(max_new_tokens + 1):
            # 1. pick each row's token; finished rows repeat [/IMG], and every row closes at the limit
            next_tokens = sampler(self.lm_head(hidden_states)[:, allowed_columns].float(), step)
            if step == max_new_tokens:
                next_tokens = torch.zeros_like(next_tokens)
            next_tokens = next_tokens.masked_fill(finished, 0)
            generated.append(next_tokens)
            if streamer is not None:
                streamer.put((next_tokens + config.image_end_token_id).cpu())
            finished = finished | (next_tokens == 0)
            if bool(finished.all()) or step == max_new_tokens:
                break
            # 2. feed the tokens back (to both guidance branches): one more attended column, one more position
            next_ids = (next_tokens + config.image_end_token_id)[:, None].repeat(sampler.branches, 1)
            if static:
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
        return torch.stack(generated, dim=1)

    def _image_sequences(self, input_ids: torch.LongTensor, tokens: LaVITTokenizationOutput) -> torch.LongTensor:
        """Prompt ids + `[IMG]` + generated visual ids + `[/IMG]` per generated image, right-padded."""
        config = self.config
        rows = []
        for image_ids in tokens.per_image():
            rows.append(torch.cat([
                image_ids.new_tensor([config.image_start_token_id]), image_ids + config.visual_token_offset,
                image_ids.new_tensor([config.image_end_token_id]),
            ]))
        images = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.model.pad_token_id)
        prompt = input_ids.repeat_interleave(images.shape[0] // input_ids.shape[0], dim=0)
        return torch.cat([prompt.to(images.device), images], dim=1)


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


__all__ = [
    "ImageTokenSampler",
    "LaVITImageGenerationConfig",
    "LaVITImageGenerationMixin",
    "LaVITFolderMixin",
    "RowSeededSamplingLogitsProcessor",
    "SuppressImageTokensLogitsProcessor",
    "left_padded",
    "row_generators",
    "row_seeded_sampling_processors",
    "sample_rows",
    "sampling_warpers",
]
