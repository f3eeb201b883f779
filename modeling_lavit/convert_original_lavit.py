"""Official LaVIT checkpoints (key names of `jy0205/LaVIT`) -> this package's modules.

The official `DynamicVisualTokenizer` state dict holds `encoder.*` (EVA ViT), `token_predictor.*` (selector),
`causal_encoder.*` (merger), `quantize.embedding.weight` and `encode_task_layer.*`; the feature decoder files
(`tokenizer_decoder.bin`, `highres_tokenizer_decoder.bin`) hold the decoder without a prefix. Every key is either
renamed by a rule below or listed as not used by the tokenizer; anything else is an error, so a wrong prefix can never
be skipped silently (the official loader uses `strict=False`).
"""

import contextlib
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.utils import logging

from .configuration_lavit import LaVITConfig, LaVITDetokenizerConfig, LaVITEvaVisionConfig, LaVITTokenizerConfig
from .modeling_lavit import LaVITForCausalLM
from .modeling_lavit_detokenizer import LaVITDetokenizer, public_config, require_diffusers
from .modeling_lavit_tokenizer import LaVITTokenizerModel
from .saving_lavit import loads_json

logger = logging.get_logger(__name__)

_ATTENTION_LAYER_RULES = [
    (r"norm0\.", "self_attn_norm."),
    (r"norm1\.", "cross_attn_norm."),
    (r"norm2\.", "mlp_norm."),
    (r"(token_causal_attn|self_attn)\.qkv\.", "self_attn.qkv."),
    (r"(token_causal_attn|self_attn)\.proj\.", "self_attn.out_proj."),
    (r"(token_cross_attn|cross_attn)\.query\.", "cross_attn.q_proj."),
    (r"(token_cross_attn|cross_attn)\.key\.", "cross_attn.k_proj."),
    (r"(token_cross_attn|cross_attn)\.value\.", "cross_attn.v_proj."),
    (r"(token_cross_attn|cross_attn)\.proj\.", "cross_attn.out_proj."),
    (r"mlp\.", "mlp."),
]

TOKENIZER_RULES = [
    (r"^encoder\.cls_token$", "vision_model.embeddings.cls_token"),
    (r"^encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.layers.\1.layer_norm1."),
    (r"^encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.layers.\1.layer_norm2."),
    (r"^encoder\.blocks\.(\d+)\.attn\.", r"vision_model.layers.\1.attn."),
    (r"^encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.layers.\1.mlp."),
    (r"^token_predictor\.in_conv\.0\.", "selector.layer_norm."),
    (r"^token_predictor\.in_conv\.1\.", "selector.in_proj."),
    (r"^token_predictor\.out_conv\.0\.", "selector.fc1."),
    (r"^token_predictor\.out_conv\.2\.", "selector.fc2."),
    (r"^token_predictor\.out_conv\.4\.", "selector.classifier."),
    (r"^causal_encoder\.ln_vision\.", "merger.context_norm."),
    (r"^causal_encoder\.norm\.", "merger.norm."),
    *[(rf"^causal_encoder\.blocks\.(\d+)\.{old}", rf"merger.layers.\1.{new}") for old, new in _ATTENTION_LAYER_RULES],
    (r"^quantize\.embedding\.weight$", "quantizer.codebook"),
    (r"^encode_task_layer\.", "quantizer.project_in."),
]
# present in the official tokenizer file but not part of the tokenizer: the EVA final norm and CLIP head are never
# applied by LaVIT, and `vit_proj` maps merger outputs into the LM (it belongs to `LaVITForCausalLM`)
TOKENIZER_UNUSED = [r"^encoder\.norm\.", r"^encoder\.head\.", r"^vit_proj\."]

