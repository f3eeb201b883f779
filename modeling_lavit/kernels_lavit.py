"""The fast paths of LaVIT, and the one place that says where they are on by default.

- [`speed_defaults`]: the settings a device gets when the caller names none. On CUDA: FlexAttention for packed
  training rows (it skips the masked blocks, so all segments of a batch fit one row), the static KV cache and a
  compiled decoding step for generation (text answers, visual tokens, the pipeline). Elsewhere the CPU defaults stay:
  SDPA, the dynamic cache, eager decoding (FlexAttention has no CPU backward, and compiling costs more than it saves
  on short CPU runs).
- [`apply_liger_kernel_to_lavit`]: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) in the language model, and the fused
  linear cross-entropy over LaVIT's shared head, which then never materialises the `(B, L, vocab)` logits in training.
  [`register_liger_kernel`] lets `TrainingArguments(use_liger_kernel=True)` reach a LaVIT model: transformers' Trainer
  (and TRL's) pick Liger's patch by `config.model_type`, and `lavit` is not one Liger knows.

`liger_kernel` is optional: it is imported only by the functions that use it.
"""

import inspect
from dataclasses import dataclass
from functools import partial

import torch
from transformers.utils import logging

from .configuration_lavit import LaVITConfig

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class SpeedDefaults:
    """
    Args:
        packed_attn_implementation (`str`, *optional*): the language model's attention kernel for packed training rows
            (None: the model's own, SDPA).
        cache_implementation (`str`): the KV cache of `generate` and `generate_image_tokens` (`"static"`: preallocated,
            every decoding step has the same shapes).
        compile_decoding (`bool`): `torch.compile` the decoding step (with the static cache on CUDA: replayed as a CUDA
            graph).
    """

    packed_attn_implementation: str | None
    cache_implementation: str
    compile_decoding: bool


CPU_DEFAULTS = SpeedDefaults(packed_attn_implementation=None, cache_implementation="dynamic", compile_decoding=False)
CUDA_DEFAULTS = SpeedDefaults(packed_attn_implementation="flex_attention", cache_implementation="static",
                              compile_decoding=True)


def speed_defaults(device: "torch.device | str | None") -> SpeedDefaults:
    """The settings of `device` (a `torch.device`, a name such as `"cuda:0"`, or None for the CPU) where the caller
    gives none: [`CUDA_DEFAULTS`] on CUDA, [`CPU_DEFAULTS`] on every other device."""
    kind = torch.device(device).type if device is not None else "cpu"
    return CUDA_DEFAULTS if kind == "cuda" else CPU_DEFAULTS


# ------------------------------------------------------------------------------------------------- Liger kernels


def apply_liger_kernel_to_lavit(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """
    Liger kernels in a LaVIT model, with the arguments of Liger's `apply_liger_kernel_to_llama` (so the Trainer's
    `liger_kernel_config` applies as it does to a LLaMA):
    - the language model (`model.get_decoder()`) gets Liger's patch for its own model type (LLaMA, Mistral, Qwen, ...)
      with `rope`, `rms_norm`, `swiglu` and `cross_entropy`; Liger's loss forward is left out, since LaVIT's head
      scores text and visual ids and its loss reports both;
    - `fused_linear_cross_entropy`: LaVIT's loss in training becomes Liger's fused linear cross-entropy over the head
      (`LaVITForCausalLM.linear_cross_entropy`): no logits are made, the loss is the same within float rounding.
    The frozen visual tokenizer and the visual merger are not touched. A language model of a type Liger has no patch
    for keeps its layers (a warning says so); the fused loss still applies.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model is None or getattr(model.config, "model_type", None) != LaVITConfig.model_type:
        raise ValueError("apply_liger_kernel_to_lavit patches a LaVIT model instance: give model=LaVITForCausalLM")
    # 1. the language model: Liger's patch for its model type, without Liger's own loss forward
    language_model = model.get_decoder()
    text_type = language_model.config.model_type
    apply_to_language_model = MODEL_TYPE_TO_APPLY_LIGER_FN.get(text_type)
    if apply_to_language_model is None:
        logger.warning(f"Liger has no kernels for a {text_type!r} language model: only LaVIT's loss is fused")
    else:
        settings = dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=False, rms_norm=rms_norm,
                        swiglu=swiglu, **kwargs)
        accepted = inspect.signature(apply_to_language_model).parameters
        apply_to_language_model(model=language_model, **{name: value for name, value in settings.items()
                                                         if name in accepted})
    # 2. LaVIT's loss over the shared head: summed per modality, so `reduction="sum"`
    model.linear_cross_entropy = (partial(liger_fused_linear_cross_entropy, reduction="sum")
                                  if fused_linear_cross_entropy else None)


def register_liger_kernel() -> None:
    """Registers [`apply_liger_kernel_to_lavit`] under the `lavit` model type in Liger's table, which transformers'
    `Trainer(args=TrainingArguments(use_liger_kernel=True))` and TRL's trainers read (through Liger's
    `_apply_liger_kernel_to_instance`). `LaVITTrainer` calls it when `use_liger_kernel` is set; with the plain Trainer,
    call it once before `train()`.

    Raises:
        ImportError: liger-kernel is not installed (`pip install "lavit[liger]"`).
    """
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:
        raise ImportError("use_liger_kernel needs the liger-kernel package (Triton kernels, CUDA): "
                          "pip install 'lavit[liger]'") from error
    MODEL_TYPE_TO_APPLY_LIGER_FN[LaVITConfig.model_type] = apply_liger_kernel_to_lavit


__all__ = ["CPU_DEFAULTS", "CUDA_DEFAULTS", "SpeedDefaults", "apply_liger_kernel_to_lavit", "register_liger_kernel",
           "speed_defaults"]
