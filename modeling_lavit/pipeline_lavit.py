"""`LaVITPipeline`: LaVIT's text-to-image and image+text-to-image as a diffusers pipeline (paper section 3.2).

Two stages, each a component: the language model (`language_model`, a [`LaVITForCausalLM`]) writes visual tokens
after `[IMG]`; the `condition_encoder` ([`LaVITConditionEncoder`]: codebook, feature decoder, projection heads) turns
them into UNet conditions, and the `unet` denoises `vae` latents with the `scheduler`, as in any diffusers pipeline.

    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("path/to/lavit-pipeline", trust_remote_code=True)
    >>> image = pipe("a red bus", generator=torch.Generator().manual_seed(0)).images[0]

With `lavit` installed, `LaVITPipeline.from_pretrained(folder, torch_dtype=...)` loads the same folder without
`trust_remote_code`, and also a folder of lavit <= 0.x (a language model folder with a `detokenizer/` sub-folder);
`LaVITPipeline.from_pretrained(old).save_pretrained(new)` converts one. A saved folder holds `model_index.json`, this
file with the modeling files it needs, and one sub-folder per component (each with its own code files), so it loads
where `lavit` is not installed.
"""

import inspect
import json
import logging
import numbers
import os
import shutil
from pathlib import Path

import torch

# diffusers copies only the files a module imports directly (`from .x import`) into its module cache when it loads
# remote code from a local folder: every modeling file the pipeline and its components need is imported here
from .attention_lavit import LaVITAttentionLayer  # noqa: F401
from .configuration_lavit import LaVITConfig, LaVITDetokenizerConfig, LaVITImageSelection  # noqa: F401
from .folders_lavit import is_lavit_pipeline_folder  # noqa: F401
from .generation_lavit import LaVITImageGenerationConfig, row_generators
from .image_placeholders_lavit import find_image_spans  # noqa: F401
from .kernels_lavit import speed_defaults  # noqa: F401
from .modeling_eva_vit import LaVITEvaVisionModel  # noqa: F401
from .modeling_lavit_detokenizer import (
    LaVITConditionEncoder,
    LaVITDetokenizerConditions,
    check_decode_request,
    require_diffusers,
)
from .modeling_lavit_tokenizer import LaVITTokenizationOutput
from .saving_lavit import code_files, loaded_from, loads_json, refuse_unfinished_save, save_beside_sources
from .transformers_compat import cache_kwargs  # noqa: F401
from .validation_lavit import (
    GUIDANCE_SCALE,
    POSITIVE_INT,
    Choice,
    Each,
    Range,
    check_keywords,
    floating_dtype,
    keyword_names,
)

try:
    from diffusers import DiffusionPipeline, ImagePipelineOutput
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # this file imports without diffusers; building a pipeline asks for it
    DiffusionPipeline, ImagePipelineOutput = object, None

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PIPELINE_MODULE = "pipeline_lavit"
# where folders written by lavit <= 0.x keep the whole pixel decoder, beside the language model's files
LEGACY_DETOKENIZER_FOLDER = "detokenizer"
# components whose classes come with the folder's code, and the file of each in its sub-folder
CUSTOM_COMPONENT_MODULES = {
    "language_model": "modeling_lavit", "processor": "processing_lavit",
    "condition_encoder": "modeling_lavit_detokenizer",
}


CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")
logger = logging.getLogger(__name__)


class Kind:
    """A value of a kind that is not a number (a prompt, a generator, a tensor, a callable), checked where it enters
    like a [`Range`]: `check(name, value)` raises a `ValueError` naming the argument, what it must be and what it
    got."""

    def __init__(self, description: str, test):
        self.description, self.test = description, test

    def check(self, name: str, value):
        if not self.test(value):
            got = repr(value)[:80] if isinstance(value, (str, numbers.Number, type(None))) else type(value).__name__
            raise ValueError(f"{name} must be {self.description}, got {got}")
        return value


def _strings(value, allow_none: bool) -> bool:
    return (value is None and allow_none) or isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value))


def _generators(value) -> bool:
    return value is None or isinstance(value, torch.Generator) or (
        isinstance(value, list) and all(isinstance(item, torch.Generator) for item in value))


