"""Stage-2 and fine-tuning rows: LaVIT sequences built from records, packed, with bad records counted.

Sequences (paper section 3.3): an image-caption pair becomes one *segment*, image-to-text (`[IMG] ... [/IMG]
caption</s>`) or text-to-image (`caption [IMG] ... [/IMG]</s>`); text-only records become text segments. Segments are
packed greedily into rows of at most `max_length` tokens. A row stores its ids, its segment lengths and its images;
the collator restarts position ids per segment so that packed segments never attend to each other. Fine-tuning rows
([`InstructionBuilder`]) carry labels on the answers only. Every builder is a batched `datasets.map` function that
stores the records it dropped in the rows (`skipped_records`), so the count survives caching and worker processes.
"""

from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from lavit.modeling.configuration_lavit import LaVITConfig
from lavit.modeling.validation_lavit import room_advice
from lavit.processing.processing_lavit import fill_image_spans

from .arguments import SEQUENCE_ORDERS
from .data import SKIPPED_FIELD, BadRecordCounter, BadRecordError, record_columns, whole_stream

# ---------------------------------------------------------------------------------------------------------- sequences


def encode_text(tokenizer, text: str, control_ids=(), split_special_tokens: bool = True) -> list[int]:
    """User text -> token ids, as text only: special tokens written in it (`[IMG]`, `[/IMG]`, `</s>`) are split like
    any other text (`split_special_tokens`), so a caption can never produce a control id. `BadRecordError` if one of
    `control_ids` still appears (a tokenizer that ignores `split_special_tokens`, or text rendered by a chat template,
    whose own special tokens must stay whole)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    leaked = sorted(set(ids) & set(control_ids))
    if leaked:
        raise BadRecordError(f"the text {text[:60]!r} produces the control id(s) {leaked}")
    return ids


def check_max_length(max_length: int, config: LaVITConfig, image_tokens: int = 0) -> None:
    """Refuses, at the start of a run, rows of `max_length` tokens (plus `image_tokens`: the visual tokens of an
    image, for stages whose `--max_length` counts text only) that the language model cannot read: one line naming
    the flag, the model's context length and the largest `--max_length` that fits."""
    context = getattr(config.text_config, "max_position_embeddings", None)
    total = max_length + image_tokens
    if context is not None and total > context:
        visual = f" + {image_tokens} tokens of an image ([IMG], its visual tokens, [/IMG])" if image_tokens else ""
        raise ValueError(f"--max_length {max_length}{visual} is {total} tokens, more than the model's context length "
                         f"of {context} (text_config.max_position_embeddings): "
                         + room_advice("--max_length", context, image_tokens, "an image",
                                       "a model whose language model reads longer rows (max_position_embeddings), or "
                                       "a visual tokenizer with fewer patches"))


def with_skip_counts(rows: dict, skipped: int) -> dict:
    """Stores the records a `datasets.map` batch dropped in its first output row (`skipped_records`; an empty row when
    no record of the batch was usable), so the count lives in the dataset: cached maps, `num_proc` and dataloader
    workers keep it, and the collator adds it to the batch that reads the row."""
    rows[SKIPPED_FIELD] = [0] * len(rows["input_ids"])
    if skipped and not rows["input_ids"]:
        for column in rows:
            rows[column].append(0 if column == SKIPPED_FIELD else [])
    if skipped:
        rows[SKIPPED_FIELD][0] = skipped
    return rows


def count_stored_skips(dataset, counter: BadRecordCounter, collator) -> None:
    """Adds the records a built dataset dropped (its `skipped_records` column) to `counter`, once, for a map-style
    dataset: exact for any cache state and process count (padding a rank's share repeats rows, not counts), and the
    collator then leaves the column alone. A streamed dataset is built as it is read: its rows' counts reach the
    trainer through the batches."""
    if isinstance(dataset, datasets.Dataset) and SKIPPED_FIELD in dataset.column_names:
        counter.add("dropped while building rows", sum(dataset[SKIPPED_FIELD]))
        collator.count_stored_skips = False


