"""LaVIT processor: text tokenizer + image processor.

Placeholder contract: each `<image>` in the text becomes an image span in `input_ids`, and `pixel_values` holds the
images in placeholder order. How many visual tokens an image takes is decided by the frozen visual tokenizer's
selector, so the span's form depends on whether the processor has that tokenizer:
- expanded (after `processor.set_visual_tokenizer(model)`): `[IMG] v_1 ... v_n [/IMG]` with the image's n code ids
  (LM ids) and `image_keep_mask` (num_images, N) saying which patches they are. `input_ids` then is the very sequence
  the LM reads, so labels, `max_length`, `Trainer`'s target counts and TRL's collators all see the model's length;
- compact (default): the pair `[IMG] [/IMG]`; the model runs the selector and inserts the n tokens itself, so
  lengths given here (`max_length`) count text tokens and placeholder pairs, not visual tokens.
Both give the same model outputs.
"""


import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_lavit import flatten_images

logger = logging.get_logger(__name__)

IMAGE_START_TOKEN = "[IMG]"
IMAGE_END_TOKEN = "[/IMG]"

# Vicuna-v1 style turns (the format of the official video LaVIT SFT model); images render as the placeholder
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = namespace(value='') %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set text.value = text.value + '<image>' %}"
    "{% elif item['type'] == 'text' %}{% set text.value = text.value + item['text'] %}{% endif %}"
    "{% endfor %}{% set text = text.value %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ text + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + text + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + text + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LaVITProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor ([`LaVITImageProcessor`]): turns images into `pixel_values`.
        tokenizer: the LM's text tokenizer; it must know `[IMG]` and `[/IMG]` as special tokens whose ids are the
            config's `text_vocab_size` and `text_vocab_size + 1` (see [`LaVITProcessor.add_image_tokens`]).
        chat_template (`str`, *optional*): Jinja template for chat messages; a Vicuna-style one by default.
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder users write in text.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>"):
        self.image_token = image_token
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        unknown = [token for token in (IMAGE_START_TOKEN, IMAGE_END_TOKEN) if token not in tokenizer.get_vocab()]
        if unknown:
            raise ValueError(f"the tokenizer does not know {unknown}; call LaVITProcessor.add_image_tokens(tokenizer) "
                             f"first")
        self.image_start_token_id = tokenizer.convert_tokens_to_ids(IMAGE_START_TOKEN)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(IMAGE_END_TOKEN)

    @staticmethod
    def add_image_tokens(tokenizer) -> int:
        """Adds `[IMG]` and `[/IMG]` as special tokens right after the text vocabulary (the official layout) and
        returns the text vocabulary size (the config's `text_vocab_size`)."""
        text_vocab_size = len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_START_TOKEN, IMAGE_END_TOKEN]})
        ids = tokenizer.convert_tokens_to_ids([IMAGE_START_TOKEN, IMAGE_END_TOKEN])
        if ids != [text_vocab_size, text_vocab_size + 1]:
            raise ValueError(f"[IMG]/[/IMG] got ids {ids}, expected {[text_vocab_size, text_vocab_size + 1]}")
        return text_vocab_size

    def set_visual_tokenizer(self, visual_tokenizer, **image_selection):
        """
        Makes the processor write expanded image spans (module docstring): `visual_tokenizer` is a LaVIT model or its
        frozen [`LaVITTokenizerModel`] (`model.visual_tokenizer`); `image_selection` (`max_tokens`, `keep_ratio`,
        `mode`) goes to its `tokenize`. `None` goes back to compact placeholders. The tokenizer is not saved with
        the processor (pass it again after loading).
        """
        tokenizer = getattr(visual_tokenizer, "visual_tokenizer", visual_tokenizer)
        if tokenizer is not None and not hasattr(tokenizer, "tokenize"):
            raise ValueError(f"set_visual_tokenizer needs a LaVIT model or its visual tokenizer, got "
                             f"{type(visual_tokenizer).__name__}")
        self._expansion = _NotSaved(tokenizer, dict(image_selection)) if tokenizer is not None else None

    def replace_image_placeholders(self, text: str) -> str:
        """Each `<image>` placeholder -> the compact pair `[IMG][/IMG]` that the model expands."""
        return text.replace(self.image_token, IMAGE_START_TOKEN + IMAGE_END_TOKEN)

    def __call__(
        self,
        images=None,
        text=None,
        padding: bool | str = True,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Text with `<image>` placeholders (one per image, in order) and images -> `input_ids`, `attention_mask` and
        `pixel_values`. Images without text get one placeholder each (captioning prompts). `truncation` with
        `max_length` cuts rows on the right, never between `[IMG]` and `[/IMG]`; images cut off are dropped.
        `add_special_tokens` defaults to False: official LaVIT prompts carry no BOS.
        """
        flat_images = flatten_images(images)
        if text is None:
            if not flat_images:
                raise ValueError("give text, images or both")
            text = self.image_token * len(flat_images)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(item, str) for item in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if kwargs:
            logger.warning(f"LaVITProcessor ignores the arguments {sorted(kwargs)} (generation options belong to "
                           f"generate, or to generate_kwargs in pipelines)")
        placeholders_per_text = [item.count(self.image_token) for item in texts]
        if sum(placeholders_per_text) != len(flat_images):
            raise ValueError(f"the text holds {sum(placeholders_per_text)} {self.image_token} placeholder(s) "
                             f"(per text: {placeholders_per_text}) but {len(flat_images)} image(s) were given")
        empty = [index for index, item in enumerate(texts) if not item.strip()]
        if empty:
            raise ValueError(f"text {empty} is empty: give a prompt or an {self.image_token} placeholder")
        encoded = self.tokenizer(
            [self.replace_image_placeholders(item) for item in texts], add_special_tokens=add_special_tokens
        )["input_ids"]

        image_inputs = self.image_processor(flat_images, return_tensors="pt") if flat_images else {}
        tokens = self._tokenize_images(image_inputs["pixel_values"]) if flat_images and self.expands_images else None
        kept_images, image_cursor = [], 0
        for row, ids in enumerate(encoded):
            row_images = list(range(image_cursor, image_cursor + placeholders_per_text[row]))
            image_cursor += len(row_images)
            if tokens is not None:
                ids = self._expand_row(ids, [tokens[index] for index in row_images])
            if truncation and max_length is not None and len(ids) > max_length:
                ids = self._truncate(ids, max_length)
            encoded[row] = ids
            kept_images.extend(row_images[: ids.count(self.image_start_token_id)])
            if not ids:
                raise ValueError(f"text {row} has no tokens left (empty, or truncated to max_length={max_length})")

        pad_kwargs = {} if padding_side is None else {"padding_side": padding_side}
        text_inputs = self.tokenizer.pad(
            {"input_ids": encoded}, padding=padding, max_length=max_length if padding == "max_length" else None,
            return_tensors=return_tensors, **pad_kwargs,
        )
        data = dict(text_inputs)
        if kept_images:
            data.update({name: value[kept_images] for name, value in image_inputs.items()})
            if tokens is not None:
                data["image_keep_mask"] = torch.stack([tokens[index][1] for index in kept_images])
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def expands_images(self) -> bool:
        """Whether image spans are written expanded (see `set_visual_tokenizer`)."""
        return getattr(self, "_expansion", None) is not None

    def _tokenize_images(self, pixel_values: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
        """Each image's LM ids (code ids after `[/IMG]`, the vocabulary layout of `add_image_tokens`) and keep mask."""
        tokenizer, selection = self._expansion.value
        parameter = next(tokenizer.parameters())
        with torch.no_grad():
            output = tokenizer.tokenize(pixel_values.to(parameter.device, parameter.dtype), **selection)
        offset = self.image_end_token_id + 1
        return [((codes + offset).tolist(), mask) for codes, mask in
                zip(output.per_image(), output.keep_mask.cpu(), strict=True)]

    def _expand_row(self, ids: list[int], images: list[tuple[list[int], torch.Tensor]]) -> list[int]:
        """Fills the compact pairs of one row, in order, with their images' visual ids."""
        expanded, cursor = [], 0
        for token in ids:
            expanded.append(token)
            if token == self.image_start_token_id:
                expanded.extend(images[cursor][0])
                cursor += 1
        return expanded

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Cuts a row on the right at `max_length` tokens, before any image span the cut would split."""
        cut = max_length
        starts = [index for index, token in enumerate(ids[:cut]) if token == self.image_start_token_id]
        if starts and self.image_end_token_id not in ids[starts[-1] : cut]:
            cut = starts[-1]  # never keep an [IMG] without its [/IMG]
        return ids[:cut]

    def post_process_multimodal_output(self, generated_outputs, skip_special_tokens=True, generation_mode=None,
                                       **kwargs):
        """`any-to-any` pipeline hook: images come back from `LaVITForCausalLM.decode_image_tokens` already decoded
        (PIL images); text is decoded by the tokenizer."""
        if generation_mode == "image":
            return list(generated_outputs)
        return super().post_process_multimodal_output(
            generated_outputs, skip_special_tokens=skip_special_tokens, generation_mode=generation_mode, **kwargs
        )

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_keep_mask"]


class _NotSaved:
    """Holds the visual tokenizer for the processor: `ProcessorMixin.to_dict` deep-copies the processor's attributes
    before keeping the savable ones, and a model must be neither copied nor written into processor_config.json."""

    def __init__(self, *value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


__all__ = ["LaVITProcessor"]