# sizes and steps: one bound for both pixel decoders, `check_decode_request` (their range depends on the decoder)
BY_THE_DECODER = Kind("checked by check_decode_request", lambda value: True)
# every argument of `LaVITPipeline.__call__` (and of `decode_visual_tokens`), checked where it enters; the settings in
# `token_generation_kwargs` are checked by `LaVITImageGenerationConfig`, `image` by the processor, sizes, steps and
# memory again against the decoder's limits by `check_decode_request`
CALL_ARGUMENTS = {
    "prompt": Kind("a string or a non-empty list of strings", lambda value: _strings(value, allow_none=False)),
    "negative_prompt": Kind("None, a string or a non-empty list of strings", lambda value: _strings(value, True)),
    "image": Kind("None, or the prompt images (paths, PIL images, arrays or tensors; one or a list)",
                  lambda value: not isinstance(value, (bool, int, float, dict))),
    "num_images_per_prompt": POSITIVE_INT,
    "token_guidance_scale": Range(1, optional=True, note="the language model's guidance; 1 turns it off"),
    "guidance_scale": Range(1, optional=True, note="the diffusion decoder's guidance; 1 turns it off"),
    "num_inference_steps": BY_THE_DECODER,
    "generator": Kind("None, a torch.Generator or a list of them (one per image)", _generators),
    "latents": Kind("None or a floating-point torch.Tensor of finite values (B, C, H / f, W / f)",
                    lambda value: value is None or (isinstance(value, torch.Tensor) and value.is_floating_point()
                                                    and bool(torch.isfinite(value).all()))),
    "height": BY_THE_DECODER,
    "width": BY_THE_DECODER,
    "output_type": Choice(OUTPUT_TYPES),
    "return_dict": Choice((True, False)),
    "callback_on_step_end": Kind("None or a callable (pipe, step, timestep, tensors) -> dict",
                                 lambda value: value is None or callable(value)),
    "callback_on_step_end_tensor_inputs": Each(Choice(CALLBACK_TENSOR_INPUTS)),
    "token_generation_config": Kind("None or a LaVITImageGenerationConfig", lambda value: value is None or type(
        value).__name__ == LaVITImageGenerationConfig.__name__),
    "token_generation_kwargs": Kind("settings of LaVITImageGenerationConfig (checked by it)", lambda value: True),
}


def check_scheduler(scheduler) -> None:
    """The scheduler must be one for noise-predicting UNets (diffusers' `SchedulerMixin` with an initial noise scale,
    model-input scaling and steps): a flow-matching scheduler, or anything else, is refused by name."""
    missing = [name for name in ("init_noise_sigma", "scale_model_input", "set_timesteps", "step")
               if not hasattr(scheduler, name)]
    if missing:
        raise ValueError(f"pipe.scheduler must be a diffusers scheduler for noise-predicting UNets (with "
                         f"{', '.join(missing)}; e.g. DDIMScheduler or DPMSolverMultistepScheduler.from_config("
                         f"pipe.scheduler.config)), got {type(scheduler).__name__}")


def check_negative_prompt(prompt, negative_prompt) -> None:
    """One negative prompt, or one per prompt; none of them empty (`[IMG]` alone is the default: give None)."""
    if negative_prompt is None:
        return
    prompts = 1 if isinstance(prompt, str) else len(prompt)
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
    if len(negatives) not in (1, prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} prompts; give one, or one per prompt ({prompts})")
    if not all(negative.strip() for negative in negatives):
        raise ValueError("negative_prompt holds an empty prompt; give None for the default ([IMG] alone)")


def check_call_arguments(arguments: dict) -> None:
    """Checks each of `arguments` (name -> value, as `__call__` got them) by its entry in `CALL_ARGUMENTS`."""
    for name, value in arguments.items():
        CALL_ARGUMENTS[name].check(name, value)


