"""`lavit-text-to-image`: a transformers pipeline task for LaVIT image generation.

    >>> pipe = pipeline("lavit-text-to-image", model="path/to/lavit", trust_remote_code=True)
    >>> pipe("a red bus", guidance_scale=4.0, generator=torch.Generator().manual_seed(0))

Each prompt gives one result per image: `{"code_ids": [...], "token_count": n}`, plus `"image"` (a PIL image) when
the model folder has a pixel decoder (`detokenizer/`); `height`, `width`, `num_inference_steps` and
`decoder_guidance_scale` go to it, and one `generator` seeds both the tokens and the pixels.
Captioning and VQA use the built-in `image-text-to-text` task.
"""

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature, Pipeline

IMAGE_GENERATION_ARGUMENTS = (
    "guidance_scale", "do_sample", "top_k", "top_p", "temperature", "min_new_tokens", "max_new_tokens",
    "num_images_per_prompt", "generator", "negative_input_ids", "image_inputs",
)
PIXEL_DECODING_ARGUMENTS = ("height", "width", "num_inference_steps", "decoder_guidance_scale")


class LaVITTextToImagePipeline(Pipeline):
    """Text (or multimodal) prompts -> generated visual tokens, and images when the model has a pixel decoder (module
    docstring). Arguments not in `IMAGE_GENERATION_ARGUMENTS`, `PIXEL_DECODING_ARGUMENTS`, `images` or
    `negative_prompt` raise a `ValueError` naming them."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self, images=None, negative_prompt: str | list[str] | None = None, **kwargs
    ) -> tuple[dict, dict, dict]:
        """The pipeline's arguments split into preprocess, forward and postprocess ones."""
        preprocess_params = {}
        if images is not None:
            preprocess_params["images"] = images
        forward_params = {}
        for name in IMAGE_GENERATION_ARGUMENTS + PIXEL_DECODING_ARGUMENTS:
            if name in kwargs:
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
        """Generates the visual tokens (and pixels, (num_prompts, images per prompt, 3, H, W) in [0, 1]) of a batch of
        prompts: `code_ids` (num_prompts, images per prompt, longest count; padded with -1) and `token_counts`."""
        if negative_prompt is not None:
            negative = self.processor(text=negative_prompt, return_tensors="pt")
            generate_kwargs["negative_input_ids"] = negative["input_ids"].to(self.device)
            generate_kwargs["negative_attention_mask"] = negative["attention_mask"].to(self.device)
        decode_kwargs = {
            name: generate_kwargs.pop(name) for name in PIXEL_DECODING_ARGUMENTS if name in generate_kwargs
        }
        tokens = self.model.generate_image_tokens(**model_inputs, **generate_kwargs)
        # prompt-first tensors (prompts, images per prompt, ...): with `batch_size > 1` the pipeline splits the
        # outputs along the first axis, one item per prompt; plain tensors, because it moves outputs to the CPU and
        # would turn a model output class into a dict
        num_prompts = model_inputs["input_ids"].shape[0]
        codes = nn.utils.rnn.pad_sequence(tokens.per_image(), batch_first=True, padding_value=-1)
        outputs = {"code_ids": codes.view(num_prompts, -1, codes.shape[1]),
                   "token_counts": tokens.token_counts.view(num_prompts, -1)}
        if getattr(self.model, "can_decode_pixels", False):
            decode_kwargs["guidance_scale"] = decode_kwargs.pop("decoder_guidance_scale", None)
            pixels = self.model.decode_image_tokens(
                tokens.code_ids, tokens.token_counts, generator=generate_kwargs.get("generator"), output_type="pt",
                num_images_per_prompt=tokens.token_counts.numel() // num_prompts, **decode_kwargs,
            )
            outputs["pixels"] = pixels.view(num_prompts, -1, *pixels.shape[1:])
        return outputs

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict]:
        """One result per image: `code_ids`, `token_count` and, with pixels, `image` (PIL)."""
        code_ids, token_counts = model_outputs["code_ids"].flatten(0, 1), model_outputs["token_counts"].flatten()
        results = [{"code_ids": ids[:count].tolist(), "token_count": int(count)}
                   for ids, count in zip(code_ids, token_counts, strict=True)]
        if "pixels" in model_outputs:
            pixels = model_outputs["pixels"].flatten(0, 1)
            # the detokenizer's `to_pil_images`, which this file cannot import: once installed, lavit.processing and
            # lavit.modeling are separate packages (only Hub folders hold both side by side)
            arrays = (pixels.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
            for result, array in zip(results, arrays, strict=True):
                result["image"] = Image.fromarray(array)
        return results


__all__ = ["LaVITTextToImagePipeline"]