@dataclass
class SequenceBuilder:
    """
    Builds packed training rows for stage 2 (a batched `datasets.map` function; use `with_indices=True`).

    Args:
        tokenizer: the LM's text tokenizer (knows `[IMG]`/`[/IMG]`).
        config: the [`LaVITConfig`] (vocabulary layout, number of patches).
        max_length: maximum tokens per row, visual tokens included.
        order: `"random"` (each pair once, written image-to-text: [`RandomOrderRows`] draws its order every
            epoch), `"both"` (each pair twice, once per order), `"image_to_text"` or `"text_to_image"`.
        image_token_estimate: tokens counted for an image whose count is not known yet (compact form, no stored
            `code_ids`); defaults to `config.num_patches`, an upper bound, so rows never exceed `max_length`.
    """

    tokenizer: object
    config: LaVITConfig
    max_length: int = 2048
    order: str = "random"
    image_token_estimate: int | None = None
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)

    def __post_init__(self):
        if self.order not in SEQUENCE_ORDERS:
            raise ValueError(f"order must be one of {SEQUENCE_ORDERS}, got {self.order!r}")
        self.image_token_estimate = self.image_token_estimate or self.config.tokenizer_config.num_patches
        self.end_ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def segments_of(self, record: dict, index: int) -> list[dict]:
        """One record -> its segments: `{"input_ids", "budget", "image", "keep_mask"}`."""
        text = record.get("text")
        if isinstance(text, list):  # several captions per image: the index picks one, reproducibly
            text = text[index % len(text)] if text else None
        if not isinstance(text, str) or not text.strip():
            raise BadRecordError(f"record {index}: empty or missing text")
        config = self.config
        control_ids = (config.image_start_token_id, config.image_end_token_id)
        try:
            text_ids = encode_text(self.tokenizer, text.strip(), control_ids)
        except BadRecordError as error:
            raise BadRecordError(f"record {index}: {error}") from error
        if record.get("image") is None:
            ids = (text_ids + self.end_ids)[: self.max_length]
            return [{"input_ids": ids, "budget": len(ids), "image": None, "keep_mask": None}]
        code_ids = record.get("code_ids")
        if code_ids:
            visual_ids = [config.visual_token_offset + int(code) for code in code_ids]
            image_ids = fill_image_spans([config.image_start_token_id, config.image_end_token_id],
                                         config.image_start_token_id, [visual_ids])
            budget_extra = 0
        else:
            image_ids = [config.image_start_token_id, config.image_end_token_id]
            budget_extra = self.image_token_estimate
        room = self.max_length - len(image_ids) - budget_extra - len(self.end_ids)
        if room < 1:
            raise BadRecordError(f"record {index}: the image alone needs more than max_length={self.max_length}")
        text_ids = text_ids[:room]
        # both orders of a pair have the same length: a random order is drawn per epoch, after packing
        orders = ["image_to_text", "text_to_image"] if self.order == "both" else [
            "image_to_text" if self.order == "random" else self.order]
        segments = []
        for order in orders:
            body = image_ids + text_ids if order == "image_to_text" else text_ids + image_ids
            ids = body + self.end_ids
            segments.append({"input_ids": ids, "budget": len(ids) + budget_extra, "image": record["image"],
                             "keep_mask": record.get("keep_mask")})
        return segments

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        rows = {"input_ids": [], "segment_lengths": [], "images": [], "image_keep_mask": []}
        current, used = [], 0

        def flush():
            if current:
                rows["input_ids"].append([token for segment in current for token in segment["input_ids"]])
                rows["segment_lengths"].append([len(segment["input_ids"]) for segment in current])
                with_image = [segment for segment in current if segment["image"] is not None]
                rows["images"].append([segment["image"] for segment in with_image])
                rows["image_keep_mask"].append([segment["keep_mask"] for segment in with_image])

        names, skipped = list(batch), 0
        for position, index in enumerate(indices):
            record = {name: batch[name][position] for name in names}
            try:
                segments = self.segments_of(record, index)
            except BadRecordError as error:
                self.counter.skip("unusable record", str(error))
                skipped += 1
                continue
            for segment in segments:
                if current and used + segment["budget"] > self.max_length:
                    flush()
                    current, used = [], 0
                current.append(segment)
                used += segment["budget"]
        flush()
        if not any(mask is not None for masks in rows["image_keep_mask"] for mask in masks):
            del rows["image_keep_mask"]
        return with_skip_counts(rows, skipped)

    def build(self, records, batch_size: int = 1000):
        """Applies the builder to a dataset (streaming too); the output rows replace the records."""
        return records.map(self, batched=True, batch_size=batch_size, with_indices=True,
                           remove_columns=record_columns(records))