DECODER_RULES = [
    (r"^pos_embed$", "decoder.position_embedding"),
    (r"^query_embed$", "decoder.query_embedding"),
    (r"^in_proj\.", "decoder.in_proj."),
    (r"^norm\.", "decoder.norm."),
    (r"^decode_task_layer\.", "decoder.project_out."),
    *[(rf"^blocks\.(\d+)\.{old}", rf"decoder.layers.\1.{new}") for old, new in _ATTENTION_LAYER_RULES],
]
# the UNet conditioning heads of the pixel decoders belong to the detokenizer
DECODER_UNUSED = [r"^unet_proj", r"^unet_attnpool\."]


def rename_keys(state_dict, rules, unused_patterns, source: str) -> dict[str, torch.Tensor]:
    """Applies the first matching rule to every key; raises on keys that neither a rule nor `unused` covers."""
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            if re.search(pattern, key):
                renamed[re.sub(pattern, replacement, key, count=1)] = tensor
                break
        else:
            if not any(re.search(pattern, key) for pattern in unused_patterns):
                unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) match no official LaVIT name: {unknown[:10]}")
    return renamed


# `language_model/visual_weight.bin`: the merger trained with the LM and `vit_proj`, the projection into the LM width
LM_VISUAL_RULES = [
    (r"^causal_encoder\.ln_vision\.", "visual_merger.context_norm."),
    (r"^causal_encoder\.norm\.", "visual_merger.norm."),
    *[
        (rf"^causal_encoder\.blocks\.(\d+)\.{old}", rf"visual_merger.layers.\1.{new}")
        for old, new in _ATTENTION_LAYER_RULES
    ],
    (r"^vit_proj\.", "visual_projection."),
]


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads an official checkpoint file: `<name>.safetensors` if present, else the `.bin` pickle with
    `torch.load(weights_only=True)` (tensors only, no code execution), memory-mapped where the file allows it, so
    its tensors are read from disk when used instead of all at once."""
    path = Path(path)
    safetensors_path = path.with_suffix(".safetensors")
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(safetensors_path)
    if not path.is_file():
        raise FileNotFoundError(f"official LaVIT checkpoint file not found: {path}")
    state_dict = load_tensor_pickle(path)
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)] \
        if isinstance(state_dict, dict) else []
    if not isinstance(state_dict, dict) or not_tensors:
        found = f"entries that are not tensors ({not_tensors[:3]})" if not_tensors else type(state_dict).__name__
        raise ValueError(f"{path} holds {found}, expected a plain state dict (names -> tensors)")
    return state_dict


def load_tensor_pickle(path: Path):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code; memory-mapped where the file's
    format allows, so converting a release holds one shard at a time. A file holding other objects (or no PyTorch data)
    gets a `ValueError` that names it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) pickle format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # unpickling fails in many ways (UnpicklingError, struct.error, EOFError, ...)
        raise ValueError(f"{path} is not a plain PyTorch state dict: it holds Python objects other than tensors, or "
                         f"is not a PyTorch file ({type(error).__name__}); save a plain state dict or safetensors "
                         f"where it was made") from None


def convert_original_lm_visual_state_dict(state_dict) -> dict[str, torch.Tensor]:
    """`visual_weight.bin` keys -> `LaVITModel` keys (`visual_merger.*`, `visual_projection.*`)."""
    return rename_keys(state_dict, LM_VISUAL_RULES, [], "visual_weight state dict")


def convert_original_tokenizer_state_dict(state_dict, decoder_state_dict=None) -> dict[str, torch.Tensor]:
    converted = rename_keys(state_dict, TOKENIZER_RULES, TOKENIZER_UNUSED, "tokenizer state dict")
    if decoder_state_dict is not None:
        converted.update(rename_keys(decoder_state_dict, DECODER_RULES, DECODER_UNUSED, "decoder state dict"))
    return converted


def count_blocks(state_dict, prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"^{prefix}(\d+)\.", key))}
    if not indices:
        raise ValueError(f"no keys start with {prefix!r}<index>.")
    return max(indices) + 1


def _require(state_dict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"{source} has no tensor {key!r}")
    return state_dict[key]


def original_tokenizer_config(
    state_dict, decoder_state_dict=None, *, vision_num_heads=16, merger_num_heads=16, decoder_num_heads=16, **overrides
) -> LaVITTokenizerConfig:
    """A [`LaVITTokenizerConfig`] whose sizes are read from the official tensors (head counts are not in shapes)."""
    source = "tokenizer state dict"
    patch_weight = _require(state_dict, "encoder.patch_embed.proj.weight", source)  # (D, C, p, p)
    num_positions = _require(state_dict, "encoder.pos_embed", source).shape[1]
    grid = round((num_positions - 1) ** 0.5)
    if grid * grid != num_positions - 1:
        raise ValueError(f"encoder.pos_embed has {num_positions} rows, expected 1 + a square number of patches")
    hidden_size, num_channels, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    vision_config = LaVITEvaVisionConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=count_blocks(state_dict, r"encoder\.blocks\."),
        num_attention_heads=vision_num_heads,
        intermediate_size=_require(state_dict, "encoder.blocks.0.mlp.fc1.weight", source).shape[0],
    )
    codebook = _require(state_dict, "quantize.embedding.weight", source)
    sizes = dict(
        vision_config=vision_config,
        merger_num_layers=count_blocks(state_dict, r"causal_encoder\.blocks\."),
        merger_num_heads=merger_num_heads,
        merger_intermediate_size=_require(state_dict, "causal_encoder.blocks.0.mlp.fc1.weight", source).shape[0],
        merger_attention="official",
        codebook_size=codebook.shape[0],
        code_dim=codebook.shape[1],
        # without a decoder checkpoint, a fresh decoder gets the merger's sizes
        decoder_hidden_size=hidden_size,
        decoder_num_layers=count_blocks(state_dict, r"causal_encoder\.blocks\."),
        decoder_num_heads=decoder_num_heads,
        decoder_intermediate_size=_require(state_dict, "causal_encoder.blocks.0.mlp.fc1.weight", source).shape[0],
    )
    if decoder_state_dict is not None:
        source = "decoder state dict"
        decoder_in = _require(decoder_state_dict, "in_proj.weight", source)  # (decoder width, code_dim)
        decoder_out = _require(decoder_state_dict, "decode_task_layer.2.weight", source)
        queries = _require(decoder_state_dict, "query_embed", source).shape[1]
        if decoder_in.shape[1] != codebook.shape[1] or decoder_out.shape[0] != hidden_size or queries != grid * grid:
            raise ValueError(
                f"decoder does not match the tokenizer: code dim {decoder_in.shape[1]} vs {codebook.shape[1]}, "
                f"output width {decoder_out.shape[0]} vs {hidden_size}, queries {queries} vs {grid * grid}"
            )
        sizes.update(
            decoder_hidden_size=decoder_in.shape[0],
            decoder_num_layers=count_blocks(decoder_state_dict, r"blocks\."),
            decoder_intermediate_size=_require(decoder_state_dict, "blocks.0.mlp.fc1.weight", source).shape[0],
        )
    sizes.update(overrides)
    return LaVITTokenizerConfig(**sizes)


def convert_tokenizer(
    state_dict: dict[str, torch.Tensor],
    decoder_state_dict: dict[str, torch.Tensor] | None = None,
    *,
    vision_num_heads: int = 16,
    merger_num_heads: int = 16,
    decoder_num_heads: int = 16,
    **config_overrides,
) -> LaVITTokenizerModel:
    """
    Builds a tokenizer from the official key names (`DynamicVisualTokenizer` state dict: `encoder.*`,
    `token_predictor.*`, `causal_encoder.*`, `quantize.*`, `encode_task_layer.*`; optionally the feature decoder
    of `tokenizer_decoder.bin` / `highres_tokenizer_decoder.bin`). Every dimension but the head counts is read
    from tensor shapes; the merger uses the `official` attention. Unknown keys raise; the CLIP head and final norm
    of the encoder, `vit_proj` (LM side) and the decoder's UNet projections (detokenizer side) are not used here.
    Without `decoder_state_dict` the feature decoder is randomly initialised (with a warning). Returns the model in
    eval mode.
    """
    config = original_tokenizer_config(
        state_dict,
        decoder_state_dict,
        vision_num_heads=vision_num_heads,
        merger_num_heads=merger_num_heads,
        decoder_num_heads=decoder_num_heads,
        **config_overrides,
    )
    model = LaVITTokenizerModel(config)
    converted = convert_original_tokenizer_state_dict(state_dict, decoder_state_dict)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    derived = {"quantizer.ema_code_sum", "quantizer.ema_cluster_size", "quantizer.initialized"}
    missing = [key for key in missing if key not in derived and (decoder_state_dict or "decoder." not in key)]
    if missing or unexpected:
        raise ValueError(f"official state dict does not fit: missing {missing}, unexpected {unexpected}")
    # the EMA statistics start from the official codebook, so that further training moves it smoothly
    with torch.no_grad():
        model.quantizer.ema_code_sum.copy_(model.quantizer.codebook)
        model.quantizer.ema_cluster_size.fill_(1.0)
        model.quantizer.initialized.fill_(True)
    if decoder_state_dict is None:
        logger.warning("no decoder_state_dict given: the feature decoder is randomly initialised")
    return model.eval()


# the release's `language_model/`: a transformers causal LM (LLaMA), `model.*` + `lm_head.*`
LM_RULES = [(r"^model\.", "model.language_model."), (r"^lm_head\.", "lm_head.")]


def iter_lm_checkpoint(folder: str | os.PathLike) -> Iterator[dict[str, torch.Tensor]]:
    """The state dict of a transformers checkpoint folder one weight file at a time, in `LaVITForCausalLM` key names
    (`LM_RULES`): sharded or single, safetensors or `.bin`, so that at most one shard is read at once."""
    folder = Path(folder)
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            weight_map = loads_json((folder / index_name).read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
            break
        if (folder / single_name).is_file():
            files = [folder / single_name]
            break
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    for path in files:
        yield rename_keys(load_original_state_dict(path), LM_RULES, [], str(path))


def assign_tensors(module: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> set[str]:
    """Puts converted tensors into `module` (built on the meta device) as its parameters and buffers, cast to `dtype`
    (floating tensors only; no copy where a tensor has it already, so a bf16 release is never held in float32).
    Returns the keys assigned; raises on keys the module does not have and on shape mismatches."""
    unexpected = sorted(set(state_dict) - set(module.state_dict(keep_vars=True)))
    if unexpected:
        raise ValueError(f"{len(unexpected)} converted key(s) are not in {type(module).__name__}: {unexpected[:10]}")
    if dtype is not None:
        state_dict = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    module.load_state_dict(state_dict, strict=False, assign=True)
    return set(state_dict)


def materialize_unsaved_buffers(model: nn.Module):
    """Modules built on the meta device whose non-persistent buffers (e.g. rotary frequencies, computed from the
    config and never saved) are still on it are built again from their `config` on the CPU."""
    for name, module in list(model.named_modules()):
        buffers = [module._buffers[key] for key in module._non_persistent_buffers_set if key in module._buffers]
        if any(buffer is not None and buffer.is_meta for buffer in buffers) and hasattr(module, "config"):
            with torch.device("cpu"):
                model.set_submodule(name, type(module)(config=module.config))


def check_materialized(model: nn.Module):
    """Raises naming every parameter or buffer that no official tensor filled (still on the meta device)."""
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"the official release does not fill {len(missing)} tensor(s): {missing[:10]}")


# the UNet conditioning heads of the pixel decoder files -> `LaVITDetokenizer.condition`
DETOKENIZER_HEAD_RULES = [
    (r"^unet_proj\.", "condition.prompt_projections.0."),
    (r"^unet_proj_1\.", "condition.prompt_projections.0."),
    (r"^unet_proj_2\.", "condition.prompt_projections.1."),
    (r"^unet_attnpool\.positional_embedding$", "condition.pooling.position_embedding"),
    (r"^unet_attnpool\.(q|k|v)_proj\.", r"condition.pooling.\1_proj."),
    (r"^unet_attnpool\.c_proj\.", "condition.pooling.out_proj."),
]


def original_detokenizer_config(
    decoder_state_dict, codebook, negative_prompt_embeds=None, *, decoder_num_heads=16, pooling_num_heads=16,
    **overrides,
):
    """A [`LaVITDetokenizerConfig`] whose sizes are read from an official pixel decoder file (`unet_proj_1` keys:
    highres, `unet_proj`: lowres) and the codebook (head counts are not in shapes)."""
    unknown = sorted(set(overrides) - set(inspect.signature(LaVITDetokenizerConfig.__init__).parameters))
    if unknown:
        raise TypeError(f"unknown LaVITDetokenizerConfig argument(s) {unknown}")
    source = "decoder state dict"
    highres = "unet_proj_1.weight" in decoder_state_dict
    if not highres and "unet_proj.weight" not in decoder_state_dict:
        raise ValueError("decoder state dict has neither unet_proj (lowres) nor unet_proj_1 (highres) weights")
    projections = ["unet_proj_1", "unet_proj_2"] if highres else ["unet_proj"]
    projection_sizes = [_require(decoder_state_dict, f"{name}.weight", source).shape[0] for name in projections]
    sizes = dict(
        conditioning="highres" if highres else "lowres",
        codebook_size=codebook.shape[0],
        code_dim=codebook.shape[1],
        num_patches=_require(decoder_state_dict, "query_embed", source).shape[1],
        vision_hidden_size=_require(decoder_state_dict, "decode_task_layer.2.weight", source).shape[0],
        decoder_hidden_size=_require(decoder_state_dict, "in_proj.weight", source).shape[0],
        decoder_num_layers=count_blocks(decoder_state_dict, r"blocks\."),
        decoder_num_heads=decoder_num_heads,
        decoder_intermediate_size=_require(decoder_state_dict, "blocks.0.mlp.fc1.weight", source).shape[0],
        prompt_projection_sizes=projection_sizes,
        pooling_num_heads=pooling_num_heads,
    )
    if highres:
        sizes["pooled_projection_size"] = _require(decoder_state_dict, "unet_attnpool.c_proj.weight", source).shape[0]
    elif negative_prompt_embeds is not None:
        sizes["negative_context_length"] = negative_prompt_embeds.reshape(-1, projection_sizes[0]).shape[0]
    sizes.update(overrides)
    return LaVITDetokenizerConfig(**sizes)


def convert_original_detokenizer_state_dict(decoder_state_dict, codebook, negative_prompt_embeds=None):
    """An official pixel decoder file + the codebook (+ the lowres `uncond_embeddings.bin`) -> `LaVITDetokenizer`
    keys (all but `unet.*` and `vae.*`)."""
    converted = rename_keys(decoder_state_dict, DECODER_RULES + DETOKENIZER_HEAD_RULES, [], "decoder state dict")
    converted["codebook"] = codebook
    if negative_prompt_embeds is not None:
        width = converted["condition.prompt_projections.0.weight"].shape[0]
        converted["negative_prompt_embeds"] = negative_prompt_embeds.reshape(1, -1, width)
    return converted


def detokenizer_from_original_state_dict(
    decoder_state_dict: dict[str, torch.Tensor],
    codebook: torch.Tensor,
    *,
    decoder_num_heads: int = 16,
    pooling_num_heads: int = 16,
    negative_prompt_embeds: torch.Tensor | None = None,
    diffusers_folder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
):
    """
    Builds a [`LaVITDetokenizer`] from an official decoder file (`tokenizer_decoder.bin`: lowres, or
    `highres_tokenizer_decoder.bin`: highres, told apart by their keys) and the tokenizer's codebook
    (`quantize.embedding.weight`). Sizes are read from the tensors; every key must be used (`ValueError` otherwise).
    The UNet, VAE and scheduler are loaded from `diffusers_folder` (without building random ones first, directly in
    `dtype`), or built from `config_kwargs` (`unet_config`, ...) and left randomly initialised.
    """
    # 1. config from the tensor shapes
    config = original_detokenizer_config(decoder_state_dict, codebook, negative_prompt_embeds,
                                         decoder_num_heads=decoder_num_heads, pooling_num_heads=pooling_num_heads,
                                         **config_kwargs)
    lowres = config.conditioning == "lowres"
    if diffusers_folder is not None and lowres and negative_prompt_embeds is None:
        raise ValueError("a lowres detokenizer loaded from a diffusers folder needs negative_prompt_embeds "
                         "(the official pixel_decoding/uncond_embeddings.bin)")
    # 2. the model: with a diffusers folder, built on the meta device, our weights assigned below and the UNet and
    #    VAE replaced by the folder's, so no multi-GB random UNet is ever materialised
    with torch.device("meta") if diffusers_folder is not None else contextlib.nullcontext():
        model = LaVITDetokenizer(config)
    # 3. our weights, every one of them filled
    converted = convert_original_detokenizer_state_dict(decoder_state_dict, codebook, negative_prompt_embeds)
    own = {key for key in model.state_dict() if not key.startswith(("unet.", "vae."))}
    missing = own - set(converted) - ({"negative_prompt_embeds"} if negative_prompt_embeds is None else set())
    if missing:
        raise ValueError(f"official decoder state dict does not fit: missing {sorted(missing)}")
    model.load_state_dict({key: value.to(dtype) for key, value in converted.items()}, strict=False,
                          assign=diffusers_folder is not None)
    # 4. the diffusers components
    if diffusers_folder is None:
        model = model.to(dtype)
    else:
        model.load_diffusers_components(diffusers_folder)
    if lowres and negative_prompt_embeds is None:
        logger.warning("no negative_prompt_embeds given: the lowres negative condition is random")
    return model.eval()


def convert_detokenizer(release_folder: str | os.PathLike, conditioning: str = "highres", **kwargs):
    """
    Builds the [`LaVITDetokenizer`] of an official LaVIT release folder:
    `visual_tokenizer/highres_tokenizer_decoder.bin` + `highres_pixel_decoding/` (highres), or
    `visual_tokenizer/tokenizer_decoder.bin` + `pixel_decoding/` with `uncond_embeddings.bin` (lowres); the codebook
    from `visual_tokenizer/tokenizer_encoder.bin`. `kwargs` go to [`detokenizer_from_original_state_dict`]
    (`decoder_num_heads`, `pooling_num_heads`, `dtype`, config overrides).
    Needs diffusers; raises `FileNotFoundError` naming a missing file and `ValueError` on files that do not fit.
    """
    require_diffusers()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # 1. the release's files for this conditioning
    if conditioning not in ("highres", "lowres"):
        raise ValueError(f"conditioning must be 'highres' or 'lowres', got {conditioning!r}")
    release_folder = Path(release_folder)
    highres = conditioning == "highres"
    decoder_file = "highres_tokenizer_decoder.bin" if highres else "tokenizer_decoder.bin"
    diffusers_folder = release_folder / ("highres_pixel_decoding" if highres else "pixel_decoding")
    decoder_state = load_original_state_dict(release_folder / "visual_tokenizer" / decoder_file)
    encoder_state = load_original_state_dict(release_folder / "visual_tokenizer" / "tokenizer_encoder.bin")
    if "quantize.embedding.weight" not in encoder_state:
        raise ValueError("tokenizer_encoder.bin has no quantize.embedding.weight (the codebook)")
    codebook = encoder_state["quantize.embedding.weight"]
    negative = None if highres else load_negative_prompt_embeds(diffusers_folder / "uncond_embeddings.bin")
    # 2. the UNet and VAE configs of the diffusers folder, then the model
    unet_config = dict(UNet2DConditionModel.load_config(diffusers_folder, subfolder="unet"))
    vae_config = dict(AutoencoderKL.load_config(diffusers_folder, subfolder="vae"))
    return detokenizer_from_original_state_dict(
        decoder_state, codebook, negative_prompt_embeds=negative, diffusers_folder=diffusers_folder,
        unet_config=public_config(unet_config), vae_config=public_config(vae_config),
        image_size=vae_config.get("sample_size"), **kwargs,
    )


def load_negative_prompt_embeds(path: Path) -> torch.Tensor:
    """The official lowres negative condition (`pixel_decoding/uncond_embeddings.bin`: one tensor)."""
    if not path.is_file():
        raise FileNotFoundError(f"official LaVIT checkpoint file not found: {path}")
    negative = load_tensor_pickle(path)
    if not isinstance(negative, torch.Tensor):
        raise ValueError(f"{path} holds a {type(negative).__name__}, expected a tensor")
    return negative


# ----------------------------------------------------------------------------------------------- a whole release


def convert_release(
    model_path: str | os.PathLike,
    *,
    pixel_decoder: str | None = "highres",
    dtype: torch.dtype | None = None,
    vision_num_heads: int = 16,
    merger_num_heads: int = 16,
    decoder_num_heads: int = 16,
):
    """
    Builds the model from an official LaVIT release folder (`rain1011/LaVIT-7B-v1` / `-v2` layout):
    `language_model/` (HF LLaMA with the 48386-row vocabulary, plus `visual_weight.bin`: LM-side merger and
    `vit_proj`) and `visual_tokenizer/` (`eva_vitg_psz14.bin`, `tokenizer_encoder.bin`, and the feature decoder
    `highres_tokenizer_decoder.bin` or `tokenizer_decoder.bin` picked by `pixel_decoder`, or none with `None`).
    `.bin` files load with `torch.load(weights_only=True)`; a `.safetensors` file of the same name wins. Every
    official tensor is either mapped or known to be unused; the merger keeps the official attention arithmetic.

    Returns `(model, detokenizer)`: a [`LaVITForCausalLM`] in eval mode, and the pixel decoder where the release has
    the matching diffusers folder (`highres_pixel_decoding/` or `pixel_decoding/`) and diffusers is installed (see
    [`convert_detokenizer`]), else `None` (`LaVITPipeline.from_detokenizer(model, processor, detokenizer)` puts them
    together).
    Raises `ValueError` for a `pixel_decoder` other than `"highres"`, `"lowres"` or `None` and for tensors that do
    not fit; `FileNotFoundError` for missing checkpoint files.
    """
    model_path = Path(model_path)
    # 1. the tokenizer's official tensors, and the configuration read from their shapes
    tokenizer_state, decoder_state = _load_release_tokenizer(model_path / "visual_tokenizer", pixel_decoder)
    config = _release_config(model_path, tokenizer_state, decoder_state, vision_num_heads, merger_num_heads,
                             decoder_num_heads)
    # 2. built on the meta device and filled file by file (LM shard by shard, memory-mapped): peak memory stays
    # near the size of the weights, and a bf16 release is never held in float32
    with torch.device("meta"):
        model = LaVITForCausalLM(config)
    for shard in iter_lm_checkpoint(model_path / "language_model"):
        if dtype is None:  # the release's own dtype
            dtype = next(value.dtype for value in shard.values() if value.is_floating_point())
        assign_tensors(model, shard, dtype)
    # 3. the frozen visual tokenizer
    assign_tensors(model.model.visual_tokenizer, convert_original_tokenizer_state_dict(tokenizer_state, decoder_state),
                   dtype)
    del tokenizer_state, decoder_state
    # 4. the LM-side merger and projection
    _assign_lm_visual_weights(model, model_path / "language_model" / "visual_weight.bin", dtype)
    # 5. what no file holds: the quantizer's EMA state, unsaved buffers, tied weights; then every tensor is filled
    fill_derived_tokenizer_tensors(model.model.visual_tokenizer, dtype)
    materialize_unsaved_buffers(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    check_materialized(model)
    # 6. the pixel decoder, where the release has its diffusers folder
    detokenizer = _release_detokenizer(model_path, pixel_decoder, decoder_num_heads, dtype)
    return model.eval(), detokenizer


def _load_release_tokenizer(tokenizer_folder: Path, pixel_decoder: str | None):
    """The official tokenizer state dict (EVA encoder under `encoder.`) and the chosen feature decoder's, or None."""
    tokenizer_state = {f"encoder.{key}": value
                       for key, value in load_original_state_dict(tokenizer_folder / "eva_vitg_psz14.bin").items()}
    tokenizer_state.update(load_original_state_dict(tokenizer_folder / "tokenizer_encoder.bin"))
    if pixel_decoder is None:
        return tokenizer_state, None
    if pixel_decoder not in ("highres", "lowres"):
        raise ValueError(f"pixel_decoder must be 'highres', 'lowres' or None, got {pixel_decoder!r}")
    name = "highres_tokenizer_decoder.bin" if pixel_decoder == "highres" else "tokenizer_decoder.bin"
    return tokenizer_state, load_original_state_dict(tokenizer_folder / name)


