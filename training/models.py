"""The models each stage trains or reads: built new from settings, loaded from a folder, or assembled from parts.

Every builder takes the stage's arguments dataclass (`training.arguments`) and raises a `ValueError` naming the flags
to give when they do not say which model to use.
"""

import importlib.util
from pathlib import Path

import torch
from lavit.modeling import (
    LaVITConfig,
    LaVITDetokenizer,
    LaVITForCausalLM,
    LaVITPipeline,
    LaVITTokenizerConfig,
    LaVITTokenizerModel,
)
from lavit.modeling.folders_lavit import is_lavit_pipeline_folder, language_model_folders
from lavit.processing import LaVITImageProcessor, LaVITProcessor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from lavit.command_inputs import lavit_model_paths, load_visual_tokenizer_of

from .arguments import load_config_preset
from .lora import lora_config

# kept in full precision under QLoRA: the frozen visual tokenizer's quantizer must see exact features
QLORA_SKIPPED_MODULES = ["visual_tokenizer", "visual_merger", "visual_projection", "lm_head"]
FINETUNING_TASKS = ("caption", "vqa", "chat")
# every LaVIT model a stage reads is loaded in float32, whatever dtype its folder was saved in (transformers' default
# keeps a bf16 save's dtype): `--bf16` computes over float32 weights, `--dtype bfloat16` casts them (`set_dtype`)
LOADED_IN = {"dtype": torch.float32}


def load_visual_tokenizer(path: str) -> LaVITTokenizerModel:
    """A visual tokenizer folder, or the frozen visual tokenizer inside a LaVIT model folder (or a pipeline's language
    model)."""
    if Path(path).expanduser().is_dir() and language_model_folders(path, with_processor=False) is not None:
        path = str(language_model_folders(path, with_processor=False)[0])
    model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
    if model_type == LaVITConfig.model_type:
        return LaVITForCausalLM.from_pretrained(path, **LOADED_IN).model.visual_tokenizer
    return LaVITTokenizerModel.from_pretrained(path, **LOADED_IN)


def build_tokenizer(script_args) -> LaVITTokenizerModel:
    """Stage 1's visual tokenizer: `--model` to continue one, else a new one from `--tokenizer_config`, whose frozen
    encoder is `--vision_model` (a CLIP/SigLIP vision tower, weights copied) when given."""
    if script_args.model:
        return LaVITTokenizerModel.from_pretrained(script_args.model, **LOADED_IN)
    if not script_args.tokenizer_config:
        raise ValueError("give --model (a tokenizer to continue) or --tokenizer_config (a new one)")
    settings = load_config_preset(script_args.tokenizer_config, "tokenizer")
    vision_model = None
    if script_args.vision_model:
        vision_model = AutoModel.from_pretrained(script_args.vision_model)
        vision_model = getattr(vision_model, "vision_model", vision_model)  # a full CLIP/SigLIP: its vision tower
        settings["vision_config"] = vision_model.config.to_dict()
    model = LaVITTokenizerModel(LaVITTokenizerConfig(**settings))
    if vision_model is not None:
        model.vision_model.load_state_dict(vision_model.state_dict())
    return model


def build_unified_model(script_args) -> tuple[LaVITForCausalLM, LaVITProcessor]:
    """A LaVIT model and its processor: loaded from `--model`, or assembled from a visual tokenizer and a text LM."""
    if script_args.model:
        model_path, processor_path = lavit_model_paths(script_args.model)
        return (LaVITForCausalLM.from_pretrained(model_path, **LOADED_IN),
                LaVITProcessor.from_pretrained(processor_path))
    if not (script_args.visual_tokenizer and script_args.language_model):
        raise ValueError("give --model (a LaVIT folder) or both --visual_tokenizer and --language_model")
    text_tokenizer = AutoTokenizer.from_pretrained(script_args.text_tokenizer or script_args.language_model)
    visual_tokenizer = load_visual_tokenizer_of(script_args.visual_tokenizer, "--visual_tokenizer")
    # the visual codes become new rows of the LM's vocabulary, after [IMG] and [/IMG]
    text_vocab_size = LaVITProcessor.add_image_tokens(text_tokenizer, visual_tokenizer.config.codebook_size)
    if text_tokenizer.pad_token is None:
        text_tokenizer.pad_token = text_tokenizer.eos_token
    language_model = AutoModelForCausalLM.from_pretrained(script_args.language_model)
    model = LaVITForCausalLM.from_components(visual_tokenizer, language_model, text_vocab_size=text_vocab_size)
    image_processor = LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config)
    return model, LaVITProcessor(image_processor, text_tokenizer)