class RandomOrderRows(torch.utils.data.Dataset):
    """
    Stage-2 rows (built with `order="random"`) whose image-caption segments take a new order every epoch:
    image-to-text with probability `image_to_text_ratio`, else text-to-image. The draws are a function of `seed`, the
    epoch and the row index only, so every image is read image-to-text in about that share of the epochs, and a run,
    its rerun and its resume (the Trainer sets the epoch through `set_epoch`) see the same sequences.

    Args:
        rows: the rows of [`SequenceBuilder`] (segments written image-to-text: `[IMG] ... [/IMG] text end`).
        config: the [`LaVITConfig`] (ids of `[IMG]` and `[/IMG]`).
        end_ids: the ids that end every segment (the EOS token).
        image_to_text_ratio: P(image-to-text) per segment.
        seed: the run's seed (`--seed`).
    """

    def __init__(self, rows, config: LaVITConfig, end_ids: list[int], image_to_text_ratio: float = 0.5,
                 seed: int = 0):
        if not 0 <= image_to_text_ratio <= 1:
            raise ValueError(f"image_to_text_ratio must be in [0, 1], got {image_to_text_ratio}")
        self.rows, self.config, self.end_ids = rows, config, list(end_ids)
        self.image_to_text_ratio, self.seed, self.epoch = image_to_text_ratio, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.ordered(self.rows[index], index)

    def ordered(self, row: dict, index: int) -> dict:
        """Row `index` with the segment orders of the current epoch."""
        row = dict(row)
        draws = np.random.default_rng([self.seed, self.epoch, index]).random(len(row["segment_lengths"]))
        input_ids, start = [], 0
        for length, draw in zip(row["segment_lengths"], draws, strict=True):
            segment = row["input_ids"][start : start + length]
            start += length
            flip = draw >= self.image_to_text_ratio and segment[0] == self.config.image_start_token_id
            input_ids += self._text_to_image(segment) if flip else segment
        row["input_ids"] = input_ids
        return row

    def _text_to_image(self, segment: list[int]) -> list[int]:
        """`[IMG] ... [/IMG] text end` -> `text [IMG] ... [/IMG] end` (the same tokens, so the same length)."""
        image_end = segment.index(self.config.image_end_token_id) + 1
        body_end = len(segment) - len(self.end_ids) if segment[-len(self.end_ids):] == self.end_ids else len(segment)
        return segment[image_end:body_end] + segment[:image_end] + segment[body_end:]


class StreamedRandomOrderRows(RandomOrderRows, torch.utils.data.IterableDataset):
    """[`RandomOrderRows`] over streamed rows (a `datasets.IterableDataset`), numbered in stream order."""

    def __iter__(self):
        self.rows.set_epoch(self.epoch)  # the stream's own shuffling follows the epoch too
        for index, row in enumerate(whole_stream(self.rows)):
            yield self.ordered(row, index)


# ---------------------------------------------------------------------------------------------------------- fine-tuning

CAPTION_PROMPT = ""  # official captioning: the image followed by the caption, no template
VQA_TEMPLATE = "Question: {question} Answer:"


