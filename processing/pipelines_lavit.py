"""`lavit-text-to-image`: a transformers pipeline task for LaVIT image generation.

    >>> pipe = pipeline("lavit-text-to-image", model="path/to/lavit", trust_remote_code=True)
    >>> pipe("a red bus", guidance_scale=4.0, generator=torch.Generator().manual_seed(0))

Each prompt gives one result per image: `{"code_ids": [...], "token_count": n}`: the language model's visual tokens.
Pixels are drawn by the diffusers `LaVITPipeline` (`pipe.decode_visual_tokens(...)`, or `pipe(prompt)` end to end),
which holds the language model as one of its components. Captioning and VQA use the built-in `image-text-to-text` task.
"""

import inspect
from dataclasses import fields

import torch
from torch import nn
from transformers import BatchFeature, Pipeline

from .saving_lavit import SaveBesideSourcesMixin


def image_generation_arguments(model) -> set[str]:
    """The keyword arguments the pipeline forwards to `model.generate_image_tokens`: its keyword-only parameters and
    the fields of its settings class (`image_generation_config_class`), read from the model, so the two never drift
    (this folder may be copied apart from the modeling files)."""
    parameters = inspect.signature(model.generate_image_tokens).parameters.values()
    keyword_only = {parameter.name for parameter in parameters if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    return keyword_only | {field.name for field in fields(model.image_generation_config_class)}


class LaVITTextToImagePipeline(SaveBesideSourcesMixin, Pipeline):
    """Text (or multimodal) prompts -> generated visual tokens (module docstring). Arguments that
    `generate_image_tokens` does not take ([`image_generation_arguments`]), other than `images` and
    `negative_prompt`, raise a `ValueError` naming them."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def source_objects(self) -> list:
        """`save_pretrained` writes the model and its processor: never into a folder holding or inside theirs."""
        return [self.model, self.processor, getattr(self.processor, "tokenizer", None),
                getattr(self.processor, "image_processor", None)]

    def _sanitize_parameters(
        self, images=None, negative_prompt: str | list[str] | None = None, **kwargs
    ) -> tuple[dict, dict, dict]:
        """The pipeline's arguments split into preprocess, forward and postprocess ones."""
        preprocess_params = {}
        if images is not None:
            preprocess_params["images"] = images
        forward_params = {}
        for name in image_generation_arguments(self.model) & set(kwargs):
            forward_params[name] = kwargs.pop(name)
        if negative_prompt is not None:
            forward_params["negative_prompt"] = negative_prompt
        if kwargs:
            raise ValueError(f"lavit-text-to-image does not take {sorted(kwargs)}")
        return preprocess_params, forward_params, {}

    def preprocess(self, prompt: str | list[str], images=None) -> BatchFeature:
        """A text prompt (with `<image>` placeholders when `images` are given: multimodal prompts)."""
        return self.processor(images=images, text=prompt, return_tensors="pt")

    def _forward(
        self, model_inputs: BatchFeature, negative_prompt: str | list[str] | None = None, **generate_kwargs
    ) -> dict[str, torch.Tensor]:
        """Generates the visual tokens of a batch of prompts: `code_ids` (num_prompts, images per prompt, longest
        count; padded with -1) and `token_counts`."""
        if negative_prompt is not None:
            negative = self.processor(text=negative_prompt, return_tensors="pt")
            generate_kwargs["negative_input_ids"] = negative["input_ids"].to(self.device)
            generate_kwargs["negative_attention_mask"] = negative["attention_mask"].to(self.device)
        tokens = self.model.generate_image_tokens(**model_inputs, **generate_kwargs)
        # prompt-first tensors (prompts, images per prompt, ...): with `batch_size > 1` the pipeline splits the
        # outputs along the first axis, one item per prompt; plain tensors, because it moves outputs to the CPU and
        # would turn a model output class into a dict
        num_prompts = model_inputs["input_ids"].shape[0]
        codes = nn.utils.rnn.pad_sequence(tokens.per_image(), batch_first=True, padding_value=-1)
        outputs = {"code_ids": codes.view(num_prompts, -1, codes.shape[1]),
                   "token_counts": tokens.token_counts.view(num_prompts, -1)}
        return outputs

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict]:
        """One result per image: `code_ids` and `token_count`."""
        code_ids, token_counts = model_outputs["code_ids"].flatten(0, 1), model_outputs["token_counts"].flatten()
        results = [{"code_ids": ids[:count].tolist(), "token_count": int(count)}
                   for ids, count in zip(code_ids, token_counts, strict=True)]
        return results


__all__ = ["LaVITTextToImagePipeline"]
