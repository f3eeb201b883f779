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

import inspect

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack

from .image_processing_lavit import flatten_images
from .saving_lavit import SaveBesideSourcesMixin

IMAGE_START_TOKEN = "[IMG]"
IMAGE_END_TOKEN = "[/IMG]"
# the selection arguments of LaVITTokenizerModel.tokenize (processing cannot import the modeling files once installed)
# text arguments transformers' processors take that are the processor's, not the text tokenizer's
PROCESSOR_ONLY_TEXT_KWARGS = ("return_mm_token_type_ids", "sanitize_control_tokens")


class LaVITProcessorKwargs(ProcessingKwargs, total=False):
    # official LaVIT prompts carry no BOS; rows are padded to the longest
    _defaults = {"text_kwargs": {"padding": True, "add_special_tokens": False},
                 "common_kwargs": {"return_tensors": "pt"}}


def visual_token(code: int) -> str:
    """The text tokenizer's special token for visual code `code` (LM id `text_vocab_size + 2 + code`)."""
    return f"<visual_{code}>"


# Vicuna-v1 style turns (the format of the official video LaVIT SFT model); images render as the placeholder; the
# assistant's text is a `{% generation %}` block, so `return_assistant_tokens_mask=True` marks it
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
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% generation %}{{ text + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def fill_image_spans(ids: list[int], image_start_token_id: int, visual_ids: list[list[int]]) -> list[int]:
    """One row of ids with each `[IMG]` followed by its image's visual ids (`visual_ids`, one list per `[IMG]`, in
    order): compact pairs -> expanded spans."""
    expanded, cursor = [], 0
    for token in ids:
        expanded.append(token)
        if token == image_start_token_id:
            expanded.extend(visual_ids[cursor])
            cursor += 1
    return expanded


def fill_per_token_values(ids: list[int], values: list, image_start_token_id: int, span_lengths: list[int]) -> list:
    """A per-token output of one row (offsets, token types) with one entry per visual slot `fill_image_spans` inserts
    (`span_lengths`: visual ids per `[IMG]`): the `[IMG]` token's value, as a zero-width offset at its end for
    offsets."""
    expanded, cursor = [], 0
    for token, value in zip(ids, values, strict=True):
        expanded.append(value)
        if token == image_start_token_id:
            filler = (value[1], value[1]) if isinstance(value, tuple | list) else value
            expanded.extend([filler] * span_lengths[cursor])
            cursor += 1
    return expanded


def truncate_row(ids: list[int], max_length: int, image_start_token_id: int, image_end_token_id: int) -> list[int]:
    """A row cut on the right at `max_length` tokens, before any image span the cut would split."""
    cut = max_length
    starts = [index for index, token in enumerate(ids[:cut]) if token == image_start_token_id]
    if starts and image_end_token_id not in ids[starts[-1] : cut]:
        cut = starts[-1]  # never keep an [IMG] without its [/IMG]
    return ids[:cut]


def pad_offsets(offsets: list, attention_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per-row (start, end) character offsets, padded with (0, 0) where `attention_mask` (B, L) marks padding (on the
    side the ids were padded)."""
    padded = []
    for row_offsets, row_mask in zip(offsets, attention_mask.tolist(), strict=True):
        row_offsets = [tuple(pair) for pair in row_offsets]
        pad = [(0, 0)] * (len(row_mask) - len(row_offsets))
        padded.append(row_offsets + pad if row_mask[0] == 1 or not pad else pad + row_offsets)
    return padded


class GuardedProcessorMixin(SaveBesideSourcesMixin, ProcessorMixin):
    """`ProcessorMixin` whose `save_pretrained` goes through lavit's save guard. It is the processor's one direct
    base because transformers reads a processor's `__mro__[1]` as its library base (its processor tester tells an
    updated processor by `replace_image_token` differing there), which the guard alone would not be."""


class LaVITProcessor(GuardedProcessorMixin):
    r"""
    Args:
        image_processor ([`LaVITImageProcessor`]): turns images into `pixel_values`.
        tokenizer: the LM's text tokenizer; it must know `[IMG]` and `[/IMG]` as special tokens whose ids are the
            config's `text_vocab_size` and `text_vocab_size + 1` (see [`LaVITProcessor.add_image_tokens`]).
        chat_template (`str`, *optional*): Jinja template for chat messages; a Vicuna-style one by default.
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder users write in text.
    """

    _auto_class = "AutoProcessor"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    valid_processor_kwargs = LaVITProcessorKwargs

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # running as a folder's remote code (diffusers loads `LaVITPipeline`'s processor this way, without passing
        # `trust_remote_code` on), this class's image processor is the same folder's code the user already trusted
        if not __name__.startswith("lavit."):
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def source_objects(self) -> list:
        """`save_pretrained` never mixes this processor's files into a folder holding, or inside, the folders its
        tokenizer and image processor were read from (`saving_lavit.save_beside_sources`)."""
        return [self, self.tokenizer, self.image_processor]

    @staticmethod
    def add_image_tokens(tokenizer, codebook_size: int = 0) -> int:
        """
        Adds `[IMG]` and `[/IMG]` as special tokens right after the text vocabulary (the official layout), then the
        `codebook_size` visual tokens (see [`add_visual_tokens`]); returns the text vocabulary size (the config's
        `text_vocab_size`).
        """
        text_vocab_size = len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_START_TOKEN, IMAGE_END_TOKEN]})
        ids = tokenizer.convert_tokens_to_ids([IMAGE_START_TOKEN, IMAGE_END_TOKEN])
        if ids != [text_vocab_size, text_vocab_size + 1]:
            raise ValueError(f"[IMG]/[/IMG] got ids {ids}, expected {[text_vocab_size, text_vocab_size + 1]}")
        LaVITProcessor.add_visual_tokens(tokenizer, codebook_size)
        return text_vocab_size

    @staticmethod
    def add_visual_tokens(tokenizer, codebook_size: int):
        """
        Gives the text tokenizer one special token per visual code (`<visual_k>`, id `text_vocab_size + 2 + k`) right
        after `[/IMG]`, as Emu3 and Chameleon do: `len(tokenizer)` is then the model's vocabulary, a text token added
        later gets an id past the visual ids (never visual code 0's), and `resize_token_embeddings(len(tokenizer))`
        keeps every visual row. Raises `ValueError` when `[/IMG]` is not the tokenizer's last token.
        """
        end_id = tokenizer.convert_tokens_to_ids(IMAGE_END_TOKEN)
        if codebook_size == 0 or tokenizer.convert_tokens_to_ids(visual_token(0)) == end_id + 1:
            return
        if len(tokenizer) != end_id + 1:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens; visual tokens go right after [/IMG] (id "
                             f"{end_id}), so it must be the last one")
        tokenizer.add_tokens([visual_token(code) for code in range(codebook_size)], special_tokens=True)

    def set_visual_tokenizer(self, visual_tokenizer, selection=None, **image_selection):
        """
        Makes the processor write expanded image spans (module docstring): `visual_tokenizer` is a LaVIT model or its
        frozen [`LaVITTokenizerModel`] (`model.visual_tokenizer`); `selection` (a `LaVITImageSelection` or a dict)
        and `image_selection` (its fields as keyword arguments: `max_tokens=64`) go to its `tokenize`; names that are
        not its fields raise `ValueError` here. `None` goes back to compact placeholders. The tokenizer is not saved
        with the processor (pass it again after loading).
        """
        # `self.tokenizer` is the text tokenizer (transformers' name); the visual one is always `visual_tokenizer`
        visual_tokenizer = getattr(visual_tokenizer, "visual_tokenizer", visual_tokenizer)
        if visual_tokenizer is not None and not hasattr(visual_tokenizer, "tokenize"):
            raise ValueError(f"set_visual_tokenizer needs a LaVIT model or its visual tokenizer, got "
                             f"{type(visual_tokenizer).__name__}")
        # the selection's type is the model's (this folder may be copied apart from the modeling files)
        if visual_tokenizer is None:
            self._expansion = None
            return
        selection = visual_tokenizer.selection_class.from_value(selection, **image_selection)
        self._expansion = _NotSaved(visual_tokenizer, selection)

    def replace_image_placeholders(self, text: str) -> str:
        """Each `<image>` placeholder -> the compact pair `[IMG][/IMG]` that the model expands."""
        return text.replace(self.image_token, IMAGE_START_TOKEN + IMAGE_END_TOKEN)

    def __call__(self, images=None, text: str | list[str] | None = None,
                 **kwargs: Unpack[LaVITProcessorKwargs]) -> BatchFeature:
        """
        Text with `<image>` placeholders (one per image, in order) and images -> `input_ids`, `attention_mask` and
        `pixel_values` (plus `image_keep_mask` (num_images, N) with expanded spans, module docstring). Images without
        text get one placeholder each (captioning prompts).

        Keyword arguments are transformers' processor arguments, flat or structured (`text_kwargs`, `images_kwargs`,
        `common_kwargs`): the text tokenizer's (`padding=True`, `truncation`, `max_length`, `padding_side`,
        `add_special_tokens=False`: official LaVIT prompts carry no BOS; any other argument of its `__call__`, e.g.
        `return_offsets_mapping`, so `apply_chat_template(..., return_assistant_tokens_mask=True)` works) and the
        image processor's (`size`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, ...). `truncation`
        with `max_length` cuts rows on the right, never between `[IMG]` and `[/IMG]`; images cut off are dropped.
        `return_text_replacement_offsets` reports where each `<image>` became `[IMG][/IMG]` (character spans, for
        `apply_chat_template`). `videos` and `audio` (and their arguments) are there because `apply_chat_template`
        passes them; LaVIT reads neither.

        Raises `ValueError` naming the problem: videos or audio given, no input, a placeholder count that differs
        from the image count, an empty text, LaVIT control tokens spelled in the text, unknown keyword arguments.
        """
        # 1. check the inputs and sort the keyword arguments by modality
        videos, audio = kwargs.pop("videos", None), kwargs.pop("audio", None)
        texts, flat_images, placeholders_per_text = self._check_inputs(images, text, videos, audio)
        text_kwargs, images_kwargs, return_offsets = self._call_kwargs(kwargs)
        padding, truncation = text_kwargs.pop("padding", True), text_kwargs.pop("truncation", False)
        max_length, padding_side = text_kwargs.pop("max_length", None), text_kwargs.pop("padding_side", None)
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return_tensors = text_kwargs.pop("return_tensors", "pt")
        # 2. tokenize the texts with each `<image>` as the compact pair `[IMG][/IMG]`
        tokenized = self.tokenizer([self.replace_image_placeholders(item) for item in texts], **text_kwargs)
        encoded = tokenized["input_ids"]
        self._check_control_ids(encoded, placeholders_per_text)
        # per-token outputs the caller asked the tokenizer for (offsets, token types, ...): cut and padded with the ids
        per_token = {key: list(values) for key, values in tokenized.items()
                     if key not in ("input_ids", "attention_mask")}
        # 3. images -> pixel_values, and their visual tokens when the processor writes expanded spans
        image_inputs = self.image_processor(flat_images, **{**images_kwargs, "return_tensors": "pt"}) \
            if flat_images else {}
        tokens = self._tokenize_images(image_inputs["pixel_values"]) if flat_images and self.expands_images else None
        # 4. fill the image spans and truncate, row by row
        kept_images = self._build_rows(encoded, per_token, placeholders_per_text, tokens,
                                       max_length if truncation else None)
        # 5. pad the rows, then add the inputs of the images whose spans remain
        data = self._pad(encoded, per_token, padding, max_length, padding_side, return_tensors)
        if return_offsets:
            data["text_replacement_offsets"] = [self.replacement_offsets(item) for item in texts]
        if kept_images:
            data.update({name: value[kept_images] for name, value in image_inputs.items()})
            if tokens is not None:
                data["image_keep_mask"] = torch.stack([tokens[index][1] for index in kept_images])
        return BatchFeature(data, tensor_type=return_tensors)

    def _call_kwargs(self, kwargs: dict) -> tuple[dict, dict, bool]:
        """(text tokenizer arguments, image processor arguments, return_text_replacement_offsets) from the call's
        keyword arguments, merged by transformers' `_merge_kwargs` with the defaults; a `ValueError` naming unknown
        ones (transformers would only warn and drop them)."""
        for group in [name for name, value in kwargs.items() if name.endswith("_kwargs") and value is None]:
            del kwargs[group]  # `text_kwargs=None` says nothing (transformers would fail reading it)
        tokenizer_only = inspect.signature(type(self.tokenizer).__call__).parameters
        known = {name for kind in LaVITProcessorKwargs.__annotations__.values()
                 for name in getattr(kind, "__annotations__", {})}
        known |= set(LaVITProcessorKwargs.__annotations__) | {"common_kwargs"}
        known |= set(getattr(self.image_processor, "valid_kwargs", ImagesKwargs).__annotations__)
        extra = {name: kwargs.pop(name) for name in list(kwargs) if name not in known and name in tokenizer_only}
        unknown = sorted(name for name in kwargs if name not in known)
        if unknown:
            raise ValueError(f"LaVITProcessor does not take the arguments {unknown}: it takes transformers' processor "
                             f"arguments and the text tokenizer's (generation options belong to generate, or to the "
                             f"pipeline call)")
        self._check_structured_kwargs(kwargs, set(tokenizer_only))
        merged = self._merge_kwargs(LaVITProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = {**merged["text_kwargs"], **extra}
        return_offsets = bool(merged.get("return_text_replacement_offsets")
                              or text_kwargs.pop("return_text_replacement_offsets", False))
        for name in PROCESSOR_ONLY_TEXT_KWARGS:
            text_kwargs.pop(name, None)
        images_kwargs = {name: value for name, value in merged["images_kwargs"].items() if name != "return_tensors"}
        return text_kwargs, images_kwargs, return_offsets

    def _check_structured_kwargs(self, kwargs: dict, tokenizer_only: set) -> None:
        """The structured groups (`text_kwargs`, `images_kwargs`, `common_kwargs`) hold only the arguments of their
        kind, checked as flat ones are: transformers would pass a misspelt text argument on silently, and fail on a
        text argument in `common_kwargs` with an internal TypeError."""
        groups = {
            "text_kwargs": set(TextKwargs.__annotations__) | tokenizer_only | {"return_text_replacement_offsets"},
            "images_kwargs": set(getattr(self.image_processor, "valid_kwargs", ImagesKwargs).__annotations__)
            | set(ImagesKwargs.__annotations__),
            # transformers gives `common_kwargs` to every modality's arguments: only what each of them takes
            "common_kwargs": set.intersection(*(set(getattr(kind, "__annotations__", {})) for name, kind in
                                                ProcessingKwargs.__annotations__.items() if name.endswith("_kwargs"))),
        }
        for group, allowed in groups.items():
            given = kwargs.get(group)
            if given is None:  # not given (a None was dropped above)
                continue
            if not isinstance(given, dict):
                raise ValueError(f"{group} must be a dict of arguments, got {type(given).__name__}")
            unknown = sorted(set(given) - allowed)
            if unknown:
                holds = {"text_kwargs": "the text tokenizer's arguments", "images_kwargs": "the image processor's",
                         "common_kwargs": ", ".join(sorted(allowed))}[group]
                raise ValueError(f"LaVITProcessor does not take {unknown} in {group}, which holds {holds}: give each "
                                 f"argument in its own group, or flat")

    def _check_inputs(self, images, text, videos, audio) -> tuple[list[str], list, list[int]]:
        """The texts, the flat list of images and the number of `<image>` placeholders in each text; a `ValueError`
        naming the problem when they do not fit together."""
        given = [name for name, value in (("videos", videos), ("audio", audio)) if value is not None]
        if given:
            raise ValueError(f"LaVITProcessor reads images and text only, got {given}")
        flat_images = flatten_images(images)
        if text is None:
            if not flat_images:
                raise ValueError("give text, images or both")
            text = self.image_token * len(flat_images)
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list | tuple) else None
        if not texts or not all(isinstance(item, str) for item in texts):
            wrong = text if texts is None else next((item for item in texts or [] if not isinstance(item, str)), None)
            raise ValueError(f"text must be a string or a non-empty list of strings, got {type(wrong).__name__} "
                             f"{wrong!r:.60}")
        for row, item in enumerate(texts):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:  # e.g. undecodable bytes of a command line (surrogate escapes)
                raise ValueError(f"text {row} is not valid text: {item[max(error.start - 20, 0):error.end + 20]!r} "
                                 f"holds undecodable byte(s) at character {error.start}; give UTF-8 text") from error
        placeholders_per_text = [item.count(self.image_token) for item in texts]
        if sum(placeholders_per_text) != len(flat_images):
            raise ValueError(f"the text holds {sum(placeholders_per_text)} {self.image_token} placeholder(s) "
                             f"(per text: {placeholders_per_text}) but {len(flat_images)} image(s) were given")
        empty = [index for index, item in enumerate(texts) if not item.strip()]
        if empty:
            raise ValueError(f"text {empty} is empty: give a prompt or an {self.image_token} placeholder")
        return texts, flat_images, placeholders_per_text

    def _build_rows(
        self,
        encoded: list[list[int]],
        per_token: dict[str, list],
        placeholders_per_text: list[int],
        tokens: list[tuple[list[int], torch.Tensor]] | None,
        max_length: int | None,
    ) -> list[int]:
        """Fills each row's image spans with its images' visual ids (`tokens`, expanded spans; `None`: compact pairs)
        and cuts it to `max_length` (`None`: no cut), in place, the per-token outputs alongside; returns the indices
        of the images whose spans remain."""
        kept_images, image_cursor = [], 0
        for row, ids in enumerate(encoded):
            row_images = list(range(image_cursor, image_cursor + placeholders_per_text[row]))
            image_cursor += len(row_images)
            if tokens is not None:
                visual_ids = [tokens[index][0] for index in row_images]
                for values in per_token.values():
                    values[row] = fill_per_token_values(ids, values[row], self.image_start_token_id,
                                                        [len(span) for span in visual_ids])
                ids = fill_image_spans(ids, self.image_start_token_id, visual_ids)
            if max_length is not None and len(ids) > max_length:
                ids = truncate_row(ids, max_length, self.image_start_token_id, self.image_end_token_id)
                for values in per_token.values():
                    values[row] = values[row][: len(ids)]
            encoded[row] = ids
            kept_images.extend(row_images[: ids.count(self.image_start_token_id)])
            if not ids:
                raise ValueError(f"text {row} has no tokens left (empty, or truncated to max_length={max_length})")
        return kept_images

    def _pad(
        self,
        encoded: list[list[int]],
        per_token: dict[str, list],
        padding: bool | str,
        max_length: int | None,
        padding_side: str | None,
        return_tensors: str | None,
    ) -> dict:
        """`input_ids`, `attention_mask` and the per-token outputs, padded by the text tokenizer (offsets by hand:
        `tokenizer.pad` leaves them as they are)."""
        pad_kwargs = {} if padding_side is None else {"padding_side": padding_side}
        offsets = per_token.pop("offset_mapping", None)
        text_inputs = self.tokenizer.pad(
            {"input_ids": encoded, **per_token}, padding=padding,
            max_length=max_length if padding == "max_length" else None, return_tensors=return_tensors, **pad_kwargs,
        )
        data = dict(text_inputs)
        if offsets is not None:
            data["offset_mapping"] = pad_offsets(offsets, text_inputs["attention_mask"])
        return data

    def _check_control_ids(self, encoded: list[list[int]], placeholders_per_text: list[int]):
        """User text is text: `[IMG]`/`[/IMG]` come only from `<image>` placeholders and no text spells a visual id
        (`<visual_k>`). Raises `ValueError` naming the text otherwise (the ids would silently steer the model)."""
        for row, (ids, placeholders) in enumerate(zip(encoded, placeholders_per_text, strict=True)):
            starts, ends = ids.count(self.image_start_token_id), ids.count(self.image_end_token_id)
            # visual tokens sit right after [/IMG]; only ids past it (rare in text) need a name lookup
            later = [token for token in ids if token > self.image_end_token_id]
            visual = sum(name.startswith("<visual_") for name in self.tokenizer.convert_ids_to_tokens(later))
            if starts != placeholders or ends != placeholders or visual:
                raise ValueError(
                    f"text {row} spells LaVIT control tokens as text ({starts - placeholders} extra "
                    f"{IMAGE_START_TOKEN}, {ends - placeholders} extra {IMAGE_END_TOKEN}, {visual} <visual_k>); "
                    f"images enter only through {self.image_token} placeholders"
                )

    def replacement_offsets(self, text: str) -> list[dict]:
        """Where each `<image>` of `text` (character `span`) lies once replaced by `[IMG][/IMG]` (`new_span`)."""
        replacement = IMAGE_START_TOKEN + IMAGE_END_TOKEN
        spans, start, gained = [], text.find(self.image_token), 0
        while start != -1:
            end = start + len(self.image_token)
            spans.append({"span": (start, end), "new_span": (start + gained, start + gained + len(replacement))})
            gained += len(replacement) - len(self.image_token)
            start = text.find(self.image_token, end)
        return spans

    @property
    def expands_images(self) -> bool:
        """Whether image spans are written expanded (see `set_visual_tokenizer`)."""
        return getattr(self, "_expansion", None) is not None

    def _tokenize_images(self, pixel_values: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
        """Each image's LM ids (code ids after `[/IMG]`, the vocabulary layout of `add_image_tokens`) and keep mask."""
        visual_tokenizer, selection = self._expansion.value
        parameter = next(visual_tokenizer.parameters())
        with torch.no_grad():
            output = visual_tokenizer.tokenize(pixel_values.to(parameter.device, parameter.dtype), selection=selection)
        offset = self.image_end_token_id + 1
        return [((codes + offset).tolist(), mask) for codes, mask in
                zip(output.per_image(), output.keep_mask.cpu(), strict=True)]

    def post_process_multimodal_output(self, generated_outputs, skip_special_tokens=True, generation_mode=None,
                                       **kwargs):
        """`any-to-any` pipeline hook: images come back already decoded (PIL images, drawn by `LaVITPipeline` from the
        sequences `generate(..., generation_mode="image")` returns); text is decoded by the tokenizer."""
        if generation_mode == "image":
            return list(generated_outputs)
        return super().post_process_multimodal_output(
            generated_outputs, skip_special_tokens=skip_special_tokens, generation_mode=generation_mode, **kwargs
        )

    def to_dict(self) -> dict:
        """`ProcessorMixin.to_dict` plus the `auto_map` a saved folder carries (registered for `AutoProcessor`), so a
        processor and its reloaded copy describe themselves alike."""
        output = super().to_dict()
        if self._auto_class is not None:
            output["auto_map"] = {self._auto_class: f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        return output

    @property
    def model_input_names(self) -> list[str]:
        """What `__call__` returns: `image_keep_mask` only with expanded spans (`set_visual_tokenizer`)."""
        return ["input_ids", "attention_mask", "pixel_values"] + (["image_keep_mask"] if self.expands_images else [])


class _NotSaved:
    """Holds the visual tokenizer for the processor: `ProcessorMixin.to_dict` deep-copies the processor's attributes
    before keeping the savable ones, and a model must be neither copied nor written into processor_config.json."""

    def __init__(self, *value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


__all__ = ["LaVITProcessor"]