@dataclass
class InstructionBuilder:
    """
    Fine-tuning rows with the loss on the answer only: `task="caption"` (`image` + `text`), `"vqa"` (`image`,
    `question`, `answer`: the official `Question: {q} Answer:` template) or `"chat"` (`messages` in the transformers
    chat format with `{"type": "image"}` items, plus `images`; every assistant turn is supervised).
    """

    processor: object
    task: str = "caption"
    max_length: int = 512
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)

    def __post_init__(self):
        if self.task not in ("caption", "vqa", "chat"):
            raise ValueError(f"task must be 'caption', 'vqa' or 'chat', got {self.task!r}")
        tokenizer = self.processor.tokenizer
        self.end_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def _ids(self, text: str) -> list[int]:
        """Prompt or answer text -> ids: each image placeholder becomes `[IMG][/IMG]`, the rest is text only (chat
        turns keep their template's special tokens, and a record whose text writes `[IMG]`/`[/IMG]` is bad)."""
        processor = self.processor
        control_ids = (processor.image_start_token_id, processor.image_end_token_id)
        ids = []
        for number, piece in enumerate(text.split(processor.image_token)):
            if number:
                ids += list(control_ids)
            if piece:
                ids += encode_text(processor.tokenizer, piece, control_ids, split_special_tokens=self.task != "chat")
        return ids

    def example(self, record: dict, index: int) -> dict:
        if self.task == "chat":
            prompt_answer_pairs, images = self._chat_turns(record, index)
        else:
            image = record.get("image")
            if image is None:
                raise BadRecordError(f"record {index}: no image")
            images = [image]
            if self.task == "caption":
                answer = record.get("text")
                prompt = self.processor.image_token + CAPTION_PROMPT
            else:
                answer = record.get("answer")
                prompt = self.processor.image_token + VQA_TEMPLATE.format(question=record.get("question", ""))
            if not isinstance(answer, str) or not answer.strip():
                raise BadRecordError(f"record {index}: empty or missing answer")
            prompt_answer_pairs = [(prompt, " " + answer.strip() if self.task == "vqa" else answer.strip())]
        input_ids, labels = [], []
        for prompt, answer in prompt_answer_pairs:
            prompt_ids, answer_ids = self._ids(prompt), self._ids(answer) + self.end_ids
            input_ids += prompt_ids + answer_ids
            labels += [-100] * len(prompt_ids) + answer_ids
        if len(input_ids) > self.max_length:
            raise BadRecordError(f"record {index}: {len(input_ids)} tokens before images, over max_length="
                                 f"{self.max_length}")
        return {"input_ids": input_ids, "labels": labels, "segment_lengths": [len(input_ids)], "images": images}

    def _chat_turns(self, record, index):
        messages, images = record.get("messages"), record.get("images") or []
        if not messages:
            raise BadRecordError(f"record {index}: no messages")
        template = self.processor.chat_template
        tokenizer = self.processor.tokenizer
        pairs, rendered_before = [], ""
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:turn], chat_template=template, tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: turn + 1], chat_template=template, tokenize=False)
            if not prompt.startswith(rendered_before) or not full.startswith(prompt):
                raise BadRecordError(f"record {index}: the chat template does not render turns as prefixes")
            answer = full[len(prompt):]
            if answer.endswith(tokenizer.eos_token or "\0"):
                answer = answer[: -len(tokenizer.eos_token)]
            pairs.append((prompt[len(rendered_before):], answer))
            rendered_before = full
        if not pairs:
            raise BadRecordError(f"record {index}: no assistant turn to learn from")
        placeholders = sum(prompt.count(self.processor.image_token) for prompt, _ in pairs)
        if placeholders != len(images):
            raise BadRecordError(f"record {index}: {placeholders} image placeholder(s) but {len(images)} image(s)")
        return pairs, images

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        rows = {"input_ids": [], "labels": [], "segment_lengths": [], "images": []}
        names, skipped = list(batch), 0
        for position, index in enumerate(indices):
            try:
                example = self.example({name: batch[name][position] for name in names}, index)
            except BadRecordError as error:
                self.counter.skip("unusable record", str(error))
                skipped += 1
                continue
            for key in rows:
                rows[key].append(example[key])
        return with_skip_counts(rows, skipped)

    def build(self, records, batch_size: int = 1000):
        return records.map(self, batched=True, batch_size=batch_size, with_indices=True,
                           remove_columns=record_columns(records))
