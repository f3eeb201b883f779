"""Configurations of LaVIT (ICLR 2024): the EVA-CLIP vision encoder and the dynamic visual tokenizer.

Defaults are the values of the released LaVIT checkpoints (official code `jy0205/LaVIT`, folder `LaVIT/models`).
"""

import copy
from dataclasses import dataclass, fields
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .folders_lavit import LANGUAGE_MODEL_TYPE
from .transformers_compat import check_transformers_version, transformers_requirement
from .validation_lavit import (
    EPSILON,
    GUIDANCE_SCALE,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    Choice,
    Each,
    Range,
    check_arguments,
    check_fields,
    check_nested_config,
    unknown_names,
)

# the first LaVIT file a remote-code folder imports: outside the tested transformers range, fail here with one message
check_transformers_version()

SELECTION_MODES = ("deterministic", "sample")
LOSS_MODALITIES = ("both", "text", "image")
MERGER_ATTENTION_IMPLEMENTATIONS = ("exact", "official")
GENERATED_IMAGE_INPUTS = ("codes", "features")
# Copied from processing/image_processing_lavit.py: the two folders are copied flat into Hub folders, so neither may
# import the other
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# the declared ranges of the image-selection settings ([`LaVITImageSelection`])
SELECTION_RANGES = {"mode": Choice(SELECTION_MODES), "max_tokens": POSITIVE_INT, "keep_ratio": OPEN_FRACTION}


def check_selection_arguments(mode: str | None, max_tokens: int | None, keep_ratio: float | None) -> None:
    """Raises `ValueError` for both budgets at once, or an argument out of its range in `SELECTION_RANGES`."""
    if max_tokens is not None and keep_ratio is not None:
        raise ValueError("give at most one of max_tokens and keep_ratio")
    check_arguments(SELECTION_RANGES, {"mode": mode, "max_tokens": max_tokens, "keep_ratio": keep_ratio})


@dataclass(frozen=True)
class LaVITImageSelection:
    """
    Which patches of an image become visual tokens at inference (`LaVITTokenizerModel.select_tokens`): the one typed
    form of the settings every entry point takes (`tokenize(..., selection=...)`, `image_selection=` of the LaVIT
    model, `LaVITProcessor.set_visual_tokenizer`, `LaVITPipeline.reconstruct`), which also take them as a dict or as
    keyword arguments ([`LaVITImageSelection.from_value`]). Values out of range raise `ValueError` when it is made.

    Args:
        mode (`str`, *optional*): `"deterministic"` (keep `p_keep > config.selector_threshold`) or `"sample"`
            (Bernoulli(p_keep)); default `config.selection_mode`.
        max_tokens (`int`, *optional*): a budget: the `max_tokens` patches with the highest keep probability.
        keep_ratio (`float`, *optional*): a budget as a share of the patches, in (0, 1]; at most one budget.
        generator (`torch.Generator`, *optional*): the random stream of `"sample"`.
    """

    mode: str | None = None
    max_tokens: int | None = None
    keep_ratio: float | None = None
    generator: Any = None

    def __post_init__(self):
        check_selection_arguments(self.mode, self.max_tokens, self.keep_ratio)
        import torch

        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"image selection: generator must be a torch.Generator, got {self.generator!r}")

    @classmethod
    def from_value(cls, value=None, **arguments) -> "LaVITImageSelection":
        """`value` (`None`, a dict of field names or a `LaVITImageSelection`) with `arguments` (field names, they
        win) -> one selection. A name that is not a field raises `ValueError` listing the fields."""
        if isinstance(value, cls) and not arguments:
            return value
        if value is not None and not isinstance(value, (cls, dict)):
            raise ValueError(f"image selection must be a LaVITImageSelection, a dict of its settings or None, got "
                             f"{type(value).__name__} {value!r}")
        given = {field.name: getattr(value, field.name) for field in fields(cls)} if isinstance(value, cls) else \
            dict(value or {})
        given.update(arguments)
        names = [field.name for field in fields(cls)]
        unknown = unknown_names(given, names)
        if unknown:
            raise ValueError(f"image selection does not take {', '.join(unknown)}; its settings are {names}")
        return cls(**given)


# what each LaVIT config's folder holds, and the class that loads it
LAVIT_MODEL_CLASSES = {"lavit": "LaVITForCausalLM", "lavit_tokenizer": "LaVITTokenizerModel",
                       "lavit_detokenizer": "LaVITDetokenizer"}


