"""Stage 1: train the dynamic visual tokenizer (paper section 3.1, eq. 4).

The encoder stays frozen; the selector, merger, quantizer and feature decoder learn to reconstruct the encoder's
features from the kept, merged, quantized tokens, with the keep ratio pulled towards rho. Recipe of the official
authors: `quantizer_start_step` steps without quantization (the decoder reads continuous latents), then VQ is
switched on, its codebook initialised by k-means on the warmed-up latents and updated by EMA (dead codes restart).

    lavit train-tokenizer --data photos/ --tokenizer_config tiny --output_dir runs/tokenizer --max_steps 2000
    python -m lavit.training.stage1_tokenizer --data photos/ --tokenizer_config tiny --output_dir runs/tokenizer
    python -m lavit.training.stage1_tokenizer config.yaml          # the same flags as keys of a YAML/JSON file
    # several GPUs: DDP through accelerate or torchrun, or DeepSpeed (ZeRO configs in training/configs/)
    accelerate launch --multi_gpu --num_processes 8 -m lavit.training.stage1_tokenizer config.yaml
    deepspeed --num_gpus 8 --module lavit.training.stage1_tokenizer --deepspeed training/configs/zero2.json \\
        --data photos/ --tokenizer_config paper --output_dir runs/tokenizer --bf16
"""

from pathlib import Path

from lavit.processing import LaVITImageProcessor
from transformers import set_seed
from transformers.trainer_utils import has_length

from .arguments import LaVITTrainingArguments, TokenizerTrainingArguments, stage_parser
from .callbacks import JsonlLoggerCallback
from .checkpoints import resumable_run
from .collators import ImageCollator
from .data import image_dataset, transforms_in_temporary_files
from .evaluation import configure_evaluation, stage_records
from .models import build_tokenizer
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, explained_by_preset, report_preset
from .trainer import LaVITTokenizerTrainer, save_final, whole_weights


@transforms_in_temporary_files()
def train_tokenizer(script_args: TokenizerTrainingArguments, training_args: LaVITTrainingArguments,
                    callbacks=()) -> Path:
    """Runs stage 1 and returns the folder of the trained tokenizer (`output_dir/final`, with its image processor);
    `callbacks` are extra `TrainerCallback`s."""
    # 0. Seed first: the new tokenizer's random weights and the crops depend on it. A preset fills in only the
    #    settings the run left at their defaults (flags you give win).
    set_seed(training_args.seed)
    preset, applied = apply_preset("tokenizer", script_args.preset, script_args, training_args)

    # 1. The tokenizer: new from a config preset, or continued. Every rank builds it whole (ZeRO-3 shards it later).
    with whole_weights(training_args):
        model = build_tokenizer(script_args)
    # the image processor is derived from the tokenizer's config, so training and inference see the same pixels
    image_processor = LaVITImageProcessor.from_tokenizer_config(model.config)

    # 2. The images, decoded lazily; a bad record is replaced by the next readable one and counted. The dataset's own
    #    counter only logs: its counts reach `data.counter` through the batches (dataloader workers included).
    data = stage_records(script_args, training_args.seed, require_text=False)
    # random crops, each drawn from (seed, epoch, index): a resumed run sees the crops of the uninterrupted one
    crop_scale = None if script_args.crop_scale >= 1 else (script_args.crop_scale, 1.0)
    dataset = image_dataset(data.records, None, crop_scale, training_args.seed)
    # held-out images whole (no crops): the same reconstruction cosine, keep ratio and codebook use at every evaluation
    eval_dataset = None if data.held_out is None else image_dataset(data.held_out, None, None, training_args.seed)

    # 3. A preset scales the steps to the data; VQ waits a quarter of them, since k-means needs warmed-up latents.
    num_images = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_images))
    if preset is not None and script_args.quantizer_start_step == 0:
        applied["quantizer_start_step"] = script_args.quantizer_start_step = training_args.max_steps // 4
    report_preset(preset, applied, num_images, training_args)
    evaluation_callbacks = configure_evaluation(training_args, script_args, eval_dataset is not None)

    # 4. Train, resuming from the newest complete checkpoint unless told otherwise. The trainer switches VQ on at
    #    `quantizer_start_step` and logs the tokenizer's statistics (keep ratio, codebook usage) with the loss;
    #    logs.jsonl gets every log line, and the warning names the numbers when the run is too short to learn.
    #    Held-out images, when given, are evaluated at the Trainer's `--eval_strategy`.
    trainer = LaVITTokenizerTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=ImageCollator(image_processor),
        quantizer_start_step=script_args.quantizer_start_step,
        skip_counter=data.counter,
        eval_skip_counter=data.eval_counter,
        eval_data_name=script_args.eval_data or script_args.data,
        callbacks=[JsonlLoggerCallback(), ShortRunWarningCallback(num_images, preset=script_args.preset),
                   *evaluation_callbacks, *callbacks],
    )
    # 5. The final folder, with the image processor that matches the tokenizer's input size. The output folder is
    #    locked, and tied to this run's models, data and settings, until then.
    with resumable_run(script_args, training_args) as resume:
        trainer.train(resume_from_checkpoint=resume)
        return save_final(trainer, training_args.output_dir, image_processor)


def main(script_args: TokenizerTrainingArguments, training_args: LaVITTrainingArguments):
    # the folder to give stage 2 as --visual_tokenizer
    with explained_by_preset(script_args):  # a flag the preset filled in is named as the preset's
        print(f"trained tokenizer saved to {train_tokenizer(script_args, training_args)}")


def make_parser(subparsers=None):
    # the same parser for `lavit train-tokenizer` (a sub-command of `subparsers`) and for this script run alone
    return stage_parser("train-tokenizer", subparsers)


def cli(args=None):
    """`lavit-train-tokenizer ARGS` and `python -m lavit.training.stage1_tokenizer ARGS`."""
    main(*make_parser().parse_args_and_config(args))


# `python -m ...` and console scripts; launchers (torchrun, accelerate, deepspeed) run this module on every rank
if __name__ == "__main__":
    cli()
