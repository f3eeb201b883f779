"""LoRA on LaVIT: adapters on the language model only.

Module names such as `q_proj` and `v_proj` exist in the LM and in the token mergers, so the common
`target_modules=["q_proj", "v_proj"]` would also put adapters into the frozen visual tokenizer, where they never train
(its selector and quantizer run without gradients) and change the targets it computes. `lora_config` turns names into
a pattern that matches the LM's modules only:

    >>> from lavit.training.lora import lora_config
    >>> trainer = trl.SFTTrainer(model=model, processing_class=processor, peft_config=lora_config(r=16), ...)
"""

import re

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def language_model_targets(target_modules: str | list[str] | tuple[str, ...] = LM_PROJECTIONS) -> str:
    """
    PEFT `target_modules` limited to the language model: a list (or comma-separated string) of module names becomes
    the regex `.*language_model.*\\.(name|...)`; a string holding a regex (any of `.*()[]|\\`) is returned unchanged,
    as PEFT reads it.
    """
    if isinstance(target_modules, str):
        if any(character in target_modules for character in ".*()[]|\\"):
            return target_modules
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one module of the language model (e.g. q_proj)")
    return r".*language_model.*\.(" + "|".join(re.escape(name) for name in target_modules) + ")"


def lora_config(target_modules: str | list[str] | tuple[str, ...] = LM_PROJECTIONS, **kwargs):
    """A `peft.LoraConfig` (`task_type="CAUSAL_LM"`; `kwargs` go to it) whose adapters sit on the LM only."""
    from peft import LoraConfig

    return LoraConfig(target_modules=language_model_targets(target_modules), task_type="CAUSAL_LM", **kwargs)