class LaVITPipeline(DiffusionPipeline):
    r"""
    LaVIT image generation: prompt (text, or text with `<image>` and `image`) -> visual tokens (language model) ->
    UNet conditions (condition encoder) -> latents (UNet + scheduler, classifier-free guidance) -> pixels (VAE).

    Args:
        language_model ([`LaVITForCausalLM`]): writes the visual tokens; its own classifier-free guidance is
            `token_guidance_scale`.
        processor ([`LaVITProcessor`]): prompts (and prompt images) -> model inputs.
        condition_encoder ([`LaVITConditionEncoder`]): visual code ids -> UNet conditions.
        unet (`UNet2DConditionModel`), vae (`AutoencoderKL`), scheduler (any diffusers scheduler): the latent
            diffusion decoder; its classifier-free guidance is `guidance_scale`.
    """

    model_cpu_offload_seq = "language_model->condition_encoder->unet->vae"
    # a decoder alone (what stage-3 training writes without a language model) draws given visual tokens
    # (`decode_visual_tokens`); `from_pretrained(folder, language_model=..., processor=...)` completes it
    _optional_components = ["language_model", "processor"]
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, language_model, processor, condition_encoder, unet, vae, scheduler):
        require_diffusers()
        super().__init__()
        self.register_modules(language_model=language_model, processor=processor,
                              condition_encoder=condition_encoder, unet=unet, vae=vae, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's downsampling, read from the VAE the pipeline holds now (a swapped VAE brings its own)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_detokenizer(cls, language_model, processor, detokenizer) -> "LaVITPipeline":
        """A pipeline from a language model and a whole [`LaVITDetokenizer`] (the layout of released lavit folders and
        of stage-3 training): its condition modules become the `condition_encoder`, its UNet, VAE and scheduler the
        pipeline's own."""
        return cls(language_model=language_model, processor=processor,
                   condition_encoder=LaVITConditionEncoder.from_detokenizer(detokenizer), unet=detokenizer.unet,
                   vae=detokenizer.vae, scheduler=detokenizer.scheduler)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE downsampling times the UNet's."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def decode_settings(self, height=None, width=None, num_inference_steps=None, guidance_scale=None) -> tuple:
        """`(height, width, num_inference_steps, guidance_scale)` of a decoding request: the one place where the
        defaults (the condition encoder's config: the size and steps the decoder was trained or released with, its
        guidance) replace None; 0 is a value, and refused by `check_decode_request`."""
        config = self.condition_encoder.config
        return (config.image_size if height is None else height, config.image_size if width is None else width,
                config.num_inference_steps if num_inference_steps is None else num_inference_steps,
                config.guidance_scale if guidance_scale is None else guidance_scale)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step-end callback to stop denoising after that step."""
        return self._interrupt

    # ----------------------------------------------------------------------------------------------- folders

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """`DiffusionPipeline.save_pretrained`, then the code a folder needs to load where `lavit` is not installed:
        this file and the modeling files it imports at the top, and each custom component's files in its sub-folder;
        `model_index.json` names them by file, as diffusers' remote-code loading reads them. Into the folder the
        pipeline was loaded from, it is written beside it first (`saving_lavit.save_beside_sources`)."""
        own = loaded_from(self)
        sources = own + [folder for folder in loaded_from(*self.components.values())  # parts of its own folder
                         if not any(folder.is_relative_to(source) for source in own)]
        return save_beside_sources(lambda folder: self._save_folder(folder, **kwargs), save_directory, sources,
                                   type(self).__name__)

    def _save_folder(self, save_directory: Path, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        copy_code_files(Path(__file__), save_directory)
        index_file = save_directory / "model_index.json"
        index = loads_json(index_file.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        for name, module_name in CUSTOM_COMPONENT_MODULES.items():
            component = getattr(self, name)
            if component is None:
                continue
            copy_code_files(Path(inspect.getfile(type(component))), save_directory / name)
            index[name] = [module_name, type(component).__name__]
        # written in place: the folder is a staging folder or one under a "saving" record (a temporary file a kill
        # left there would be a name no later save writes, keeping the record open)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained` for this class: the language model, processor and condition encoder
        load with the classes this process already has (no `trust_remote_code` needed where `lavit` is installed),
        the UNet, VAE and scheduler through diffusers. `torch_dtype` applies to every model (float32 when not given,
        whatever dtype the folder was saved in)."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            hub_kwargs = {name: kwargs[name] for name in ("cache_dir", "revision", "token", "local_files_only")
                          if name in kwargs}
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs))
        refuse_unfinished_save(folder)
        key = "torch_dtype" if "torch_dtype" in kwargs else "dtype"  # diffusers' newer name, or the one given
        given = kwargs.pop("torch_dtype") if "torch_dtype" in kwargs else kwargs.pop("dtype", None)
        dtype = kwargs[key] = _one_dtype(folder, given, key)
        trust_remote_code = kwargs.get("trust_remote_code", False)
        loaders = _component_loaders(trust_remote_code)
        if not (folder / "model_index.json").is_file() and (folder / LEGACY_DETOKENIZER_FOLDER).is_dir():
            return cls._from_released_folder(folder, dtype, loaders, kwargs)
        if not (folder / "model_index.json").is_file() and _is_detokenizer_folder(folder):
            return cls._from_detokenizer_folder(folder, dtype, kwargs)
        for name in CUSTOM_COMPONENT_MODULES:
            if name not in kwargs:  # an optional component the folder does not have stays None
                kwargs[name] = loaders[name](folder / name, dtype) if (folder / name).is_dir() else None
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def _from_released_folder(cls, folder: Path, dtype, loaders: dict, kwargs: dict) -> "LaVITPipeline":
        """A folder of lavit <= 0.x: the language model's folder (with its processor) and the whole pixel decoder in
        its `detokenizer/` sub-folder. Components given in `kwargs` replace the folder's."""
        from .modeling_lavit_detokenizer import LaVITDetokenizer

        if not (folder / LEGACY_DETOKENIZER_FOLDER / "config.json").is_file():  # a partial copy: say what is missing
            raise ValueError(f"{folder / LEGACY_DETOKENIZER_FOLDER} has no config.json: the pixel decoder folder is "
                             f"incomplete; copy the whole {LEGACY_DETOKENIZER_FOLDER}/ folder again")
        detokenizer = LaVITDetokenizer.from_pretrained(folder / LEGACY_DETOKENIZER_FOLDER, dtype=dtype).eval()
        pipe = cls.from_detokenizer(loaders["language_model"](folder, dtype), loaders["processor"](folder, dtype),
                                    detokenizer)
        components = {name: kwargs[name] for name in pipe.components if name in kwargs}
        return cls(**{**pipe.components, **components}) if components else pipe

    @classmethod
    def _from_detokenizer_folder(cls, folder: Path, dtype, kwargs: dict) -> "LaVITPipeline":
        """A `LaVITDetokenizer` folder (what `lavit train-detokenizer` of lavit <= 0.x wrote): the pipeline's decoder,
        with the `language_model` and `processor` given in `kwargs` (or none: the decoder alone)."""
        from .modeling_lavit_detokenizer import LaVITDetokenizer

        detokenizer = LaVITDetokenizer.from_pretrained(folder, dtype=dtype).eval()
        pipe = cls.from_detokenizer(kwargs.get("language_model"), kwargs.get("processor"), detokenizer)
        components = {name: kwargs[name] for name in pipe.components if name in kwargs}
        return cls(**{**pipe.components, **components}) if components else pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        # this class and its custom components are already imported: the folder's copies of their code are not run
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        for name in CUSTOM_COMPONENT_MODULES:
            config.pop(name, None)
        return loaded

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """diffusers' sequential offload (each submodule's weights brought to `device` for its forward only); with no
        accelerator and no `device`, diffusers' own error. With `device="cpu"` the hooks execute on
        `torch.device("cpu")`: diffusers names it `cpu:0`, and torch copies a CPU parameter moved "to" `cpu:0` into a
        plain tensor, which accelerate's hook cannot offload after the forward."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if self._offload_device.type != "cpu":
            return
        self._offload_device = torch.device("cpu")
        for component in self.components.values():
            for module in component.modules() if isinstance(component, torch.nn.Module) else ():
                hook = getattr(module, "_hf_hook", None)
                for part in getattr(hook, "hooks", [hook]):  # a `SequentialHook` chains several
                    if getattr(part, "execution_device", None) is not None:
                        part.execution_device = self._offload_device

    # ----------------------------------------------------------------------------------------------- stages

    def check_scheduler(self) -> None:
        check_scheduler(self.scheduler)

    def __setattr__(self, name, value):
        if name == "scheduler":  # a swap is checked where it enters: `pipe.scheduler = ...`
            check_scheduler(value)
        super().__setattr__(name, value)

    def require_language_model(self, use: str) -> None:
        """A pipeline without its language model (a decoder alone) draws given visual tokens only."""
        if self.language_model is None or self.processor is None:
            raise ValueError(f"{use} needs the pipeline's language_model and processor, and this pipeline has none: "
                             f"load it with LaVITPipeline.from_pretrained(folder, language_model=LaVITForCausalLM."
                             f"from_pretrained(model), processor=LaVITProcessor.from_pretrained(model))")

    def check_decode_request(self, height, width, num_inference_steps, images: int, guidance_scale) -> None:
        """Bounds the decoding of `images` images (settings resolved by `decode_settings`) before anything is
        allocated (`check_decode_request`: sizes, steps and memory, the decoder's own limits); called before the
        language model runs, so a request the decoder cannot serve costs no token generation."""
        GUIDANCE_SCALE.check("guidance_scale", guidance_scale)
        check_decode_request(height, width, num_inference_steps, images * (1 + (guidance_scale != 1)),
                             size_multiple=self.size_multiple, image_size=self.condition_encoder.config.image_size,
                             vae_scale_factor=self.vae_scale_factor, unet=self.unet, scheduler=self.scheduler,
                             device=self._execution_device)

    def encode_prompt(self, prompt, negative_prompt=None, image=None, device=None) -> dict:
        """Prompts (and their images) -> the language model's inputs on `device`, with the negative prompt of its
        guidance."""
        device = device or self._execution_device
        inputs = self.processor(text=prompt, images=image, padding=True, return_tensors="pt")
        inputs = {name: value.to(device) for name, value in inputs.items()}
        if negative_prompt is not None:
            negative = self.processor(text=negative_prompt, padding=True, return_tensors="pt")
            inputs["negative_input_ids"] = negative["input_ids"].to(device)
            inputs["negative_attention_mask"] = negative["attention_mask"].to(device)
        return inputs

    def generate_visual_tokens(self, inputs: dict, generator, token_generation_kwargs: dict):
        """Stage 1: the language model's visual tokens, packed (`code_ids (T,)`, `token_counts (B,)`)."""
        language_model = self.language_model
        hook = getattr(language_model, "_hf_hook", None)
        if hook is not None:  # model offload: its hook moves the model at `forward`, which generation does not call
            hook.pre_forward(language_model)
        return language_model.generate_image_tokens(**inputs, generator=generator, **token_generation_kwargs)

    def encode_visual_tokens(self, tokens: LaVITTokenizationOutput, device=None) -> LaVITDetokenizerConditions:
        """Stage 2: visual tokens -> UNet conditions; with decoder guidance the negative ones first, in one batch."""
        device = device or self._execution_device
        return self.condition_encoder(tokens.code_ids.to(device), tokens.token_counts.to(device),
                                      with_negative=self.do_classifier_free_guidance)

    def prepare_latents(self, batch_size, height, width, generators: list[torch.Generator], latents=None,
                        device=None):
        """Initial latents (B, C, H / f, W / f) on `device` drawn with one generator per image, or the given
        `latents` once their shape is checked."""
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        device, dtype = device or self._execution_device, self.unet.dtype
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device, dtype)
        return randn_tensor(shape, generator=generators, device=device, dtype=dtype)

    def added_cond_kwargs(self, conditions: LaVITDetokenizerConditions, height: int, width: int):
        return self.condition_encoder.condition.added_cond_kwargs(conditions, height, width)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. A float16 VAE whose config asks for it (`force_upcast`: the SD VAEs overflow
        in float16) decodes in float32, as diffusers' SD/SDXL pipelines do; bfloat16 decodes as it is."""
        vae = self.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        shift = vae.config.get("shift_factor") or 0.0
        latents = latents.to(torch.float32 if upcast else dtype)
        images = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        return images

    # ----------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, image=None,
        num_images_per_prompt: int = 1, token_guidance_scale: float | None = None, guidance_scale: float | None = None,
        num_inference_steps: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
        output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        token_generation_config: LaVITImageGenerationConfig | None = None, **token_generation_kwargs,
    ):
        r"""
        Prompt -> images. Args:
            prompt (`str` or `list[str]`): text prompts; with `image`, each `<image>` in a prompt takes the next image.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch of the language model's
                guidance (default: `[IMG]` alone, the official recipe); one, or one per prompt.
            image (images, *optional*): the prompt images (paths, PIL images, arrays or tensors).
            num_images_per_prompt (`int`): images per prompt, in prompt order.
            token_guidance_scale (`float`, *optional*): classifier-free guidance of the language model on visual-token
                log-probabilities (default 4.0; official 4.0 for text and 5.0 for image+text prompts).
            guidance_scale (`float`, *optional*): classifier-free guidance of the diffusion decoder (default:
                `condition_encoder.config.guidance_scale`, official 7.0); 1 turns it off.
            num_inference_steps (`int`, *optional*), height, width (`int`, *optional*, multiples of `size_multiple`):
                denoising steps and output size (defaults: the condition encoder's config).
            generator (`torch.Generator` or one per image): seeds the visual tokens and the initial latents; one
                generator gives every image its own stream, so a prompt gets the same images alone or in a batch;
                in a list, entry i seeds image i's stream (`g` and `[g]` give one image the same pixels).
            latents (`torch.Tensor`, *optional*): initial latents `(B, C, H / f, W / f)` instead of drawn ones.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"`; return_dict (`bool`): an
                `ImagePipelineOutput`, or a tuple `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step, timestep, tensors)` after every
                denoising step, with the tensors named in `callback_on_step_end_tensor_inputs`; the dict it returns
                replaces them (e.g. edited `latents`); setting `pipe._interrupt = True` stops the loop.
            token_generation_config ([`LaVITImageGenerationConfig`], *optional*) and `token_generation_kwargs`: the
                language model's sampling (`do_sample`, `top_k`, `top_p`, `temperature`), token budget
                (`min_new_tokens`, `max_new_tokens`), `image_inputs`, `cache_implementation`, `compile_decoding`.
        Reconstruction (image -> tokens -> image) is [`reconstruct`].
        """
        # 1. check inputs and settings (None is the default; 0 is a size, and refused): each argument by its name
        check_call_arguments({name: value for name, value in locals().items() if name in CALL_ARGUMENTS})
        check_negative_prompt(prompt, negative_prompt)
        self.check_scheduler()
        height, width, num_inference_steps, guidance_scale = self.decode_settings(height, width, num_inference_steps,
                                                                                  guidance_scale)
        self.require_language_model("prompt -> images")
        prompts = 1 if isinstance(prompt, str) else len(prompt)
        self.check_decode_request(height, width, num_inference_steps, prompts * num_images_per_prompt, guidance_scale)
        if token_guidance_scale is not None:
            token_generation_kwargs["guidance_scale"] = token_guidance_scale
        settings = LaVITImageGenerationConfig.resolve(token_generation_config, {
            **token_generation_kwargs, "num_images_per_prompt": num_images_per_prompt}, caller=self.__call__)
        # 2. stage 1: the language model writes the visual tokens of every image
        inputs = self.encode_prompt(prompt, negative_prompt, image, self._execution_device)
        tokens = self.generate_visual_tokens(inputs, generator, {"generation_config": settings})
        # 3. stages 2 and 3: conditions, denoising, pixels
        return self.decode_visual_tokens(
            tokens, num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, generator=generator, latents=latents, height=height,
            width=width, output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    @torch.no_grad()
    def reconstruct(self, image, image_selection: LaVITImageSelection | dict | None = None, **decode_kwargs):
        """
        Image -> visual tokens (the language model's visual tokenizer; `image_selection`, e.g. `{"max_tokens": 64}`,
        picks how many) -> image: what the discrete tokens keep. `decode_kwargs` are those of [`decode_visual_tokens`]
        (`guidance_scale`, `num_inference_steps`, `generator`, `height`, `width`, `output_type`, ...).
        """
        check_keywords(self.reconstruct, decode_kwargs, keyword_names(self.decode_visual_tokens) - {"tokens"})
        self.require_language_model("reconstruct (its visual tokenizer)")
        pixel_values = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        visual_tokenizer = self.language_model.visual_tokenizer
        hook = getattr(self.language_model, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.language_model)
        device = self._execution_device  # not the tokenizer's: offloaded weights wait on the meta device
        tokens = visual_tokenizer.tokenize(pixel_values.to(device, visual_tokenizer.dtype), selection=image_selection)
        return self.decode_visual_tokens(tokens, **decode_kwargs)

    @torch.no_grad()
    def decode_visual_tokens(
        self,
        tokens: LaVITTokenizationOutput,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        """Packed visual tokens (`code_ids (T,)`, `token_counts (B,)`, as the language model or the visual tokenizer
        gives them) -> images: the decoder half of `__call__` (same arguments)."""
        # 1. settings, each argument checked by its name
        check_call_arguments({name: value for name, value in locals().items() if name in CALL_ARGUMENTS})
        self.check_scheduler()
        height, width, num_inference_steps, guidance_scale = self.decode_settings(height, width, num_inference_steps,
                                                                                  guidance_scale)
        self.check_decode_request(height, width, num_inference_steps, len(tokens.token_counts) * num_images_per_prompt,
                                  guidance_scale)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        # 2. conditions (negative ones first with guidance) and initial latents
        device = self._execution_device  # found by walking every module: once per call
        conditions = self.encode_visual_tokens(tokens, device)
        batch_size = len(tokens.token_counts)
        # one random stream per image (`row_generators`), for one generator and a list alike: an image's noise
        # depends on its own generator (or the seed and its index among its prompt's images) only, so
        # `generator=g` and `generator=[g]` give one image the same pixels, and image i of a batch drawn with
        # `[g0, g1, ...]` is what its prompt gets alone with `g_i`
        generator = row_generators(generator, batch_size, num_images_per_prompt, device)
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device)
        # 3. timesteps, then the denoising loop (the generators also drive stochastic schedulers)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        latents = self.denoise(latents, conditions, height, width, generator, callback_on_step_end,
                               callback_on_step_end_tensor_inputs)
        # 4. pixels
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            warn_non_finite(decoded)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def denoise(self, latents, conditions, height, width, generator, callback_on_step_end,
                callback_on_step_end_tensor_inputs) -> torch.Tensor:
        """The sampling loop: scale, predict (both guidance halves in one UNet batch), guide, step, call back."""
        scheduler = self.scheduler
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        # the conditions in the UNet's dtype: a condition encoder of another one (a bf16 save loaded with
        # trust_remote_code: diffusers makes the UNet float32, transformers keeps the saved bf16) would not match it
        unet_dtype = self.unet.dtype
        conditions = LaVITDetokenizerConditions(**{name: value.to(unet_dtype) if value.is_floating_point() else value
                                                   for name, value in conditions.items()})
        prompt_embeds = conditions.prompt_embeds
        self._num_timesteps = len(scheduler.timesteps)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for step, timestep in enumerate(scheduler.timesteps):
                if self.interrupt:
                    break
                branches = 2 if self.do_classifier_free_guidance else 1
                model_input = scheduler.scale_model_input(latents, timestep).repeat(branches, 1, 1, 1)
                noise_pred = self.unet(
                    model_input, timestep, encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=conditions.attention_mask,
                    added_cond_kwargs=self.added_cond_kwargs(conditions, height, width), return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    unconditional, conditional = noise_pred.chunk(2)
                    noise_pred = unconditional + self.guidance_scale * (conditional - unconditional)
                latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step, timestep, tensors)
                    latents, prompt_embeds = (checked_callback_output(outputs, name, available[name], step)
                                              for name in ("latents", "prompt_embeds"))
                progress_bar.update()
        return latents


