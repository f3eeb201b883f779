"""Stage 2: unified generative pretraining (paper section 3.3).

The frozen visual tokenizer (encoder, selector, target merger and quantizer) gives every image its kept tokens and
their code ids; the LM-side merger copy, the visual projection and the LM learn to predict the next token of both
modalities. Image-caption pairs enter in both orders, several packed into one row, optionally mixed with text-only
data. Pre-tokenized records (`lavit-preprocess`) carry keep masks and code ids, so the frozen target path is skipped.

    lavit-train --visual_tokenizer runs/tokenizer/final --language_model meta-llama/Llama-2-7b-hf \\
        --data pairs.jsonl --output_dir runs/stage2 --bf16 --max_steps 10000
"""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
from lavit.modeling import LaVITForCausalLM, LaVITTokenizerModel
from lavit.processing import LaVITImageProcessor, LaVITProcessor
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_utils import has_length

from .arguments import LaVITTrainingArguments, SequenceArguments, limit_records, parse_arguments
from .collators import LaVITDataCollator
from .data import (
    SEQUENCE_ORDERS,
    BadRecordCounter,
    RandomOrderRows,
    SequenceBuilder,
    StreamedRandomOrderRows,
    count_stored_skips,
    load_records,
    load_text_records,
    mix_text_records,
)
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, preset_field, report_preset
from .trainer import train_and_save, whole_weights


@dataclass
class PretrainingArguments(SequenceArguments):
    model: str | None = field(default=None, metadata={"help": "A LaVIT model folder to continue training."})
    visual_tokenizer: str | None = field(default=None, metadata={"help": "A stage-1 tokenizer folder (new model)."})
    language_model: str | None = field(default=None, metadata={"help": "A causal LM folder or Hub id (new model)."})
    text_tokenizer: str | None = field(default=None, metadata={"help": "Text tokenizer (default: the LM's)."})
    text_data: str | None = field(default=None, metadata={"help": "Text-only corpus mixed into the pairs."})
    text_ratio: float = field(default=0.0, metadata={"help": "Fraction of text-only records in the mixture."})
    max_length: int = field(default=2048, metadata={"help": "Tokens per packed row, visual tokens included."})
    order: str = field(default="random", metadata={"help": f"Pair order: one of {SEQUENCE_ORDERS}; 'random' draws "
                                                          f"each pair's order anew every epoch from --seed."})
    image_to_text_ratio: float = field(default=0.5, metadata={"help": "P(image-to-text) with order=random."})
    image_token_estimate: int | None = field(default=None, metadata={
        "help": "Tokens counted per image whose count is unknown (not pre-tokenized) while packing; default: all "
                "patches (rows never exceed max_length)."})
    visual_learning_rate: float | None = field(default=1e-4, metadata={
        "help": "Learning rate of the visual modules and visual vocabulary rows (the LM uses --learning_rate)."})
    preset: str | None = preset_field("pretrain")


def build_unified_model(script_args) -> tuple[LaVITForCausalLM, LaVITProcessor]:
    """A LaVIT model and its processor: loaded from `--model`, or assembled from a tokenizer and a text LM."""
    if script_args.model:
        return LaVITForCausalLM.from_pretrained(script_args.model), LaVITProcessor.from_pretrained(script_args.model)
    if not (script_args.visual_tokenizer and script_args.language_model):
        raise ValueError("give --model (a LaVIT folder) or both --visual_tokenizer and --language_model")
    text_tokenizer = AutoTokenizer.from_pretrained(script_args.text_tokenizer or script_args.language_model)
    visual_tokenizer = LaVITTokenizerModel.from_pretrained(script_args.visual_tokenizer)
    text_vocab_size = LaVITProcessor.add_image_tokens(text_tokenizer, visual_tokenizer.config.codebook_size)
    if text_tokenizer.pad_token is None:
        text_tokenizer.pad_token = text_tokenizer.eos_token
    language_model = AutoModelForCausalLM.from_pretrained(script_args.language_model)
    model = LaVITForCausalLM.from_components(visual_tokenizer, language_model, text_vocab_size=text_vocab_size)
    image_processor = LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config)
    return model, LaVITProcessor(image_processor, text_tokenizer)


def pretraining_dataset(script_args, tokenizer, config, counter: BadRecordCounter | None = None, seed: int = 0):
    """Records -> (text mix) -> packed rows (each carrying the count of records dropped while it was built), with the
    builder; `counter` counts the records skipped while loading. With `order="random"` the rows draw their pair
    orders per epoch from `seed` ([`RandomOrderRows`])."""
    records = load_records(script_args.data, script_args.split, script_args.streaming, script_args.image_column,
                           script_args.text_column, counter=counter)
    records = limit_records(records, script_args.max_samples)
    if script_args.text_data:
        texts = load_text_records(script_args.text_data, streaming=script_args.streaming)
        records = mix_text_records(records, texts, script_args.text_ratio, seed=0)
    builder = SequenceBuilder(tokenizer, config, script_args.max_length, script_args.order,
                              script_args.image_token_estimate)
    rows = builder.build(records)
    if script_args.order == "random":
        rows_class = StreamedRandomOrderRows if isinstance(rows, datasets.IterableDataset) else RandomOrderRows
        rows = rows_class(rows, config, builder.end_ids, script_args.image_to_text_ratio, seed)
    return rows, builder


def data_collator(processor, config, packed: bool, max_row_length: int | None = None) -> LaVITDataCollator:
    return LaVITDataCollator(processor.image_processor, config.image_start_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id or 0, packed=packed,
                             max_row_length=max_row_length)


def pretrain(script_args: PretrainingArguments, training_args: LaVITTrainingArguments, callbacks=()) -> Path:
    """Runs stage 2 and returns the folder of the trained model (`output_dir/final`, with its processor);
    `callbacks` are extra `TrainerCallback`s."""
    set_seed(training_args.seed)
    if training_args.ddp_find_unused_parameters is None:
        # a text-only step leaves the visual modules without gradients
        training_args.ddp_find_unused_parameters = True
    with whole_weights(training_args):
        model, processor = build_unified_model(script_args)
    preset, applied = apply_preset("pretrain", script_args.preset, script_args, training_args, model)
    script_args.set_attention(model)
    counter = BadRecordCounter()
    dataset, _ = pretraining_dataset(script_args, processor.tokenizer, model.config, counter, training_args.seed)
    num_rows = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_rows))
    report_preset(preset, applied, num_rows, training_args)
    collator = data_collator(processor, model.config, script_args.packed, script_args.row_length(model))
    count_stored_skips(dataset, counter, collator)
    callbacks = [*callbacks, ShortRunWarningCallback(row_length=script_args.max_length, preset=script_args.preset)]
    return train_and_save(model, processor, training_args, dataset, collator, counter, script_args.resume,
                          script_args.visual_learning_rate, callbacks)

def main(argv=None):
    script_args, training_args = parse_arguments((PretrainingArguments, LaVITTrainingArguments), argv)
    print(f"trained model saved to {pretrain(script_args, training_args)}")


if __name__ == "__main__":
    main()