def _release_config(model_path: Path, tokenizer_state, decoder_state, vision_num_heads, merger_num_heads,
                    decoder_num_heads):
    """The [`LaVITConfig`] of a release: the tokenizer's sizes from its tensors, the LM's from `language_model/`."""
    tokenizer_config = original_tokenizer_config(
        tokenizer_state, decoder_state, vision_num_heads=vision_num_heads, merger_num_heads=merger_num_heads,
        decoder_num_heads=decoder_num_heads,
    )
    text_config = AutoConfig.from_pretrained(model_path / "language_model")
    return LaVITConfig(
        text_config=text_config, tokenizer_config=tokenizer_config,
        text_vocab_size=text_config.vocab_size - 2 - tokenizer_config.codebook_size,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _assign_lm_visual_weights(model: nn.Module, path: Path, dtype: torch.dtype | None):
    """Fills `model.model.visual_merger` and `visual_projection` from `visual_weight.bin`, which must hold exactly
    them."""
    lm_visual_state = convert_original_lm_visual_state_dict(load_original_state_dict(path))
    expected = {key for key in model.model.state_dict() if key.startswith(("visual_merger.", "visual_projection."))}
    if set(lm_visual_state) != expected:
        raise ValueError(f"visual_weight.bin does not fit: missing {sorted(expected - set(lm_visual_state))}, "
                         f"unexpected {sorted(set(lm_visual_state) - expected)}")
    assign_tensors(model.model, lm_visual_state, dtype)


def fill_derived_tokenizer_tensors(visual_tokenizer: nn.Module, dtype: torch.dtype | None):
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


def _release_detokenizer(model_path: Path, pixel_decoder: str | None, decoder_num_heads: int, dtype):
    """The release's pixel decoder for `pixel_decoder`, or None where its diffusers folder is missing."""
    if pixel_decoder is None:
        return None
    diffusers_folder = model_path / ("highres_pixel_decoding" if pixel_decoder == "highres" else "pixel_decoding")
    if not diffusers_folder.is_dir():
        return None
    return convert_detokenizer(
        model_path, conditioning=pixel_decoder, decoder_num_heads=decoder_num_heads,
        pooling_num_heads=decoder_num_heads, dtype=dtype,
    )


__all__ = [
    "assign_tensors",
    "check_materialized",
    "convert_detokenizer",
    "convert_original_detokenizer_state_dict",
    "convert_original_lm_visual_state_dict",
    "convert_original_tokenizer_state_dict",
    "convert_release",
    "convert_tokenizer",
    "count_blocks",
    "detokenizer_from_original_state_dict",
    "fill_derived_tokenizer_tensors",
    "iter_lm_checkpoint",
    "load_original_state_dict",
    "materialize_unsaved_buffers",
    "original_detokenizer_config",
    "original_tokenizer_config",
    "rename_keys",
]
