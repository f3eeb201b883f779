"""LaVIT's pixel detokenizer: visual code ids -> reconstructed encoder features -> latent diffusion -> pixels.

The official code ships two pixel decoders (`LaVIT/models/modeling_decoder.py` and the diffusers folders
`pixel_decoding/` and `highres_pixel_decoding/`): a feature decoder reconstructs the N encoder features of an image from
its variable number of codes, projection heads turn them into the conditions of a diffusers UNet, and the UNet denoises
VAE latents. diffusers is an optional dependency: this file imports without it, and building a detokenizer asks for it.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_lavit import LaVITDetokenizerConfig
from .folders_lavit import saved_config
from .modeling_lavit_tokenizer import LaVITFeatureDecoder, LaVITTokenizationOutput
from .saving_lavit import SaveBesideSourcesMixin
from .validation_lavit import Range, check_memory

try:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
except ImportError:
    diffusers = None

# the official highres decoder supports these (height, width) sizes (README / notebooks of the official code)
OFFICIAL_HIGHRES_SIZES = ((1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1216, 832), (1152, 896))


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


class LaVITConditioning(nn.Module):
    """Reconstructed features (B, N, D) -> UNet conditions. The two official variants below share the projections
    concatenated on channels (official `unet_proj` / `unet_proj_1` + `unet_proj_2`); each adds its own pooled
    vector, negative condition and UNet `added_cond_kwargs`."""

    def __init__(self, config: LaVITDetokenizerConfig):
        super().__init__()
        self.prompt_projections = nn.ModuleList(
            nn.Linear(config.vision_hidden_size, size) for size in config.prompt_projection_sizes
        )
        self.num_patches = config.num_patches

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features -> (B, N, sum(prompt_projection_sizes)) UNet `encoder_hidden_states`."""
        return torch.cat([projection(features) for projection in self.prompt_projections], dim=-1)

    def empty_prompt_embeds(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(B, N, width) zeros: the start of both negative conditions."""
        width = sum(projection.out_features for projection in self.prompt_projections)
        return torch.zeros(batch_size, self.num_patches, width, dtype=dtype, device=device)

    def added_cond_kwargs(self, conditions: LaVITDetokenizerConditions, height: int, width: int) -> dict | None:
        """The UNet's `added_cond_kwargs` for images of `height` x `width` pixels: none by default."""
        return None


def unmasked_conditions(prompt_embeds: torch.Tensor, pooled_prompt_embeds=None) -> LaVITDetokenizerConditions:
    """Conditions whose attention mask lets the UNet see every position of `prompt_embeds`."""
    attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
    return LaVITDetokenizerConditions(
        prompt_embeds=prompt_embeds, attention_mask=attention_mask, pooled_prompt_embeds=pooled_prompt_embeds
    )


class LaVITHighresConditioning(LaVITConditioning):
    """Official `HighresVQDecoder` heads (SDXL UNet): two projections concatenated on channels, an attention-pooled
    vector as SDXL `text_embeds`, size conditions as `time_ids`; the negative condition is all zeros."""

    def __init__(self, config: LaVITDetokenizerConfig):
        super().__init__(config)
        self.pooling = LaVITAttentionPooling(config)

    def forward(self, features: torch.Tensor) -> LaVITDetokenizerConditions:
        return unmasked_conditions(self.project(features), self.pooling(features))

    def negative_conditions(self, batch_size: int, dtype: torch.dtype, device: torch.device,
                            negative_prompt_embeds=None):
        """All zeros, the pooled vector included (official `HighresVQDecoder`); `negative_prompt_embeds` is unused."""
        prompt_embeds = self.empty_prompt_embeds(batch_size, dtype, device)
        pooled_prompt_embeds = prompt_embeds.new_zeros(batch_size, self.pooling.out_proj.out_features)
        return unmasked_conditions(prompt_embeds, pooled_prompt_embeds)

    def added_cond_kwargs(self, conditions: LaVITDetokenizerConditions, height: int, width: int) -> dict:
        """SDXL `text_embeds` (the pooled vector) and `time_ids`: original size, crop top-left, target size (the
        official code gives the output size for both sizes)."""
        prompt_embeds = conditions.prompt_embeds
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=prompt_embeds.dtype,
                                device=prompt_embeds.device)
        return {"text_embeds": conditions.pooled_prompt_embeds, "time_ids": time_ids.expand(len(prompt_embeds), -1)}