def checked_callback_output(outputs, name: str, before: torch.Tensor, step: int) -> torch.Tensor:
    """The tensor `name` of what a step-end callback returned (`before` where it returned none): a dict is required,
    and a returned tensor must keep the shape of the one it replaces (other latents would draw an image of another
    size) and hold finite values."""
    if not isinstance(outputs, dict):
        raise ValueError(f"callback_on_step_end must return a dict of the tensors it was given (e.g. `return "
                         f"tensors`), got {type(outputs).__name__} at step {step}")
    value = outputs.get(name, before)
    if value is before:
        return before
    if not isinstance(value, torch.Tensor) or value.shape != before.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"callback_on_step_end returned {name} of shape {got} at step {step}; it must keep their "
                         f"shape {tuple(before.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"callback_on_step_end returned {name} holding NaN or infinite values at step {step}")
    return value


def warn_non_finite(images: torch.Tensor) -> None:
    """One warning when decoded images hold NaN or infinite values (a float16 overflow, or weights that hold them):
    they are returned as they are, and PIL/numpy outputs show them as black pixels."""
    bad = int((~torch.isfinite(images.flatten(1))).any(dim=1).sum())
    if bad:
        logger.warning(f"{bad} of {len(images)} decoded images hold NaN or infinite values (returned as they are; "
                       f"black in PIL/np outputs): in float16, decode in float32 or bfloat16 (e.g. "
                       f"pipe.vae.to(torch.float32)), and check the weights and latents for NaN")


