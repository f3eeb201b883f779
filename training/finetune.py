"""Fine-tuning a LaVIT model: full or LoRA/QLoRA (PEFT) on captioning, VQA or chat-formatted instruction data.

The loss covers the answers only (captions, VQA answers, assistant turns). With LoRA the adapters train on the LM's
projections; `--merge_lora` (default) merges them with `merge_and_unload`, so the final folder is a plain LaVIT
checkpoint that loads without PEFT.

    lavit finetune --model runs/stage2/final --data vqa.jsonl --task vqa --lora --output_dir runs/vqa
    python -m lavit.training.finetune finetune.yaml          # the same flags as keys of a YAML/JSON file
    accelerate launch --multi_gpu --num_processes 8 -m lavit.training.finetune finetune.yaml
    deepspeed --num_gpus 8 --module lavit.training.finetune --deepspeed training/configs/zero2.json \\
        --model runs/stage2/final --data vqa.jsonl --task vqa --output_dir runs/vqa
"""

from pathlib import Path

from lavit.processing import LaVITProcessor
from transformers import set_seed
from transformers.trainer_utils import has_length

from .arguments import FinetuningArguments, LaVITTrainingArguments, stage_parser
from .collators import lm_collator
from .data import transforms_in_temporary_files
from .evaluation import GenerationEvaluator, configure_evaluation, stage_records
from .models import lavit_model_paths, load_model_for_finetuning
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, explained_by_preset, report_preset
from .sequences import InstructionBuilder, check_max_length, count_stored_skips
from .trainer import train_and_save, whole_weights


@transforms_in_temporary_files()
def finetune(script_args: FinetuningArguments, training_args: LaVITTrainingArguments, callbacks=()) -> Path:
    """Runs fine-tuning and returns the final folder (merged when LoRA was used with `merge_lora`); `callbacks` are
    extra `TrainerCallback`s."""
    # 0. Seed first (LoRA's initial adapters depend on it); a preset fills in what the run left at its defaults.
    set_seed(training_args.seed)
    preset, applied = apply_preset("finetune", script_args.preset, script_args, training_args)

    # 1. The model (4-bit under QLoRA, with adapters under LoRA) and the processor saved with it.
    with whole_weights(training_args):
        model = load_model_for_finetuning(script_args, training_args)
    script_args.set_dtype(model)
    script_args.set_attention(model, training_args.device)
    # --max_length counts text; an image adds [IMG], up to num_patches visual tokens and [/IMG]
    check_max_length(script_args.max_length, model.config, model.config.tokenizer_config.num_patches + 2)
    # the processor of the pretrained folder: its vocabulary layout is the model's
    processor = LaVITProcessor.from_pretrained(lavit_model_paths(script_args.model)[1])

    # 2. One row per example, labels on the answers only; bad records dropped and counted.
    data = stage_records(script_args, training_args.seed, require_text=False)
    # caption: the image then its caption; vqa: the official `Question: {q} Answer:` template; chat: the processor's
    # chat template, every assistant turn supervised
    builder = InstructionBuilder(processor, script_args.task, script_args.max_length)
    dataset = builder.build(data.records)
    num_examples = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_examples))
    report_preset(preset, applied, num_examples, training_args)

    # 3. The collator of stage 2: examples packed into rows whose positions restart per example.
    collator = lm_collator(processor, model.config, script_args.packed, script_args.row_length(model),
                           **script_args.collator_augmentation())
    # records the builder dropped are stored in the rows: count them once here, not per epoch in the batches
    count_stored_skips(dataset, data.counter, collator)
    evaluation = held_out_evaluation(data.held_out, data.eval_counter, builder, collator, script_args, training_args)

    # 4. Train and save. Adapters sit in the LM and train at one learning rate (the visual learning rate is for full
    #    fine-tuning); a 4-bit base cannot take merged adapters, so QLoRA runs save the adapters next to the base
    #    model's name.
    adapters = script_args.lora or script_args.qlora
    merge = adapters and script_args.merge_lora and not script_args.qlora
    callbacks = [ShortRunWarningCallback(num_examples, preset=script_args.preset),
                 *configure_evaluation(training_args, script_args, data.held_out is not None), *callbacks]
    return train_and_save(model, processor, training_args, dataset, collator, data.counter, script_args,
                          None if adapters else script_args.visual_learning_rate, callbacks=callbacks,
                          merge_adapters=merge, evaluation=evaluation)


def held_out_evaluation(held_out, counter, builder, collator, script_args, training_args) -> dict | None:
    """The trainer's held-out arguments: rows built like the training rows (the eval loss, the chat metric) and,
    for captions and VQA, answers generated as `lavit caption` / `lavit vqa` would and scored
    ([`GenerationEvaluator`])."""
    if held_out is None:
        return None
    eval_dataset = builder.build(held_out)
    count_stored_skips(eval_dataset, counter, collator)
    evaluator = None if script_args.task == "chat" else GenerationEvaluator(
        held_out, builder.processor, script_args.task, training_args.per_device_eval_batch_size,
        script_args.eval_max_samples)
    return {"eval_dataset": eval_dataset, "evaluator": evaluator, "eval_skip_counter": counter,
            "eval_data_name": script_args.eval_data or script_args.data}


def main(script_args: FinetuningArguments, training_args: LaVITTrainingArguments):
    # the folder `lavit caption` / `lavit vqa` take as --model
    with explained_by_preset(script_args):  # a flag the preset filled in is named as the preset's
        print(f"fine-tuned model saved to {finetune(script_args, training_args)}")


def make_parser(subparsers=None):
    # the same parser for `lavit finetune` (a sub-command of `subparsers`) and for this script run alone
    return stage_parser("finetune", subparsers)


def cli(args=None):
    """`lavit-finetune ARGS` and `python -m lavit.training.finetune ARGS`."""
    main(*make_parser().parse_args_and_config(args))


# `python -m ...` and console scripts; launchers (torchrun, accelerate, deepspeed) run this module on every rank
if __name__ == "__main__":
    cli()
