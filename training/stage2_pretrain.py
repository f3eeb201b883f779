"""Stage 2: unified generative pretraining (paper section 3.3).

The frozen visual tokenizer (encoder, selector, target merger and quantizer) gives every image its kept tokens and
their code ids; the LM-side merger copy, the visual projection and the LM learn to predict the next token of both
modalities. Image-caption pairs enter in both orders, several packed into one row, optionally mixed with text-only
data. Pre-tokenized records (`lavit pretokenize`) carry keep masks and code ids, so the frozen target path is skipped.

    lavit train --visual_tokenizer runs/tokenizer/final --language_model meta-llama/Llama-2-7b-hf \\
        --data pairs.jsonl --output_dir runs/stage2 --bf16 --max_steps 10000
    python -m lavit.training.stage2_pretrain stage2.yaml          # the same flags as keys of a YAML/JSON file
    # several GPUs and nodes: stage2.yaml may name a DeepSpeed config (`deepspeed: training/configs/zero3.json`)
    torchrun --nproc_per_node 8 -m lavit.training.stage2_pretrain stage2.yaml
    accelerate launch --multi_gpu --num_processes 8 -m lavit.training.stage2_pretrain stage2.yaml
    deepspeed --num_gpus 8 --module lavit.training.stage2_pretrain --deepspeed training/configs/zero2.json \\
        --visual_tokenizer runs/tokenizer/final --language_model LM --data pairs.jsonl --output_dir runs/stage2
"""

from pathlib import Path

import datasets
from transformers import set_seed
from transformers.trainer_utils import has_length

from .arguments import LaVITTrainingArguments, PretrainingArguments, stage_parser
from .collators import lm_collator
from .data import BadRecordCounter, load_text_records, mix_text_records, transforms_in_temporary_files
from .evaluation import configure_evaluation, stage_records
from .models import build_unified_model
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, explained_by_preset, report_preset
from .sequences import (
    RandomOrderRows,
    SequenceBuilder,
    StreamedRandomOrderRows,
    check_max_length,
    count_stored_skips,
)
from .trainer import train_and_save, whole_weights


def pretraining_dataset(script_args: PretrainingArguments, text_tokenizer, config, records,
                        counter: BadRecordCounter | None = None, seed: int = 0, mix_text: bool = True):
    """`records` (image-text pairs, from [`training.evaluation.stage_records`]) -> (text mix) -> packed rows (each
    carrying the count of records dropped while it was built), with the builder; `counter` counts the records skipped
    while loading. With `order="random"` the rows draw their pair orders per epoch from `seed`
    ([`RandomOrderRows`]). `mix_text=False` leaves the text-only data out (held-out rows)."""
    # text-only records keep the LM's language skills (the official mix is about 2 text : 1 image-text)
    if script_args.text_data and mix_text:
        texts = load_text_records(script_args.text_data, streaming=script_args.streaming)
        records = mix_text_records(records, texts, script_args.text_ratio, seed=0)
    # records -> segments -> rows of at most max_length tokens; images whose token count is not stored yet count as
    # `image_token_estimate` tokens, so a row never overflows once the frozen visual tokenizer expands them
    builder = SequenceBuilder(text_tokenizer, config, script_args.max_length, script_args.order,
                              script_args.image_token_estimate)
    rows = builder.build(records)
    if script_args.order == "random":
        # every row is stored image-to-text; the order of each pair is drawn again every epoch, after packing
        rows_class = StreamedRandomOrderRows if isinstance(rows, datasets.IterableDataset) else RandomOrderRows
        rows = rows_class(rows, config, builder.end_ids, script_args.image_to_text_ratio, seed)
    return rows, builder


@transforms_in_temporary_files()
def pretrain(script_args: PretrainingArguments, training_args: LaVITTrainingArguments, callbacks=()) -> Path:
    """Runs stage 2 and returns the folder of the trained model (`output_dir/final`, with its processor);
    `callbacks` are extra `TrainerCallback`s."""
    # 0. Seed first (the pair orders of every epoch are drawn from it).
    set_seed(training_args.seed)
    if training_args.ddp_find_unused_parameters is None:
        # a text-only step leaves the visual modules without gradients
        training_args.ddp_find_unused_parameters = True

    # 1. The model: assembled from a stage-1 visual tokenizer and a text LM, or continued. Every rank builds it whole:
    #    the assembly copies weights between models, which ZeRO-3 partitioned parameters do not hold.
    with whole_weights(training_args):
        model, processor = build_unified_model(script_args)
    # a preset reads the model (its row length follows the visual tokenizer's patch count); the attention kernel is the
    # LM's only: the visual tokenizer keeps its own
    preset, applied = apply_preset("pretrain", script_args.preset, script_args, training_args, model)
    check_max_length(script_args.max_length, model.config)  # a row holds its visual tokens
    script_args.set_dtype(model)
    script_args.set_attention(model, training_args.device)

    # 2. Packed rows of image-caption pairs (and text-only records), bad records dropped and counted.
    #    Held-out pairs (`--eval_data` or `--eval_split_size`) become rows the same way, without the text mix: their
    #    text and image losses are reported apart.
    data = stage_records(script_args, training_args.seed)
    dataset, _ = pretraining_dataset(script_args, processor.tokenizer, model.config, data.records, data.counter,
                                     training_args.seed)
    eval_dataset = None if data.held_out is None else pretraining_dataset(
        script_args, processor.tokenizer, model.config, data.held_out, data.eval_counter, training_args.seed,
        mix_text=False)[0]
    num_rows = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_rows))
    report_preset(preset, applied, num_rows, training_args)

    # 3. The collator splits rows into segments; its row length fits the attention kernel (SDPA computes every pair
    #    of a row, flex/flash attention skip the masked blocks and take one row per batch).
    collator = lm_collator(processor, model.config, script_args.packed, script_args.row_length(model),
                           **script_args.collator_augmentation())
    # records the builder dropped are stored in the rows: count them once here, not per epoch in the batches
    count_stored_skips(dataset, data.counter, collator)
    if eval_dataset is not None:
        count_stored_skips(eval_dataset, data.eval_counter, collator)

    # 4. Train (the visual modules and rows at their own learning rate), resume, save the final folder.
    callbacks = [*callbacks, ShortRunWarningCallback(row_length=script_args.max_length, preset=script_args.preset),
                 *configure_evaluation(training_args, script_args, eval_dataset is not None)]
    evaluation = {"eval_dataset": eval_dataset, "eval_skip_counter": data.eval_counter,
                  "eval_data_name": script_args.eval_data or script_args.data}
    return train_and_save(model, processor, training_args, dataset, collator, data.counter, script_args,
                          script_args.visual_learning_rate, callbacks, evaluation=evaluation)


def main(script_args: PretrainingArguments, training_args: LaVITTrainingArguments):
    # the folder to give fine-tuning as --model
    with explained_by_preset(script_args):  # a flag the preset filled in is named as the preset's
        print(f"trained model saved to {pretrain(script_args, training_args)}")


def make_parser(subparsers=None):
    # the same parser for `lavit train` (a sub-command of `subparsers`) and for this script run alone
    return stage_parser("train", subparsers)


def cli(args=None):
    """`lavit-train ARGS` and `python -m lavit.training.stage2_pretrain ARGS`."""
    main(*make_parser().parse_args_and_config(args))


# `python -m ...` and console scripts; launchers (torchrun, accelerate, deepspeed) run this module on every rank
if __name__ == "__main__":
    cli()