class LaVITFolderConfig(PretrainedConfig):
    """
    Base of the configs that are saved as a folder's `config.json`. Loading refuses a `config.json` of another model
    type at once: transformers only warns, then builds this class's defaults from it (a tokenizer folder read as a
    LaVIT model became a 9B model of default sizes), or takes a nested config of this type (a LaVIT folder read as a
    tokenizer became a tokenizer with random weights, since the saved ones carry the LaVIT model's prefix). Saving
    states the transformers versions the folder's code needs (`transformers_requirement`, checked on import by
    `transformers_compat.check_transformers_version`).
    """

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        cls._check_model_type(config_dict, f"{pretrained_model_name_or_path}")
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        cls._check_model_type(config_dict, "this config.json")
        try:
            return super().from_dict(config_dict, **kwargs)
        except (TypeError, AttributeError, ValueError) as error:
            # a wrong type fails deep inside (`"abc" + 2`, a derived property set): name the field instead
            problems = config_field_problems(cls, config_dict)
            if not problems:
                raise
            raise ValueError(f"config.json of {cls.__name__}: {'; '.join(problems)}") from error

    @classmethod
    def _check_model_type(cls, config_dict: dict, source: str) -> None:
        found = config_dict.get("model_type")
        if found and found != cls.model_type:
            loader = LAVIT_MODEL_CLASSES.get(found, "its own class, or AutoModel")
            raise ValueError(f"{source} holds a config of model_type {found!r}, not {cls.model_type!r} "
                             f"({cls.__name__}); load that folder with {loader}")

    def to_dict(self):
        output = super().to_dict()
        output["transformers_requirement"] = transformers_requirement()
        return output


class LaVITEvaVisionConfig(PretrainedConfig):
    r"""
    Configuration of the EVA-CLIP ViT used as LaVIT's frozen vision encoder. The defaults are EVA01-CLIP-g/14 at 224 px
    ("eva-clip-g-14-x"), the encoder of the released LaVIT models.

    Args:
        image_size (`int`, *optional*, defaults to 224): input resolution; the encoder accepts exactly this size.
        patch_size (`int`, *optional*, defaults to 14): side of a square patch.
        num_channels (`int`, *optional*, defaults to 3): image channels.
        hidden_size (`int`, *optional*, defaults to 1408): width of the transformer.
        num_hidden_layers (`int`, *optional*, defaults to 40): all blocks are used (features come from the last).
        num_attention_heads (`int`, *optional*, defaults to 16): heads of 88 channels at the default width.
        intermediate_size (`int`, *optional*, defaults to 6144): MLP hidden size, `int(1408 * 4.3637)`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of every LayerNorm in the encoder.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of linear layers.
    """

    model_type = "lavit_eva_vision"

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    # the declared range of every field, checked when the config is built or loaded
    field_ranges = {
        **dict.fromkeys(("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size"), POSITIVE_INT),
        "layer_norm_eps": EPSILON, "initializer_range": NON_NEGATIVE_FLOAT,
    }

    def __post_init__(self, **kwargs):
        check_fields(self, self.field_ranges)
        super().__post_init__(**kwargs)