def load_model_for_finetuning(script_args, training_args) -> LaVITForCausalLM:
    """The LaVIT model of `--model`, in 4 bits under `--qlora`, with LoRA adapters on its LM under `--lora`/`--qlora`
    (a `peft.PeftModel` then).

    Raises:
        ValueError: no `--model`, or a `--task` that is not one of `FINETUNING_TASKS`.
        RuntimeError: `--qlora` without a CUDA GPU or without bitsandbytes.
    """
    if not script_args.model:
        raise ValueError("give --model, the LaVIT folder to fine-tune")
    if script_args.task not in FINETUNING_TASKS:
        raise ValueError(f"--task must be 'caption', 'vqa' or 'chat', got {script_args.task!r}")
    model_path = lavit_model_paths(script_args.model)[0]
    if script_args.qlora:
        model = load_4bit_model(model_path, training_args.gradient_checkpointing)
    else:
        model = LaVITForCausalLM.from_pretrained(model_path, **LOADED_IN)
    if script_args.lora or script_args.qlora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(script_args.lora_target_modules, r=script_args.lora_r,
                                                  lora_alpha=script_args.lora_alpha,
                                                  lora_dropout=script_args.lora_dropout))
        if Path(model_path).expanduser().is_dir():  # the adapter's base, found from any folder it is loaded from
            model.peft_config["default"].base_model_name_or_path = str(Path(model_path).expanduser().resolve())
    return model


def load_4bit_model(path: str, gradient_checkpointing: bool) -> LaVITForCausalLM:
    """A LaVIT model whose LM is quantized to 4-bit NF4 (bitsandbytes; the visual modules and the head stay in full
    precision), prepared for k-bit training by PEFT."""
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("--qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes)")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=QLORA_SKIPPED_MODULES,
    )
    model = LaVITForCausalLM.from_pretrained(path, quantization_config=quantization)
    return prepare_model_for_kbit_training(model, gradient_checkpointing)


def build_detokenizer(script_args, visual_tokenizer: LaVITTokenizerModel) -> LaVITDetokenizer:
    """The detokenizer to train: `--detokenizer` to continue one, else a new one from `--detokenizer_config` sharing
    the visual tokenizer's codebook and feature decoder (its UNet, VAE and scheduler from `--diffusers_model` when
    given). The codebook is frozen, the feature decoder too unless `--train_feature_decoder`.

    Raises:
        ValueError: neither flag is given, or the detokenizer's codebook is not the visual tokenizer's.
    """
    if script_args.detokenizer:
        detokenizer = load_detokenizer(script_args.detokenizer)
    else:
        if not script_args.detokenizer_config:
            raise ValueError("give --detokenizer (a detokenizer to continue) or --detokenizer_config (a new one)")
        settings = load_config_preset(script_args.detokenizer_config, "detokenizer")
        detokenizer = LaVITDetokenizer.from_visual_tokenizer(visual_tokenizer, **settings)
        if script_args.diffusers_model:
            detokenizer.load_diffusers_components(script_args.diffusers_model)
    if not torch.equal(detokenizer.codebook.cpu(), visual_tokenizer.quantizer.codebook.cpu()):
        raise ValueError("the detokenizer's codebook differs from the visual tokenizer's: they were not trained "
                         "together")
    detokenizer.codebook.requires_grad_(False)
    detokenizer.decoder.requires_grad_(script_args.train_feature_decoder)
    return detokenizer


def load_detokenizer(folder: str) -> LaVITDetokenizer:
    """The whole pixel decoder of a `LaVITPipeline` folder (what stage 3 writes; its language model is not loaded),
    or a `LaVITDetokenizer` folder of lavit <= 0.x."""
    if is_lavit_pipeline_folder(folder):
        pipe = LaVITPipeline.from_pretrained(folder, language_model=None, processor=None)
        return LaVITDetokenizer.from_components(pipe.condition_encoder, pipe.unet, pipe.vae, pipe.scheduler)
    return LaVITDetokenizer.from_pretrained(folder, **LOADED_IN)