class LaVITLowresConditioning(LaVITConditioning):
    """Official `VQDecoder` heads (SD-1.5 UNet): one projection; the negative condition is a stored embedding (SD's
    empty prompt) in the first slots, masked elsewhere."""

    def forward(self, features: torch.Tensor) -> LaVITDetokenizerConditions:
        return unmasked_conditions(self.project(features))

    def negative_conditions(self, batch_size: int, dtype: torch.dtype, device: torch.device,
                            negative_prompt_embeds: torch.Tensor):
        """`negative_prompt_embeds` (1, L, width) in the first L slots; the attention mask hides the others."""
        length = negative_prompt_embeds.shape[1]
        empty = self.empty_prompt_embeds(batch_size, dtype, device)
        conditions = unmasked_conditions(
            torch.cat([negative_prompt_embeds.to(device, dtype).expand(batch_size, -1, -1), empty[:, length:]], dim=1)
        )
        conditions.attention_mask[:, length:] = 0
        return conditions


CONDITIONING_CLASSES = {"highres": LaVITHighresConditioning, "lowres": LaVITLowresConditioning}


class LaVITConditionsMixin:
    """
    Visual code ids -> UNet conditions: a copy of the tokenizer's codebook, a feature decoder that reconstructs the N
    encoder features of each image, and the projection heads (`LaVITHighresConditioning` or
    `LaVITLowresConditioning`, picked by `config.conditioning`). Shared by [`LaVITDetokenizer`] (the whole decoder in
    one model, as training uses it) and [`LaVITConditionEncoder`] (the `condition_encoder` of `LaVITPipeline`); both
    keep these modules under the same names, so their weights have the same keys.
    """

    def _build_condition_modules(self, config: LaVITDetokenizerConfig):
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.code_dim))
        self.decoder = LaVITFeatureDecoder(config)
        self.condition = CONDITIONING_CLASSES[config.conditioning](config)
        # the lowres negative condition (official: SD's empty-prompt embedding, learned when trained); it stays a
        # parameter of the model, not of `condition`, so saved folders keep their key `negative_prompt_embeds`
        self.negative_prompt_embeds = None
        if config.conditioning == "lowres":
            self.negative_prompt_embeds = nn.Parameter(
                torch.zeros(1, config.negative_context_length, sum(config.prompt_projection_sizes))
            )

    def reconstruct_features(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        """Packed code ids (T,) + counts (B,) -> reconstructed encoder features (B, N, D)."""
        return self.decoder.decode_code_ids(self.codebook, code_ids, token_counts)

    def get_conditions(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> LaVITDetokenizerConditions:
        """The UNet conditions of each image (official `VQDecoder` / `HighresVQDecoder` return values)."""
        return self.condition(self.reconstruct_features(code_ids, token_counts))

    def negative_conditions(self, batch_size: int, dtype: torch.dtype | None = None,
                            device: torch.device | None = None) -> LaVITDetokenizerConditions:
        """Official unconditional branch: all zeros (highres), or the stored embedding in the first slots (lowres).
        `dtype` and `device` (default: the codebook's device, the projection heads' dtype) match them to conditional
        ones (computed under autocast, or by offloaded heads)."""
        dtype = dtype or self.condition.prompt_projections[0].weight.dtype
        device = device or self.codebook.device
        return self.condition.negative_conditions(batch_size, dtype, device, self.negative_prompt_embeds)


class LaVITDetokenizerPreTrainedModel(SaveBesideSourcesMixin, PreTrainedModel):
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
        if isinstance(module, LaVITConditionsMixin):
            init.copy_(module.codebook, F.normalize(torch.randn_like(module.codebook, dtype=torch.float32), dim=-1))
            if module.negative_prompt_embeds is not None:
                init.normal_(module.negative_prompt_embeds, std=std)
        elif isinstance(module, (LaVITFeatureDecoder, LaVITConditioning)):
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


class LaVITDetokenizer(LaVITConditionsMixin, LaVITDetokenizerPreTrainedModel):
    """
    Visual code ids -> images. A copy of the tokenizer's codebook and a feature decoder reconstruct the N encoder
    features of each image; projection heads (`LaVITHighresConditioning` or `LaVITLowresConditioning`, picked by
    `config.conditioning`) turn them into the conditions of a diffusers `UNet2DConditionModel`, which denoises
    `AutoencoderKL` latents with classifier-free guidance. Official weights: `convert_detokenizer` of
    `convert_original_lavit`.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> detokenizer = AutoModel.from_pretrained("path/to/lavit/detokenizer", trust_remote_code=True)
    >>> tokens = visual_tokenizer.tokenize(pixel_values)
    >>> images = detokenizer.decode(tokens.code_ids, tokens.token_counts, num_inference_steps=25)
    ```
    """

    _auto_class = "AutoModel"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    def __init__(self, config: LaVITDetokenizerConfig):
        require_diffusers()
        super().__init__(config)
        self._build_condition_modules(config)
        self.unet = UNet2DConditionModel.from_config(config.unet_config)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        self.vae.requires_grad_(False)
        self.scheduler = scheduler_from_config(config.scheduler_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a local folder that holds a [`LaVITConditionEncoder`] (a pipeline's
        `condition_encoder/`, same config class) loads as one: `AutoModel`, which maps the config class to this
        class, would otherwise build a decoder around it with a random UNet and VAE."""
        architectures = (saved_config(pretrained_model_name_or_path) or {}).get("architectures")
        if cls is LaVITDetokenizer and architectures == [LaVITConditionEncoder.__name__]:
            return LaVITConditionEncoder.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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
        return super().save_pretrained(save_directory, *args, **kwargs)

    def predict_noise(self, latents, timestep, conditions: LaVITDetokenizerConditions, height: int, width: int):
        """The UNet's prediction (noise, or velocity) for `latents` of images of `height` x `width` pixels."""
        return self.unet(
            latents,
            timestep,
            encoder_hidden_states=conditions.prompt_embeds,
            encoder_attention_mask=conditions.attention_mask,
            added_cond_kwargs=self.condition.added_cond_kwargs(conditions, height, width),
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
        # 1. latents of the target images
        if latents is None:
            if pixel_values is None:
                raise ValueError("give pixel_values (images in [-1, 1]) or latents")
            latents = self.encode_images(pixel_values)
        batch_size = latents.shape[0]
        if token_counts.shape[0] != batch_size:
            raise ValueError(f"token_counts has {token_counts.shape[0]} images, pixel_values/latents {batch_size}")
        # 2. conditions, some replaced by the negative one so that the UNet also learns the unguided prediction
        conditions = self.drop_conditions(self.get_conditions(code_ids, token_counts), drop_condition)
        # 3. noisy latents at random timesteps, and what the UNet should predict from them
        if noise is None:
            noise = torch.randn_like(latents)
        if timesteps is None:
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, num_train_timesteps, (batch_size,), device=latents.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.scheduler, latents, noise, timesteps)
        # 4. prediction and loss
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        model_pred = self.predict_noise(noisy_latents, timesteps, conditions, height, width)
        loss = F.mse_loss(model_pred.float(), target.float())
        return LaVITDetokenizerOutput(loss=loss, model_pred=model_pred, target=target)

    def drop_conditions(self, conditions: LaVITDetokenizerConditions, drop_condition: torch.BoolTensor | None = None):
        """`conditions` with the negative condition for the images where `drop_condition` (B,) is True; without
        it, in training mode, each image is dropped with probability `config.condition_dropout` (classifier-free
        guidance training: a training-time behaviour, so it follows `self.training` as dropout layers do)."""
        batch_size, device = conditions.prompt_embeds.shape[0], conditions.prompt_embeds.device
        if drop_condition is None and self.training and self.config.condition_dropout > 0:
            drop_condition = torch.rand(batch_size, device=device) < self.config.condition_dropout
        if drop_condition is None or not bool(drop_condition.any()):
            return conditions
        negative = self.negative_conditions(batch_size, conditions.prompt_embeds.dtype)
        return LaVITDetokenizerConditions(**{
            name: torch.where(drop_condition.view(-1, *[1] * (value.ndim - 1)), negative[name], value)
            for name, value in conditions.items()
        })

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

    def as_pipeline(self, scheduler=None):
        """This decoder as a `LaVITPipeline` without a language model, nothing copied: its condition encoder is a view
        of this model's condition modules ([`LaVITConditionEncoder.viewing`]), its UNet, VAE and scheduler (or
        `scheduler`) are this model's. The pipeline owns the sampling loop; `decode` draws through it."""
        from .pipeline_lavit import LaVITPipeline

        return LaVITPipeline(language_model=None, processor=None, condition_encoder=LaVITConditionEncoder.viewing(self),
                             unet=self.unet, vae=self.vae, scheduler=scheduler or self.scheduler)

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
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        show_progress: bool = False,
    ):
        """
        Packed code ids (T,) + counts (B,) -> B images, drawn by `LaVITPipeline.decode_visual_tokens` (the one
        sampling loop, see [`as_pipeline`]) with the same arguments: `height`, `width` (multiples of `size_multiple`;
        highres conditioning passes them as SDXL size conditions, see `OFFICIAL_HIGHRES_SIZES`), `num_inference_steps`,
        `guidance_scale` (defaults: this model's config; 1 turns guidance off), `latents`, `output_type` (`"pil"`,
        `"np"`, `"pt"`: a (B, 3, H, W) float32 tensor in [0, 1], `"latent"`). `scheduler`: any diffusers scheduler
        for this call (assign `detokenizer.scheduler` to change it for good); `show_progress`: a progress bar.
        `generator`: one seeds the whole batch as one stream (the initial latents of all images in one draw, as
        `decode` always did; a pipeline gives each image its own stream), or one per image.

        Raises `ValueError` on sizes that are not positive multiples of `size_multiple`, an unknown `output_type`,
        `latents` of the wrong shape and invalid code ids / counts.
        """
        pipe = self.as_pipeline(scheduler)
        pipe.set_progress_bar_config(disable=not show_progress, desc="denoising")
        if isinstance(generator, torch.Generator):
            # one generator for every row draws what one draw of the whole batch draws (latents have 16k values)
            generator = [generator] * len(token_counts)
        tokens = LaVITTokenizationOutput(code_ids=code_ids, token_counts=token_counts)
        images = pipe.decode_visual_tokens(
            tokens, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generator,
            latents=latents, height=height, width=width, output_type=output_type,
        ).images
        return images.float() if output_type == "pt" else images

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
    def from_components(cls, condition_encoder: "LaVITConditionEncoder", unet, vae, scheduler) -> "LaVITDetokenizer":
        """The whole decoder of a `LaVITPipeline` (its `condition_encoder`, `unet`, `vae`, `scheduler`) in one model,
        as stage-3 training continues it; the modules are taken, not copied (the inverse of
        `LaVITConditionEncoder.from_detokenizer`)."""
        config = condition_encoder.config.__class__.from_dict(condition_encoder.config.to_dict())
        config.unet_config, config.vae_config = public_config(dict(unet.config)), public_config(dict(vae.config))
        config.scheduler_config = scheduler_config_dict(scheduler)
        with torch.device("meta"):  # every weight is replaced below: nothing is allocated twice
            model = cls(config)
        model.unet, model.vae, model.scheduler = unet, vae.requires_grad_(False), scheduler
        loaded = model.load_state_dict(condition_encoder.state_dict(), strict=False, assign=True)
        missing = [key for key in loaded.missing_keys if not key.startswith(("unet.", "vae."))]
        if missing or loaded.unexpected_keys:
            raise ValueError(f"the condition encoder's weights do not fit the detokenizer: missing {missing}, "
                             f"unexpected {loaded.unexpected_keys}")
        return model.train(condition_encoder.training)

    def load_diffusers_components(self, folder: str | os.PathLike):
        """Loads `unet/`, `vae/` and `scheduler/` from a diffusers folder (e.g. the official `highres_pixel_decoding`)
        in place of this model's, and records their configs."""
        require_diffusers()
        folder = os.fspath(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=self.dtype).requires_grad_(False)
        scheduler_config = dict(diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler"))
        self.scheduler = scheduler_from_config(scheduler_config)
        self.config.unet_config = public_config(dict(self.unet.config))
        self.config.vae_config = public_config(dict(self.vae.config))
        self.config.scheduler_config = scheduler_config_dict(self.scheduler)
        self.config.check_unet_fits()


class LaVITConditionEncoder(LaVITConditionsMixin, LaVITDetokenizerPreTrainedModel):
    """
    The `condition_encoder` of `LaVITPipeline`: packed visual code ids (T,) + counts (B,) -> the UNet conditions of
    each image ([`LaVITDetokenizerConditions`]), as a text encoder turns a prompt into a diffusers UNet's
    `encoder_hidden_states`. It holds the codebook, the feature decoder and the projection heads of a
    [`LaVITDetokenizer`] (same weight names); the UNet, VAE and scheduler are the pipeline's own components.
    Its config's `unet_config` / `vae_config` / `scheduler_config` describe the decoder it was trained with.
    """

    _auto_class = "AutoModel"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    def __init__(self, config: LaVITDetokenizerConfig):
        super().__init__(config)
        self._build_condition_modules(config)
        self.post_init()

    def forward(self, code_ids: torch.LongTensor, token_counts: torch.LongTensor,
                with_negative: bool = False) -> LaVITDetokenizerConditions:
        """The conditions of the B images; `with_negative`: the B negative ones first, then those (2B rows: the
        batch of classifier-free guidance). Both come from `forward`, where offloading hooks put the weights."""
        conditions = self.get_conditions(code_ids, token_counts)
        if not with_negative:
            return conditions
        prompt_embeds = conditions.prompt_embeds
        negative = self.negative_conditions(len(token_counts), prompt_embeds.dtype, prompt_embeds.device)
        return LaVITDetokenizerConditions.cat([negative, conditions])

    @classmethod
    def viewing(cls, detokenizer: LaVITDetokenizer) -> "LaVITConditionEncoder":
        """A condition encoder on the condition modules of `detokenizer` themselves (no copy, no allocation: it sees
        their current weights and mode), for drawing with a detokenizer through the pipeline."""
        with torch.device("meta"):
            encoder = cls(detokenizer.config)
        encoder.decoder, encoder.condition = detokenizer.decoder, detokenizer.condition
        encoder.codebook, encoder.negative_prompt_embeds = detokenizer.codebook, detokenizer.negative_prompt_embeds
        encoder.training = detokenizer.training
        return encoder

    @classmethod
    def from_detokenizer(cls, detokenizer: LaVITDetokenizer) -> "LaVITConditionEncoder":
        """The condition modules of a [`LaVITDetokenizer`] (its codebook, feature decoder, heads), weights copied."""
        encoder = cls(detokenizer.config.__class__.from_dict(detokenizer.config.to_dict()))
        own_keys = encoder.state_dict().keys()
        encoder.load_state_dict({key: value for key, value in detokenizer.state_dict().items() if key in own_keys})
        return encoder.to(detokenizer.dtype).eval()


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (`epsilon` schedulers) or the velocity (`v_prediction`)."""
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"training supports epsilon and v_prediction schedulers, got {prediction_type!r}")


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
    return {"_class_name": type(scheduler).__name__, **public_config(dict(scheduler.config))}


def public_config(config: dict) -> dict:
    """A diffusers config without its bookkeeping entries (`_diffusers_version`, `_use_default_values`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


__all__ = [
    "LaVITAttentionPooling",
    "LaVITConditionEncoder",
    "LaVITConditioning",
    "LaVITConditionsMixin",
    "LaVITDetokenizer",
    "LaVITDetokenizerConditions",
    "LaVITDetokenizerOutput",
    "LaVITDetokenizerPreTrainedModel",
    "LaVITHighresConditioning",
    "LaVITLowresConditioning",
    "OFFICIAL_HIGHRES_SIZES",
    "public_config",
    "require_diffusers",
    "scheduler_config_dict",
    "scheduler_from_config",
    "training_target",
    "unmasked_conditions",
]


def check_decode_request(height, width, num_inference_steps, unet_rows: int, *, size_multiple: int, image_size: int,
                         vae_scale_factor: int, unet, scheduler, device) -> None:
    """
    Bounds a pixel-decoding request before anything is allocated (the one check of `LaVITDetokenizer.decode` and of
    `LaVITPipeline`): sides that are multiples of `size_multiple` up to twice `image_size` (the stated limit: the UNet
    was trained at that size), at most the scheduler's training timesteps as steps, and the memory of `unet_rows` UNet
    rows at that size (the pixels and the feature maps of the UNet's first block, a lower bound) against the memory
    there is.
    """
    limit = 2 * image_size
    side = Range(size_multiple, limit, integer=True, note=f"a multiple of {size_multiple}, at most 2 x image_size")
    for name, value in (("height", height), ("width", width)):
        if not side.contains(value) or value % size_multiple:
            raise ValueError(f"{name} must be {side.describe()}, got {value!r}")
    train_timesteps = getattr(scheduler.config, "num_train_timesteps", None)
    Range(1, train_timesteps, integer=True, note="the scheduler's training timesteps").check(
        "num_inference_steps", num_inference_steps)
    latent_pixels = (height // vae_scale_factor) * (width // vae_scale_factor)
    feature_bytes = latent_pixels * unet.config.block_out_channels[0] * 4 * unet.dtype.itemsize
    check_memory(f"decoding {unet_rows} UNet rows of {height}x{width} pixels",
                 unet_rows * (3 * height * width * 4 + feature_bytes), device,
                 "decode fewer images at once, or smaller ones")