class LaVITTokenizerConfig(LaVITFolderConfig):
    r"""
    Configuration of [`LaVITTokenizerModel`], the dynamic visual tokenizer of LaVIT (paper section 3.1): a frozen
    vision encoder, a token selector, a token merger, a vector quantizer and a feature decoder.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            The frozen vision encoder. `None` or `model_type="lavit_eva_vision"` builds the built-in EVA-CLIP ViT
            ([`LaVITEvaVisionConfig`], the official encoder). Any other `model_type` (e.g. `clip_vision_model`,
            `siglip_vision_model`) builds that transformers backbone with `AutoModel.from_config`.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            For transformers backbones: index into `hidden_states` of the layer whose patch features are tokenized.
            The EVA encoder always uses the output of its last block, before the final norm (as the official code).
        image_mean (`tuple[float]`, *optional*, defaults to the OpenAI CLIP mean), image_std (same, CLIP std):
            Normalisation of `LaVITImageProcessor.from_tokenizer_config`, the official preprocessing of this tokenizer.
        selection_mode (`str`, *optional*, defaults to `"deterministic"`):
            Inference policy of the selector: `"deterministic"` keeps patches with `p_keep > selector_threshold`, so
            an image always gives the same tokens; `"sample"` draws `Bernoulli(p_keep)` per patch, the behaviour of
            the official code.
        selector_threshold (`float`, *optional*, defaults to 0.5): keep threshold of the deterministic mode.
        gumbel_temperature (`float`, *optional*, defaults to 1.0): temperature of the straight-through Gumbel-softmax
            used to select tokens in training (paper eq. 1).
        merger_num_layers (`int`, *optional*, defaults to 12), merger_num_heads (`int`, *optional*, defaults to 16),
        merger_intermediate_size (`int`, *optional*, defaults to 6144): token merger size. Its width is the encoder's.
        merger_attention (`str`, *optional*, defaults to `"exact"`):
            `"exact"` runs true masked attention on the kept tokens only (causal self-attention among kept tokens,
            cross-attention to the dropped ones) with SDPA. `"official"` reproduces the official leaky masked softmax
            over all N patches (needed for converted official weights).
        codebook_size (`int`, *optional*, defaults to 16384), code_dim (`int`, *optional*, defaults to 32):
            the l2-normalised codebook.
        codebook_decay (`float`, *optional*, defaults to 0.99): EMA decay of the codebook statistics.
        commitment_weight (`float`, *optional*, defaults to 0.25): weight of the commitment loss.
        kmeans_init (`bool`, *optional*, defaults to `True`): initialise the codebook by spherical k-means on the
            first training batch.
        kmeans_iters (`int`, *optional*, defaults to 10): k-means iterations of that initialisation.
        dead_code_threshold (`float`, *optional*, defaults to 1.0): codes whose EMA usage count falls below this are
            restarted from random encoder outputs of the current batch (0 turns restarts off).
        decoder_hidden_size (`int`, *optional*, defaults to 1408), decoder_num_layers (`int`, *optional*, defaults
        to 12), decoder_num_heads (`int`, *optional*, defaults to 16), decoder_intermediate_size (`int`, *optional*,
        defaults to 6144): the feature decoder that reconstructs all N encoder features from the codes.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the selector, merger and decoder norms.
        keep_ratio_target (`float`, *optional*, defaults to 1/3): rho of paper eq. 4, the target mean keep ratio.
        keep_ratio_weight (`float`, *optional*, defaults to 2.0): lambda of paper eq. 4.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of linear layers.
    """

    _auto_class = "AutoConfig"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    model_type = "lavit_tokenizer"
    # a sub-config, so `attn_implementation` (and dtype) given to the tokenizer or to LaVIT reach the vision encoder
    sub_configs = {"vision_config": AutoConfig}

    vision_config: dict | PretrainedConfig | None = None
    vision_feature_layer: int = -1
    image_mean: list[float] | tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = OPENAI_CLIP_STD
    selection_mode: str = "deterministic"
    selector_threshold: float = 0.5
    gumbel_temperature: float = 1.0
    merger_num_layers: int = 12
    merger_num_heads: int = 16
    merger_intermediate_size: int = 6144
    merger_attention: str = "exact"
    codebook_size: int = 16384
    code_dim: int = 32
    codebook_decay: float = 0.99
    commitment_weight: float = 0.25
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 1.0
    decoder_hidden_size: int = 1408
    decoder_num_layers: int = 12
    decoder_num_heads: int = 16
    decoder_intermediate_size: int = 6144
    layer_norm_eps: float = 1e-5
    keep_ratio_target: float = 1 / 3
    keep_ratio_weight: float = 2.0
    initializer_range: float = 0.02

    field_ranges = {
        "vision_feature_layer": Range(integer=True), "image_mean": Each(Range(), 3),
        "image_std": Each(POSITIVE_FLOAT, 3),
        "selection_mode": Choice(SELECTION_MODES), "selector_threshold": PROBABILITY,
        "gumbel_temperature": POSITIVE_FLOAT, "merger_attention": Choice(MERGER_ATTENTION_IMPLEMENTATIONS),
        **dict.fromkeys(("merger_num_layers", "merger_num_heads", "merger_intermediate_size", "codebook_size",
                         "code_dim", "decoder_hidden_size", "decoder_num_layers", "decoder_num_heads",
                         "decoder_intermediate_size"), POSITIVE_INT),
        "codebook_decay": PROBABILITY, "commitment_weight": NON_NEGATIVE_FLOAT,
        "kmeans_iters": NON_NEGATIVE_INT, "dead_code_threshold": NON_NEGATIVE_FLOAT, "layer_norm_eps": EPSILON,
        "keep_ratio_target": OPEN_FRACTION, "keep_ratio_weight": NON_NEGATIVE_FLOAT,
        "initializer_range": NON_NEGATIVE_FLOAT,
    }

    def __post_init__(self, **kwargs):
        check_fields(self, self.field_ranges)
        self.vision_config = _build_vision_config(self.vision_config)
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        # transformers writes `auto_map` entries of any class whose name contains "Tokenizer" as a (slow, fast)
        # text-tokenizer pair; this is a model and a config, so store the plain "module.Class" reference
        if "auto_map" in output:
            output["auto_map"] = {
                auto_class: reference[0] if isinstance(reference, (list, tuple)) else reference
                for auto_class, reference in output["auto_map"].items()
            }
        return output

    @property
    def vision_hidden_size(self) -> int:
        """Width of the encoder features, which is also the width of the selector, merger and decoder output."""
        return self.vision_config.hidden_size

    @property
    def hidden_size(self) -> int:
        """The model's width, as generic tools read it (DeepSpeed's `auto` bucket sizes)."""
        return self.vision_hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def uses_eva_encoder(self) -> bool:
        return isinstance(self.vision_config, LaVITEvaVisionConfig)