def image_tokens_from_sequences(sequences: torch.LongTensor, config) -> LaVITTokenizationOutput:
    """Packed visual tokens of LM sequences (B, L) (as `generate(..., generation_mode="image")` returns them): each
    row's visual ids after its last `[IMG]` form one image. `config` is the language model's."""
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be LM sequences (batch, length), got shape {tuple(sequences.shape)}")
    is_start = sequences == config.image_start_token_id
    if not bool(is_start.any(dim=1).all()):
        raise ValueError("every sequence needs an [IMG] token before its visual ids")
    columns = torch.arange(sequences.shape[1], device=sequences.device)
    last_start = torch.where(is_start, columns, -1).max(dim=1, keepdim=True).values
    is_visual = (sequences >= config.visual_token_offset) & (sequences < config.visual_token_end)
    is_visual &= columns > last_start
    return LaVITTokenizationOutput(code_ids=sequences[is_visual] - config.visual_token_offset,
                                   token_counts=is_visual.sum(dim=1))


def _one_dtype(folder: Path, dtype, argument: str = "torch_dtype") -> torch.dtype:
    """The one `torch.dtype` every model of the pipeline in `folder` loads in: diffusers loads the UNet and VAE in
    float32 unless told (and reads a `torch.dtype` only), so the language model and condition encoder do too, where
    transformers would keep a bf16 save's dtype (mixed dtypes: the UNet's conditions would not match it). A name
    ("bfloat16") is its dtype; "auto" is the dtype the language model (else the condition encoder) was saved in."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":  # the saved dtype of the language model (its folder, or the root of a lavit <= 0.x one)
        dtype = next(filter(None, map(_saved_dtype, (folder / "language_model", folder / "condition_encoder", folder,
                                                     folder / LEGACY_DETOKENIZER_FOLDER))), "float32")
    return floating_dtype(dtype, f"{argument} (or 'auto')")  # "" is refused, never the default


def _saved_dtype(folder: Path) -> str | None:
    """The dtype a model folder's config.json records (`dtype`, or `torch_dtype` of older saves), or None."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = loads_json(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{config_file} is not a valid JSON file ({error}), so torch_dtype='auto' cannot read the "
                         f"dtype it was saved in: fix the file, or give torch_dtype") from None
    return (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None


def _component_loaders(trust_remote_code: bool) -> dict:
    """How `LaVITPipeline.from_pretrained` loads each custom component: `(folder, dtype) -> component`."""
    from transformers import AutoProcessor

    from .modeling_lavit import LaVITForCausalLM

    return {
        "language_model": lambda folder, dtype: LaVITForCausalLM.from_pretrained(folder, dtype=dtype).eval(),
        "processor": lambda folder, dtype: AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code),
        "condition_encoder": lambda folder, dtype: LaVITConditionEncoder.from_pretrained(folder, dtype=dtype).eval(),
    }


def _is_detokenizer_folder(folder: Path) -> bool:
    config_file = folder / "config.json"
    model_type = loads_json(config_file.read_text()).get("model_type") if config_file.is_file() else None
    return model_type == LaVITDetokenizerConfig.model_type


def copy_code_files(module_file: Path, folder: Path):
    """`module_file` and every file it imports relatively, transitively ([`code_files`]), into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in code_files(module_file):
        if path.resolve() != (folder / path.name).resolve():
            shutil.copyfile(path, folder / path.name)


__all__ = ["LaVITPipeline", "copy_code_files", "image_tokens_from_sequences"]
