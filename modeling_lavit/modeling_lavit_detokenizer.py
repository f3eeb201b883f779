"""LaVIT's pixel detokenizer: visual code ids -> reconstructed encoder features -> latent diffusion -> pixels.

The official code ships two pixel decoders (`LaVIT/models/modeling_decoder.py` and the diffusers folders
`pixel_decoding/` and `highres_pixel_decoding/`): a feature decoder reconstructs the N encoder features of an image from
its variable number of codes, projection heads turn them into the conditions of a diffusers UNet, and the UNet denoises
VAE latents. diffusers is an optional dependency: this file imports without it, and building a detokenizer asks for it.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging
from transformers.utils.logging import tqdm

from .configuration_lavit import LaVITDetokenizerConfig
from .convert_original_lavit import (
    DECODER_RULES,
    count_blocks,
    load_original_state_dict,
    load_tensor_pickle,
    rename_keys,
)
from .modeling_lavit_tokenizer import LaVITFeatureDecoder, check_packed_code_ids

try:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
except ImportError:
    diffusers = None

logger = logging.get_logger(__name__)

# the official highres decoder supports these (height, width) sizes (README / notebooks of the official code)
OFFICIAL_HIGHRES_SIZES = ((1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1216, 832), (1152, 896))

DETOKENIZER_HEAD_RULES = [
    (r"^unet_proj\.", "condition.prompt_projections.0."),
    (r"^unet_proj_1\.", "condition.prompt_projections.0."),
    (r"^unet_proj_2\.", "condition.prompt_projections.1."),
    (r"^unet_attnpool\.positional_embedding$", "condition.pooling.position_embedding"),
    (r"^unet_attnpool\.(q|k|v)_proj\.", r"condition.pooling.\1_proj."),
    (r"^unet_attnpool\.c_proj\.", "condition.pooling.out_proj."),
]


def require_diffusers():
    if diffusers is None:
        raise ImportError("the LaVIT detokenizer needs diffusers: pip install 'lavit[generation]' (or diffusers>=0.31)")


@dataclass
class LaVITDetokenizerConditions(ModelOutput):
    """
    UNet conditions of a batch of images.

    Args:
        prompt_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, cross_attention_dim)`):
            the UNet's `encoder_hidden_states`.
        attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the UNet's
            `encoder_attention_mask` (all ones except in the lowres negative condition).
        pooled_prompt_embeds (`torch.FloatTensor` of shape `(batch_size, pooled_projection_size)`, *optional*):
            SDXL `text_embeds` (highres only).
    """

    prompt_embeds: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    pooled_prompt_embeds: torch.FloatTensor | None = None

    @classmethod
    def cat(cls, parts: list["LaVITDetokenizerConditions"]) -> "LaVITDetokenizerConditions":
        return cls(**{name: torch.cat([part[name] for part in parts]) for name in parts[0].keys()})


@dataclass
class LaVITDetokenizerOutput(ModelOutput):
    """
    Training output of [`LaVITDetokenizer`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): mean squared error of the UNet's prediction (noise, or velocity
            for a `v_prediction` scheduler).
        model_pred (`torch.FloatTensor` of shape `(batch_size, latent_channels, height, width)`): the prediction.
        target (`torch.FloatTensor`, same shape): what it was trained towards.
    """

    loss: torch.FloatTensor | None = None
    model_pred: torch.FloatTensor | None = None
    target: torch.FloatTensor | None = None


class LaVITAttentionPooling(nn.Module):
    """Official `unet_attnpool` (CLIP's `AttentionPool2d` over a token sequence): the token mean, prepended to the
    tokens with a learned position table, attends to all of them; its output is the pooled vector."""

    def __init__(self, config: LaVITDetokenizerConfig):
        super().__init__()
        width = config.vision_hidden_size
        self.num_heads = config.pooling_num_heads
        self.position_embedding = nn.Parameter(torch.zeros(config.num_patches + 1, width))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, config.pooled_projection_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([features.mean(dim=1, keepdim=True), features], dim=1) + self.position_embedding
        batch_size, length, width = tokens.shape
        head_dim = width // self.num_heads
        query = self.q_proj(tokens[:, :1]).view(batch_size, 1, self.num_heads, head_dim).transpose(1, 2)
        key = self.k_proj(tokens).view(batch_size, length, self.num_heads, head_dim).transpose(1, 2)
        value = self.v_proj(tokens).view(batch_size, length, self.num_heads, head_dim).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(query, key, value)  # (B, heads, 1, head_dim)
        return self.out_proj(pooled.transpose(1, 2).reshape(batch_size, width))


class LaVITConditionProjection(nn.Module):
    """Reconstructed features (B, N, D) -> UNet conditions: projections concatenated on channels (official
    `unet_proj` / `unet_proj_1` + `unet_proj_2`), plus attention pooling for highres."""

    def __init__(self, config: LaVITDetokenizerConfig):
        super().__init__()
        self.prompt_projections = nn.ModuleList(
            nn.Linear(config.vision_hidden_size, size) for size in config.prompt_projection_sizes
        )
        self.pooling = LaVITAttentionPooling(config) if config.conditioning == "highres" else None

    def forward(self, features: torch.Tensor) -> LaVITDetokenizerConditions:
        prompt_embeds = torch.cat([projection(features) for projection in self.prompt_projections], dim=-1)
        return LaVITDetokenizerConditions(
            prompt_embeds=prompt_embeds,
            attention_mask=torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device),
            pooled_prompt_embeds=self.pooling(features) if self.pooling is not None else None,
        )


class LaVITDetokenizerPreTrainedModel(PreTrainedModel):
    config_class = LaVITDetokenizerConfig
    base_model_prefix = "detokenizer"
    main_input_name = "code_ids"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaVITAttentionLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # the diffusers UNet and VAE keep their own initialisation; only LaVIT's modules are set here
        std = self.config.initializer_range
        if isinstance(module, LaVITDetokenizer):
            init.copy_(module.codebook, F.normalize(torch.randn_like(module.codebook, dtype=torch.float32), dim=-1))
            if module.negative_prompt_embeds is not None:
                init.normal_(module.negative_prompt_embeds, std=std)
        elif isinstance(module, (LaVITFeatureDecoder, LaVITConditionProjection)):
            for submodule in module.modules():
                if isinstance(submodule, nn.Linear):
                    init.trunc_normal_(submodule.weight, std=std)
                    init.zeros_(submodule.bias)
                elif isinstance(submodule, nn.LayerNorm):
                    init.ones_(submodule.weight)
                    init.zeros_(submodule.bias)
                elif isinstance(submodule, LaVITFeatureDecoder):
                    init.trunc_normal_(submodule.position_embedding, std=std)
                    init.trunc_normal_(submodule.query_embedding, std=std)
                elif isinstance(submodule, LaVITAttentionPooling):
                    init.trunc_normal_(submodule.position_embedding, std=std)


class LaVITDetokenizer(LaVITDetokenizerPreTrainedModel):
    """
    Visual code ids -> images. A copy of the tokenizer's codebook and a feature decoder reconstruct the N encoder
    features of each image; projection heads turn them into the conditions of a diffusers `UNet2DConditionModel`,
    which denoises `AutoencoderKL` latents with classifier-free guidance.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> detokenizer = AutoModel.from_pretrained("path/to/lavit/detokenizer", trust_remote_code=True)
    >>> tokens = visual_tokenizer.tokenize(pixel_values)
    >>> images = detokenizer.decode(tokens.code_ids, tokens.token_counts, num_inference_steps=25)
    ```
    """

    def __init__(self, config: LaVITDetokenizerConfig):
        require_diffusers()
        super().__init__(config)
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.code_dim))
        self.decoder = LaVITFeatureDecoder(config)
        self.condition = LaVITConditionProjection(config)
        # lowres negative condition (official: SD's empty-prompt embedding, learned when trained); highres uses zeros
        self.negative_prompt_embeds = None
        if config.conditioning == "lowres":
            self.negative_prompt_embeds = nn.Parameter(
                torch.zeros(1, config.negative_context_length, sum(config.prompt_projection_sizes))
            )
        self.unet = UNet2DConditionModel.from_config(config.unet_config)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        self.vae.requires_grad_(False)
        self.scheduler = scheduler_from_config(config.scheduler_config)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE downsampling times the UNet's."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # a swapped-in scheduler is part of the model: the next from_pretrained rebuilds it
        self.config.scheduler_config = scheduler_config_dict(self.scheduler)
        super().save_pretrained(save_directory, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- conditions

    def reconstruct_features(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        """Packed code ids (T,) + counts (B,) -> reconstructed encoder features (B, N, D)."""
        code_ids, token_counts = check_packed_code_ids(
            code_ids, token_counts, self.config.codebook_size, self.config.num_patches, self.codebook.device
        )
        quantized = self.codebook[code_ids].to(self.decoder.in_proj.weight.dtype)
        return self.decoder(quantized, token_counts)

    def get_conditions(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> LaVITDetokenizerConditions:
        """The UNet conditions of each image (official `VQDecoder` / `HighresVQDecoder` return values)."""
        return self.condition(self.reconstruct_features(code_ids, token_counts))

    def negative_conditions(self, batch_size: int, dtype: torch.dtype | None = None) -> LaVITDetokenizerConditions:
        """Official unconditional branch: all zeros (highres), or the stored embedding in the first slots (lowres).
        `dtype` (default: the projection heads') matches them to conditional ones computed under autocast."""
        config = self.config
        width = sum(config.prompt_projection_sizes)
        reference = self.condition.prompt_projections[0].weight
        dtype, device = dtype or reference.dtype, reference.device
        prompt_embeds = torch.zeros(batch_size, config.num_patches, width, dtype=dtype, device=device)
        attention_mask = torch.ones(batch_size, config.num_patches, dtype=torch.long, device=device)
        pooled = None
        if config.conditioning == "highres":
            pooled = torch.zeros(batch_size, config.pooled_projection_size, dtype=dtype, device=device)
        else:
            length = config.negative_context_length
            prompt_embeds = torch.cat([self.negative_prompt_embeds.to(dtype).expand(batch_size, -1, -1),
                                       prompt_embeds[:, length:]], dim=1)
            attention_mask[:, length:] = 0
        return LaVITDetokenizerConditions(
            prompt_embeds=prompt_embeds, attention_mask=attention_mask, pooled_prompt_embeds=pooled
        )

    def _added_conditions(self, conditions: LaVITDetokenizerConditions, height: int, width: int):
        if self.config.conditioning != "highres":
            return None
        batch_size = conditions.prompt_embeds.shape[0]
        # SDXL micro-conditioning: original size, crop top-left, target size (the official code uses the output size)
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=conditions.prompt_embeds.dtype,
                                device=conditions.prompt_embeds.device)
        return {"text_embeds": conditions.pooled_prompt_embeds, "time_ids": time_ids.expand(batch_size, -1)}

    def predict_noise(self, latents, timestep, conditions: LaVITDetokenizerConditions, height: int, width: int):
        return self.unet(
            latents,
            timestep,
            encoder_hidden_states=conditions.prompt_embeds,
            encoder_attention_mask=conditions.attention_mask,
            added_cond_kwargs=self._added_conditions(conditions, height, width),
        ).sample

    # ----------------------------------------------------------------------------------------------- training

    def forward(
        self,
        code_ids: torch.LongTensor,
        token_counts: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        latents: torch.FloatTensor | None = None,
        noise: torch.FloatTensor | None = None,
        timesteps: torch.LongTensor | None = None,
        drop_condition: torch.BoolTensor | None = None,
    ) -> LaVITDetokenizerOutput:
        """
        Diffusion training step: encode `pixel_values` (B, 3, H, W) in [-1, 1] with the frozen VAE (or take
        `latents`), noise them at random timesteps and predict the noise (or velocity) from the conditions of the
        images' codes. In training, each image's condition is replaced by the negative one with probability
        `config.condition_dropout` (or where `drop_condition` is True). `noise` and `timesteps` may be given to
        evaluate on a fixed draw.
        """
        if latents is None:
            if pixel_values is None:
                raise ValueError("give pixel_values (images in [-1, 1]) or latents")
            latents = self.encode_images(pixel_values)
        batch_size = latents.shape[0]
        if token_counts.shape[0] != batch_size:
            raise ValueError(f"token_counts has {token_counts.shape[0]} images, pixel_values/latents {batch_size}")
        conditions = self.get_conditions(code_ids, token_counts)
        if drop_condition is None and self.training and self.config.condition_dropout > 0:
            drop_condition = torch.rand(batch_size, device=latents.device) < self.config.condition_dropout
        if drop_condition is not None and bool(drop_condition.any()):
            negative = self.negative_conditions(batch_size, conditions.prompt_embeds.dtype)
            conditions = LaVITDetokenizerConditions(**{
                name: torch.where(drop_condition.view(-1, *[1] * (value.ndim - 1)), negative[name], value)
                for name, value in conditions.items()
            })
        if noise is None:
            noise = torch.randn_like(latents)
        if timesteps is None:
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, num_train_timesteps, (batch_size,), device=latents.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"training supports epsilon and v_prediction schedulers, got {prediction_type!r}")
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        model_pred = self.predict_noise(noisy_latents, timesteps, conditions, height, width)
        loss = F.mse_loss(model_pred.float(), target.float())
        return LaVITDetokenizerOutput(loss=loss, model_pred=model_pred, target=target)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled VAE latents, sampled from the VAE's latent distribution as
        diffusers' training scripts do."""
        multiple = self.size_multiple
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-1] % multiple or \
                pixel_values.shape[-2] % multiple:
            raise ValueError(f"pixel_values must be (batch, 3, H, W) with H and W multiples of {multiple}, "
                             f"got {tuple(pixel_values.shape)}")
        vae = self.vae
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # ----------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def decode(
        self,
        code_ids: torch.Tensor,
        token_counts: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler=None,
        batch_guidance: bool = True,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        show_progress: bool = False,
    ):
        """
        Packed code ids (T,) + counts (B,) -> B images (`output_type="pil"`: PIL images; `"pt"`: a (B, 3, H, W)
        tensor in [0, 1]; `"latent"`: the final latents).

        - `height`, `width`: output size (default `config.image_size`), multiples of `size_multiple`; highres
          conditioning passes them as SDXL size conditions, so the official aspect ratios work (see
          `OFFICIAL_HIGHRES_SIZES`).
        - `guidance_scale` (default `config.guidance_scale`): classifier-free guidance against the official negative
          condition; 1 turns it off. With `batch_guidance` the conditional and unconditional halves run as one UNet
          batch; `False` runs them one after the other (same result, less memory).
        - `scheduler`: any diffusers scheduler (e.g. `DPMSolverMultistepScheduler.from_config(d.scheduler.config)`)
          instead of the model's own for this call; assign `detokenizer.scheduler` to change it for good.
        - `generator`: seeds the initial latents and stochastic schedulers, so the same seed gives the same images.
        - `show_progress`: a progress bar over the denoising steps.
        """
        config = self.config
        height = height or config.image_size
        width = width or config.image_size
        multiple = self.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        num_inference_steps = num_inference_steps or config.num_inference_steps
        guidance_scale = config.guidance_scale if guidance_scale is None else guidance_scale
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        scheduler = scheduler or self.scheduler
        conditions = self.get_conditions(code_ids, token_counts)
        batch_size = conditions.prompt_embeds.shape[0]
        guided = guidance_scale != 1.0
        if guided:
            negative = self.negative_conditions(batch_size, conditions.prompt_embeds.dtype)

        from diffusers.utils.torch_utils import randn_tensor

        unet_dtype = self.unet.dtype
        latent_shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=self.device, dtype=unet_dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents.to(self.device, unet_dtype) * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in _step_parameters(scheduler) else {}
        for timestep in tqdm(scheduler.timesteps, desc="denoising", disable=not show_progress):
            if guided and batch_guidance:
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
                both = self.predict_noise(model_input, timestep, LaVITDetokenizerConditions.cat([negative, conditions]),
                                          height, width)
                unconditional, conditional = both.chunk(2)
            else:
                model_input = scheduler.scale_model_input(latents, timestep)
                conditional = self.predict_noise(model_input, timestep, conditions, height, width)
                if guided:
                    unconditional = self.predict_noise(model_input, timestep, negative, height, width)
            noise_pred = unconditional + guidance_scale * (conditional - unconditional) if guided else conditional
            latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs).prev_sample
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        return images if output_type == "pt" else to_pil_images(images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]. A float16 VAE that asks for it (`force_upcast`, the SD
        VAE overflows in float16) decodes in float32."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        shift = vae.config.get("shift_factor") or 0.0
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        if upcast:
            vae.to(torch.float16)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_visual_tokenizer(cls, visual_tokenizer, **config_kwargs) -> "LaVITDetokenizer":
        """A new detokenizer for `visual_tokenizer` (a `LaVITTokenizerModel`): its codebook and its trained feature
        decoder are copied; the heads, UNet and VAE start fresh (`load_diffusers_components` loads pretrained ones)."""
        config = LaVITDetokenizerConfig.from_tokenizer_config(visual_tokenizer.config, **config_kwargs)
        model = cls(config)
        with torch.no_grad():
            model.codebook.copy_(visual_tokenizer.quantizer.codebook)
        model.decoder.load_state_dict(visual_tokenizer.decoder.state_dict())
        return model

    @classmethod
    def from_original_state_dict(
        cls,
        decoder_state_dict: dict[str, torch.Tensor],
        codebook: torch.Tensor,
        *,
        decoder_num_heads: int = 16,
        pooling_num_heads: int = 16,
        negative_prompt_embeds: torch.Tensor | None = None,
        diffusers_folder: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> "LaVITDetokenizer":
        """
        Builds a detokenizer from an official decoder file (`tokenizer_decoder.bin`: lowres, or
        `highres_tokenizer_decoder.bin`: highres, told apart by their keys) and the tokenizer's codebook
        (`quantize.embedding.weight`). Sizes are read from the tensors; every key must be used. The UNet, VAE and
        scheduler are loaded from `diffusers_folder` (without building random ones first, directly in `dtype`), or
        built from `config_kwargs` (`unet_config`, ...) and left randomly initialised.
        """
        highres = "unet_proj_1.weight" in decoder_state_dict
        if diffusers_folder is not None and not highres and negative_prompt_embeds is None:
            raise ValueError("a lowres detokenizer loaded from a diffusers folder needs negative_prompt_embeds "
                             "(the official pixel_decoding/uncond_embeddings.bin)")
        prefix = "unet_proj_1" if highres else "unet_proj"
        if f"{prefix}.weight" not in decoder_state_dict:
            raise ValueError("decoder state dict has neither unet_proj (lowres) nor unet_proj_1 (highres) weights")
        projection_sizes = [decoder_state_dict[f"{prefix}.weight"].shape[0]]
        if highres:
            projection_sizes.append(decoder_state_dict["unet_proj_2.weight"].shape[0])
        decoder_in = decoder_state_dict["in_proj.weight"]
        sizes = dict(
            conditioning="highres" if highres else "lowres",
            codebook_size=codebook.shape[0],
            code_dim=codebook.shape[1],
            num_patches=decoder_state_dict["query_embed"].shape[1],
            vision_hidden_size=decoder_state_dict["decode_task_layer.2.weight"].shape[0],
            decoder_hidden_size=decoder_in.shape[0],
            decoder_num_layers=count_blocks(decoder_state_dict, r"blocks\."),
            decoder_num_heads=decoder_num_heads,
            decoder_intermediate_size=decoder_state_dict["blocks.0.mlp.fc1.weight"].shape[0],
            prompt_projection_sizes=projection_sizes,
            pooling_num_heads=pooling_num_heads,
        )
        if highres:
            sizes["pooled_projection_size"] = decoder_state_dict["unet_attnpool.c_proj.weight"].shape[0]
        elif negative_prompt_embeds is not None:
            sizes["negative_context_length"] = negative_prompt_embeds.reshape(-1, projection_sizes[0]).shape[0]
        sizes.update(config_kwargs)
        # with a diffusers folder, everything is built on the meta device: our weights are assigned below and the
        # UNet and VAE replaced by the folder's, so no multi-GB random UNet is ever materialised
        with torch.device("meta") if diffusers_folder is not None else contextlib.nullcontext():
            model = cls(LaVITDetokenizerConfig(**sizes))
        converted = rename_keys(decoder_state_dict, DECODER_RULES + DETOKENIZER_HEAD_RULES, [], "decoder state dict")
        converted["codebook"] = codebook
        if negative_prompt_embeds is not None:
            converted["negative_prompt_embeds"] = negative_prompt_embeds.reshape(1, -1, projection_sizes[0])
        own = {key for key in model.state_dict() if not key.startswith(("unet.", "vae."))}
        missing = own - set(converted) - ({"negative_prompt_embeds"} if highres or negative_prompt_embeds is None
                                           else set())
        if missing:
            raise ValueError(f"official decoder state dict does not fit: missing {sorted(missing)}")
        model.load_state_dict({key: value.to(dtype) for key, value in converted.items()}, strict=False,
                              assign=diffusers_folder is not None)
        if diffusers_folder is None:
            model = model.to(dtype)
        if diffusers_folder is not None:
            model.load_diffusers_components(diffusers_folder)
        if not highres and negative_prompt_embeds is None:
            logger.warning("no negative_prompt_embeds given: the lowres negative condition is random")
        return model.eval()

    def load_diffusers_components(self, folder: str | os.PathLike):
        """Loads `unet/`, `vae/` and `scheduler/` from a diffusers folder (e.g. the official `highres_pixel_decoding`)
        in place of this model's, and records their configs."""
        require_diffusers()
        folder = os.fspath(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=self.dtype).requires_grad_(False)
        scheduler_config = dict(diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler"))
        self.scheduler = scheduler_from_config(scheduler_config)
        self.config.unet_config = _public_config(dict(self.unet.config))
        self.config.vae_config = _public_config(dict(self.vae.config))
        self.config.scheduler_config = scheduler_config_dict(self.scheduler)
        self.config.check_unet_fits()

    @classmethod
    def from_original(
        cls, model_path: str | os.PathLike, conditioning: str = "highres", **kwargs
    ) -> "LaVITDetokenizer":
        """
        Builds the detokenizer from an official LaVIT release folder: `visual_tokenizer/highres_tokenizer_decoder.bin`
        + `highres_pixel_decoding/` (highres) or `visual_tokenizer/tokenizer_decoder.bin` + `pixel_decoding/` with
        `uncond_embeddings.bin` (lowres); the codebook from `visual_tokenizer/tokenizer_encoder.bin`.
        """
        require_diffusers()
        if conditioning not in ("highres", "lowres"):
            raise ValueError(f"conditioning must be 'highres' or 'lowres', got {conditioning!r}")
        model_path = Path(model_path)
        highres = conditioning == "highres"
        decoder_file = "highres_tokenizer_decoder.bin" if highres else "tokenizer_decoder.bin"
        diffusers_folder = model_path / ("highres_pixel_decoding" if highres else "pixel_decoding")
        decoder_state = load_original_state_dict(model_path / "visual_tokenizer" / decoder_file)
        encoder_state = load_original_state_dict(model_path / "visual_tokenizer" / "tokenizer_encoder.bin")
        if "quantize.embedding.weight" not in encoder_state:
            raise ValueError("tokenizer_encoder.bin has no quantize.embedding.weight (the codebook)")
        negative = None
        if not highres:
            negative_file = diffusers_folder / "uncond_embeddings.bin"
            if not negative_file.is_file():
                raise FileNotFoundError(f"official LaVIT checkpoint file not found: {negative_file}")
            negative = load_tensor_pickle(negative_file)
            if not isinstance(negative, torch.Tensor):
                raise ValueError(f"{negative_file} holds a {type(negative).__name__}, expected a tensor")
        unet_config = dict(UNet2DConditionModel.load_config(diffusers_folder, subfolder="unet"))
        vae_config = dict(AutoencoderKL.load_config(diffusers_folder, subfolder="vae"))
        return cls.from_original_state_dict(
            decoder_state, encoder_state["quantize.embedding.weight"], negative_prompt_embeds=negative,
            diffusers_folder=diffusers_folder, unet_config=_public_config(unet_config),
            vae_config=_public_config(vae_config), image_size=vae_config.get("sample_size"), **kwargs,
        )


def scheduler_from_config(scheduler_config: dict):
    """A diffusers scheduler from a config dict whose `_class_name` names its class."""
    require_diffusers()
    scheduler_config = dict(scheduler_config)
    class_name = scheduler_config.pop("_class_name", "DDIMScheduler")
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "set_timesteps"):
        raise ValueError(f"scheduler_config names {class_name!r}, which is not a diffusers scheduler")
    return scheduler_class.from_config(scheduler_config)


def scheduler_config_dict(scheduler) -> dict:
    """The config of a diffusers scheduler, with its class name, as `scheduler_from_config` reads it."""
    return {"_class_name": type(scheduler).__name__, **_public_config(dict(scheduler.config))}


def _public_config(config: dict) -> dict:
    """A diffusers config without its bookkeeping entries (`_diffusers_version`, `_use_default_values`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _step_parameters(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arrays = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(array) for array in arrays]


__all__ = [
    "LaVITAttentionPooling",
    "LaVITConditionProjection",
    "LaVITDetokenizer",
    "LaVITDetokenizerConditions",
    "LaVITDetokenizerOutput",
    "LaVITDetokenizerPreTrainedModel",
    "OFFICIAL_HIGHRES_SIZES",
    "scheduler_from_config",
    "to_pil_images",
]