class LaVITConfig(LaVITFolderConfig):
    r"""
    Configuration of [`LaVITForCausalLM`] (paper section 3.2): one causal language model that reads and writes text
    and the discrete visual tokens of [`LaVITTokenizerModel`].

    LM vocabulary (official layout): ids `[0, text_vocab_size)` are text, `text_vocab_size` is `[IMG]`,
    `text_vocab_size + 1` is `[/IMG]`, and visual code `k` is `text_vocab_size + 2 + k`. With LLaMA: 32000, 32001,
    32002 + k, 48386 rows in all. One prediction head covers the whole vocabulary.

    Args:
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers causal LM config (LLaMA-2-7B with the LaVIT vocabulary by default). Its `vocab_size` must
            be at least `text_vocab_size + 2 + tokenizer_config.codebook_size`.
        tokenizer_config (`dict` or [`LaVITTokenizerConfig`], *optional*): the visual tokenizer (official defaults).
        text_vocab_size (`int`, *optional*, defaults to 32000): size of the text vocabulary; `[IMG]` comes right after.
        loss_modalities (`str`, *optional*, defaults to `"both"`): which targets the loss supervises: `"both"`,
            `"text"` (text ids only) or `"image"` (`[IMG]`, visual ids and `[/IMG]` only).
        generated_image_inputs (`str`, *optional*, defaults to `"codes"`): in training, how an image that is a
            generation target (its `[IMG]` is supervised and text precedes it in its sequence, as in text-to-image
            pairs) enters the LM: `"codes"` feeds the embeddings of its code ids, as image generation feeds the tokens
            it samples, so those embedding rows learn; `"features"` feeds the continuous merger features as every
            other image (the paper's pretraining, which leaves the visual embedding rows untrained).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie the prediction head to the LM embedding
            table (the official LaVIT checkpoints are untied).
    """

    _auto_class = "AutoConfig"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    model_type = LANGUAGE_MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "tokenizer_config": LaVITTokenizerConfig}

    text_config: dict | PretrainedConfig | None = None
    tokenizer_config: dict | LaVITTokenizerConfig | None = None
    text_vocab_size: int = 32000
    loss_modalities: str = "both"
    generated_image_inputs: str = "codes"
    tie_word_embeddings: bool = False

    field_ranges = {"text_vocab_size": POSITIVE_INT, "loss_modalities": Choice(LOSS_MODALITIES),
                    "generated_image_inputs": Choice(GENERATED_IMAGE_INPUTS)}

    def __post_init__(self, **kwargs):
        check_fields(self, self.field_ranges)
        if self.tokenizer_config is None:
            self.tokenizer_config = LaVITTokenizerConfig()
        elif isinstance(self.tokenizer_config, dict):
            self.tokenizer_config = LaVITTokenizerConfig(**self.tokenizer_config)
        self.text_config = self._build_text_config(self.text_config)
        super().__post_init__(**kwargs)

    def _build_text_config(self, text_config) -> PretrainedConfig:
        """The LM's config from a config, a dict (`model_type` llama by default) or `None` (LLaMA-2-7B with the LaVIT
        vocabulary); a `ValueError` when its vocabulary cannot hold the visual ids."""
        vocab_size = self.text_vocab_size + 2 + self.tokenizer_config.codebook_size
        if text_config is None:
            text_config = CONFIG_MAPPING["llama"](
                vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            )
        elif isinstance(text_config, dict):
            check_nested_config("text_config", text_config)  # before the config class computes with the values
            text_config = dict(text_config)
            text_config = CONFIG_MAPPING[text_config.pop("model_type", "llama")](**text_config)
        check_nested_config("text_config", text_config)
        if text_config.vocab_size < vocab_size:
            raise ValueError(
                f"text_config.vocab_size is {text_config.vocab_size}, expected at least text_vocab_size "
                f"({self.text_vocab_size}) + 2 ([IMG], [/IMG]) + codebook_size "
                f"({self.tokenizer_config.codebook_size}) = {vocab_size} (rows past the visual ids, e.g. from "
                f"resize_token_embeddings, are allowed)"
            )
        return text_config

    @property
    def image_start_token_id(self) -> int:
        """`[IMG]`: opens an image."""
        return self.text_vocab_size

    @property
    def image_end_token_id(self) -> int:
        """`[/IMG]`: closes an image; the stop token of image generation."""
        return self.text_vocab_size + 1

    @property
    def visual_token_offset(self) -> int:
        """LM id of visual code 0."""
        return self.text_vocab_size + 2

    @property
    def visual_token_end(self) -> int:
        """One past the LM id of the last visual code."""
        return self.visual_token_offset + self.tokenizer_config.codebook_size

    @property
    def vocab_size(self) -> int:
        """The LM's vocabulary (`text_config.vocab_size`); setting it sets the text config's (as
        `resize_token_embeddings` does)."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int):
        if value < self.visual_token_end:
            raise ValueError(f"vocab_size {value} would drop rows of the image vocabulary: ids "
                             f"[{self.text_vocab_size}, {self.visual_token_end}) are [IMG], [/IMG] and the visual "
                             f"codes, so at least {self.visual_token_end} rows are needed")
        self.text_config.vocab_size = value

    @property
    def vision_config(self) -> PretrainedConfig:
        """The frozen image encoder's config (`tokenizer_config.vision_config`), where vision-language tools look."""
        return self.tokenizer_config.vision_config