def pipeline_language_model_folder(script_args) -> tuple[str, str] | None:
    """`(model folder, processor folder)` of the language model that stage 3 saves beside the trained decoder, found
    by `language_model_folders` (a model folder, a pipeline folder or its `language_model/`): `--model`; else the
    language model of the pipeline `--detokenizer` continues (continuing a pipeline's decoder keeps its language
    model); else `--visual_tokenizer` when it is a LaVIT model folder; else None (the pipeline holds the decoder
    alone). Called before training, so a wrong `--model` costs no training.

    Raises:
        ValueError: `--model` is not a LaVIT model (or pipeline) folder with its processor; the message names the fix.
    """
    for flag in ("model", "detokenizer", "visual_tokenizer"):
        folder = getattr(script_args, flag, None)
        if not folder:
            continue
        try:
            folders = (language_model_folders(folder) if Path(folder).expanduser().is_dir()
                       else _hub_language_model(folder))
        except ValueError as error:
            if flag == "model":
                raise ValueError(f"--model {folder}: {error}") from error
            continue  # a decoder alone, or a tokenizer: no language model to keep
        if folders is not None:
            return str(folders[0]), str(folders[1])
        if flag == "model":
            raise ValueError(f"--model {folder} is not a LaVIT model folder (config.json of model_type "
                             f"{LaVITConfig.model_type!r}) nor a LaVITPipeline folder holding one; give the folder of "
                             f"a trained LaVITForCausalLM saved with its processor")
    return None


def _hub_language_model(name: str) -> tuple[str, str] | None:
    """A Hub id's LaVIT model (the model and processor of one repository), or None."""
    try:
        model_type = PretrainedConfig.get_config_dict(name)[0].get("model_type")
    except OSError:
        return None
    return (name, name) if model_type == LaVITConfig.model_type else None


CODEBOOK_WEIGHT = "model.visual_tokenizer.quantizer.codebook"  # in a LaVITForCausalLM's weight files


def require_same_codebook(language_model_folder: str, detokenizer: LaVITDetokenizer, codebook=None) -> None:
    """Raises ValueError when the language model of `language_model_folder` reads another visual tokenizer than the
    decoder decodes (its codebook differs: its visual tokens would be decoded as other codes). Without `codebook`,
    it is read from the folder's weight files alone (no model built), so stage 3 checks it before training."""
    if codebook is None:
        from safetensors import safe_open

        for file in sorted(Path(language_model_folder).expanduser().glob("*.safetensors")):
            with safe_open(str(file), "pt") as weights:
                if CODEBOOK_WEIGHT in weights.keys():
                    codebook = weights.get_tensor(CODEBOOK_WEIGHT)
        if codebook is None:  # a Hub id, or weights stored another way: checked when the model is loaded
            return
    if codebook.shape != detokenizer.codebook.shape or not torch.equal(codebook.cpu().float(),
                                                                       detokenizer.codebook.cpu().float()):
        raise ValueError(f"the language model of {language_model_folder} reads another visual tokenizer (its "
                         f"codebook differs from the trained decoder's): give --model a LaVIT model built on "
                         f"--visual_tokenizer")


def trained_pipeline(detokenizer: LaVITDetokenizer, language_model_folders: tuple[str, str] | None) -> LaVITPipeline:
    """The trained decoder as a `LaVITPipeline`, with the language model and processor of `language_model_folders`
    (`(model folder, processor folder)` from [`pipeline_language_model_folder`]; None: the decoder alone).

    Raises:
        ValueError: the language model's visual tokenizer has another codebook than the decoder (its visual tokens
            would be decoded as other codes)."""
    language_model = processor = None
    if language_model_folders is not None:
        language_model_folder, processor_folder = language_model_folders
        language_model = LaVITForCausalLM.from_pretrained(language_model_folder).eval()
        processor = LaVITProcessor.from_pretrained(processor_folder)
        require_same_codebook(language_model_folder, detokenizer,
                              codebook=language_model.visual_tokenizer.quantizer.codebook)
    return LaVITPipeline.from_detokenizer(language_model, processor, detokenizer.eval())