CONDITIONINGS = ("highres", "lowres")
# the official pixel decoders: SDXL-architecture (highres) and SD-1.5-architecture (lowres) diffusers components
SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}
_SD_VAE_BLOCKS = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32,
}
SDXL_VAE_CONFIG = {**_SD_VAE_BLOCKS, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD_VAE_CONFIG = {**_SD_VAE_BLOCKS, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
    "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 768,
}


class LaVITDetokenizerConfig(LaVITFolderConfig):
    r"""
    Configuration of [`LaVITDetokenizer`]: visual code ids -> reconstructed encoder features (a feature decoder) ->
    UNet conditions (projection heads) -> pixels (a diffusers latent diffusion UNet, VAE and scheduler). Defaults are
    the official high-resolution pixel decoder (`highres_tokenizer_decoder.bin` + `highres_pixel_decoding/`).

    Args:
        conditioning (`str`, *optional*, defaults to `"highres"`):
            `"highres"`: SDXL-style conditioning, `prompt_embeds` = the features through each of
            `prompt_projection_sizes` concatenated on channels, plus an attention-pooled vector (`text_embeds`) and
            size/crop `time_ids`; the negative condition is all zeros. `"lowres"`: SD-1.5-style, one projection; the
            negative condition is a stored embedding (`negative_context_length` rows, official: SD's empty prompt)
            in the first slots with an attention mask over them.
        codebook_size (`int`, *optional*, defaults to 16384), code_dim (`int`, *optional*, defaults to 32): the
            visual tokenizer's codebook (the detokenizer keeps a copy, so it decodes code ids on its own).
        num_patches (`int`, *optional*, defaults to 256): number of reconstructed features (the decoder's queries).
        vision_hidden_size (`int`, *optional*, defaults to 1408): width of the reconstructed features.
        decoder_hidden_size (`int`, *optional*, defaults to 1408), decoder_num_layers (`int`, *optional*, defaults
        to 12), decoder_num_heads (`int`, *optional*, defaults to 16), decoder_intermediate_size (`int`, *optional*,
        defaults to 6144): the feature decoder (same architecture as [`LaVITTokenizerConfig`]'s).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the decoder norms.
        prompt_projection_sizes (`list[int]`, *optional*): output widths of the projections whose concatenation is the
            UNet's `encoder_hidden_states`; `[768, 1280]` for highres, `[768]` for lowres.
        pooled_projection_size (`int`, *optional*, defaults to 1280), pooling_num_heads (`int`, *optional*, defaults
            to 16): the attention pooling of highres conditioning (SDXL `text_embeds`).
        negative_context_length (`int`, *optional*, defaults to 77): rows of the lowres negative embedding.
        unet_config, vae_config, scheduler_config (`dict`, *optional*): diffusers `UNet2DConditionModel`,
            `AutoencoderKL` and scheduler configs (the scheduler's `_class_name` picks its class). Default: the
            official architectures (SDXL or SD-1.5 UNet, SD VAE, DDIM).
        image_size (`int`, *optional*): default output side (1024 highres, 512 lowres).
        num_inference_steps (`int`, *optional*, defaults to 25), guidance_scale (`float`, *optional*, defaults to
            7.0): official sampling defaults of `generate_image`.
        condition_dropout (`float`, *optional*, defaults to 0.1): probability in training that an image's condition
            is replaced by the negative condition (classifier-free guidance).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of our linear layers.
    """

    _auto_class = "AutoConfig"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    model_type = "lavit_detokenizer"

    conditioning: str = "highres"
    codebook_size: int = 16384
    code_dim: int = 32
    num_patches: int = 256
    vision_hidden_size: int = 1408
    decoder_hidden_size: int = 1408
    decoder_num_layers: int = 12
    decoder_num_heads: int = 16
    decoder_intermediate_size: int = 6144
    layer_norm_eps: float = 1e-5
    prompt_projection_sizes: list[int] | None = None
    pooled_projection_size: int = 1280
    pooling_num_heads: int = 16
    negative_context_length: int = 77
    unet_config: dict | None = None
    vae_config: dict | None = None
    scheduler_config: dict | None = None
    image_size: int | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.0
    condition_dropout: float = 0.1
    initializer_range: float = 0.02

    field_ranges = {
        "conditioning": Choice(CONDITIONINGS),
        **dict.fromkeys(("codebook_size", "code_dim", "num_patches", "vision_hidden_size", "decoder_hidden_size",
                         "decoder_num_layers", "decoder_num_heads", "decoder_intermediate_size",
                         "pooled_projection_size", "pooling_num_heads",
                         "negative_context_length", "num_inference_steps"), POSITIVE_INT),
        "image_size": Range(1, integer=True, note="default: 1024 highres, 512 lowres"),
        "prompt_projection_sizes": Each(POSITIVE_INT), "layer_norm_eps": EPSILON, "guidance_scale": GUIDANCE_SCALE,
        "condition_dropout": PROBABILITY,
        "initializer_range": NON_NEGATIVE_FLOAT,
    }

    def __post_init__(self, **kwargs):
        self.field_ranges["conditioning"].check("conditioning", self.conditioning)
        # the defaults left unset are the official ones of the chosen conditioning
        highres = self.conditioning == "highres"
        if self.prompt_projection_sizes is None:
            self.prompt_projection_sizes = [768, 1280] if highres else [768]
        self.prompt_projection_sizes = list(self.prompt_projection_sizes)
        # deep copies: the config owns its nested settings (the module's defaults share their block lists)
        self.unet_config = copy.deepcopy(dict(self.unet_config or (SDXL_UNET_CONFIG if highres else SD_UNET_CONFIG)))
        self.vae_config = copy.deepcopy(dict(self.vae_config or (SDXL_VAE_CONFIG if highres else SD_VAE_CONFIG)))
        self.scheduler_config = copy.deepcopy(dict(self.scheduler_config or SD_SCHEDULER_CONFIG))
        self.image_size = (1024 if highres else 512) if self.image_size is None else self.image_size
        check_fields(self, self.field_ranges)
        for name in ("unet_config", "vae_config", "scheduler_config"):
            check_nested_config(name, getattr(self, name))
        super().__post_init__(**kwargs)
        self.check_unet_fits()

    @property
    def hidden_size(self) -> int:
        """The model's width, as generic tools read it (DeepSpeed's `auto` bucket sizes): the widest of the feature
        decoder and the UNet blocks."""
        return max(self.decoder_hidden_size, *self.unet_config.get("block_out_channels", [0]))

    def check_unet_fits(self) -> None:
        """Raises `ValueError` when the UNet config does not take the conditions these settings build (cross-attention
        width, SDXL added embeddings, lowres negative context); run again after replacing `unet_config`."""
        cross_attention_dim = self.unet_config.get("cross_attention_dim", 1280)
        if sum(self.prompt_projection_sizes) != cross_attention_dim:
            raise ValueError(f"prompt_projection_sizes {self.prompt_projection_sizes} sum to "
                             f"{sum(self.prompt_projection_sizes)}, but the UNet's cross_attention_dim is "
                             f"{cross_attention_dim}")
        if self.conditioning == "highres":
            if self.unet_config.get("addition_embed_type") != "text_time":
                raise ValueError("highres conditioning needs an SDXL-style UNet (addition_embed_type='text_time')")
            expected = 6 * self.unet_config["addition_time_embed_dim"] + self.pooled_projection_size
            if self.unet_config.get("projection_class_embeddings_input_dim") != expected:
                raise ValueError(f"the UNet's projection_class_embeddings_input_dim must be 6 * addition_time_embed_dim"
                                 f" + pooled_projection_size = {expected}, got "
                                 f"{self.unet_config.get('projection_class_embeddings_input_dim')}")
        elif not 1 <= self.negative_context_length <= self.num_patches:
            raise ValueError(f"negative_context_length must be in [1, num_patches={self.num_patches}], "
                             f"got {self.negative_context_length}")

    @classmethod
    def from_tokenizer_config(cls, tokenizer_config: LaVITTokenizerConfig, **kwargs) -> "LaVITDetokenizerConfig":
        """A detokenizer whose codebook and feature decoder have the sizes of `tokenizer_config`'s."""
        sizes = {
            name: getattr(tokenizer_config, name)
            for name in ("codebook_size", "code_dim", "num_patches", "vision_hidden_size", "decoder_hidden_size",
                         "decoder_num_layers", "decoder_num_heads", "decoder_intermediate_size", "layer_norm_eps")
        }
        return cls(**{**sizes, **kwargs})


def config_field_problems(config_class, config_dict: dict, prefix: str = "") -> list[str]:
    """What is wrong with the fields of `config_dict` for `config_class`, by name: a derived value given as a setting
    (a property such as `patch_size`), a value of the wrong type for a plain `int`/`float`/`bool`/`str` field, and
    the same inside LaVIT sub-configs. Used to explain a failed load, not to validate ranges."""
    problems = []
    annotations = {}
    for klass in reversed(config_class.__mro__):
        annotations.update(getattr(klass, "__annotations__", {}))
    for name, value in config_dict.items():
        # a property of a LaVIT config (not of `PretrainedConfig`, whose own properties are saved and read back)
        if any(isinstance(vars(klass).get(name), property) for klass in config_class.__mro__
               if klass.__module__ == __name__):
            problems.append(f"{prefix}{name} is derived from other settings, not a setting: remove it")
            continue
        expected = annotations.get(name)
        sub_config = getattr(config_class, "sub_configs", {}).get(name)
        if isinstance(value, dict) and isinstance(sub_config, type) and issubclass(sub_config, LaVITFolderConfig):
            problems += config_field_problems(sub_config, value, f"{prefix}{name}.")
        elif expected in (int, float, bool, str) and value is not None and not (
                isinstance(value, expected) or (expected is float and isinstance(value, int))) or (
                expected in (int, float) and isinstance(value, bool)):
            problems.append(f"{prefix}{name} must be {'a' if expected is not int else 'an'} {expected.__name__}, "
                            f"got {value!r}: fix it in config.json")
    return problems


def _build_vision_config(vision_config) -> PretrainedConfig:
    if vision_config is None:
        return LaVITEvaVisionConfig()
    if isinstance(vision_config, PretrainedConfig):
        return vision_config
    if not isinstance(vision_config, dict):
        raise TypeError(f"vision_config must be a dict, a PretrainedConfig or None, got {type(vision_config)}")
    vision_config = dict(vision_config)
    model_type = vision_config.pop("model_type", LaVITEvaVisionConfig.model_type)
    if model_type == LaVITEvaVisionConfig.model_type:
        return LaVITEvaVisionConfig(**vision_config)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"vision_config has unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type](**vision_config)


__all__ = ["LaVITConfig", "LaVITDetokenizerConfig", "LaVITEvaVisionConfig", "LaVITImageSelection",
           "LaVITTokenizerConfig"]
