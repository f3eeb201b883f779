"""Training the pixel detokenizer (never released by the official authors).

The visual tokenizer stays frozen: each image is tokenized on the fly, the detokenizer reconstructs its features from
the codes (the feature decoder is copied from the visual tokenizer and frozen unless `--train_feature_decoder`), and the
projection heads and diffusion UNet learn to denoise the image's VAE latents (noise-prediction loss). Each image's
condition is dropped with probability `condition_dropout` for classifier-free guidance, and an EMA of the trained
weights is kept, checkpointed, and written as the final model: a `LaVITPipeline` folder (`model_index.json`, one
sub-folder per component) whose decoder components are the trained ones and whose language model is `--model` (or the
LaVIT model given as `--visual_tokenizer`; without one the pipeline holds the decoder alone, and
`LaVITPipeline.from_pretrained(final, language_model=..., processor=...)` completes it).

    lavit train-detokenizer --visual_tokenizer runs/tokenizer/final --data photos/ --detokenizer_config tiny \\
        --output_dir runs/detokenizer --max_steps 2000 --model runs/finetune/final
    # start from a pretrained latent diffusion model (its unet/ vae/ scheduler/ sub-folders, e.g. SDXL)
    lavit train-detokenizer ... --detokenizer_config paper --diffusers_model path/to/sdxl
    python -m lavit.training.stage3_detokenizer detokenizer.yaml     # the same flags as keys of a YAML/JSON file
    # several GPUs: DDP, or DeepSpeed ZeRO-1/2 (the EMA needs whole parameters on each rank)
    accelerate launch --multi_gpu --num_processes 8 -m lavit.training.stage3_detokenizer detokenizer.yaml
    deepspeed --num_gpus 8 --module lavit.training.stage3_detokenizer --deepspeed training/configs/zero2.json \\
        --visual_tokenizer runs/tokenizer/final --data photos/ --detokenizer_config paper --output_dir runs/detok
"""

from pathlib import Path

from lavit.modeling import LaVITDetokenizer
from lavit.processing import LaVITImageProcessor
from transformers import set_seed

from lavit.command_inputs import load_visual_tokenizer_of

from .arguments import DetokenizerTrainingArguments, LaVITTrainingArguments, stage_parser
from .callbacks import EMACallback, JsonlLoggerCallback
from .checkpoints import resumable_run
from .collators import DetokenizerCollator, image_items
from .data import image_dataset, transforms_in_temporary_files
from .evaluation import configure_evaluation, stage_records
from .models import (
    build_detokenizer,
    pipeline_language_model_folder,
    require_same_codebook,
    trained_pipeline,
)
from .trainer import LaVITDetokenizerTrainer, fit_vae, save_final, whole_weights


@transforms_in_temporary_files()
def train_detokenizer(
    script_args: DetokenizerTrainingArguments, training_args: LaVITTrainingArguments, callbacks=()
) -> Path:
    """Trains the detokenizer and returns its folder (`output_dir/final`: a `LaVITPipeline` folder, EMA weights when
    EMA is on)."""
    if not script_args.visual_tokenizer:
        raise ValueError("--visual_tokenizer is required (the frozen visual tokenizer whose codes are decoded)")
    # 0. Seed first: the new detokenizer's weights, the crops, the diffusion noise and the dropped conditions.
    set_seed(training_args.seed)

    # 1. The frozen visual tokenizer and the detokenizer sharing its codebook, whole on every rank.
    with whole_weights(training_args):
        visual_tokenizer = load_visual_tokenizer_of(script_args.visual_tokenizer, "--visual_tokenizer")
        detokenizer = build_detokenizer(script_args, visual_tokenizer)
    # the language model saved beside the decoder: found and checked now (a wrong --model costs no training)
    language_model_folders = pipeline_language_model_folder(script_args)
    if language_model_folders is not None:
        require_same_codebook(language_model_folders[0], detokenizer)

    # 2. The images (bad records replaced and counted, as in stage 1); each batch holds them twice: for the visual
    #    tokenizer, and at the decoder's resolution for the VAE.
    data = stage_records(script_args, training_args.seed, require_text=False)
    crop_scale = None if script_args.crop_scale >= 1 else (script_args.crop_scale, 1.0)
    dataset = image_dataset(data.records, None, crop_scale, training_args.seed)
    eval_dataset = None if data.held_out is None else image_dataset(data.held_out, None, None, training_args.seed)
    # the visual tokenizer's own preprocessing for its input, the squashed [-1, 1] image for the VAE's target
    collator = DetokenizerCollator(LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config),
                                   detokenizer.config.image_size)

    # 3.-5. The output folder is locked, and tied to this run's models, data and settings, until the final save.
    with resumable_run(script_args, training_args) as resume:
        return fit_and_train(script_args, training_args, detokenizer, visual_tokenizer, dataset, collator,
                             data.counter, resume, callbacks, eval_dataset, data.eval_counter, language_model_folders)


def fit_and_train(script_args, training_args, detokenizer, visual_tokenizer, dataset, collator, counter, resume,
                  callbacks, eval_dataset=None, eval_counter=None, language_model_folders=None) -> Path:
    """Steps 3-5 of `train_detokenizer`: the VAE fit of a fresh run, the training (evaluated on `eval_dataset`, whose
    bad records `eval_counter` counts, when the run has held-out data) and the final folder."""
    # 3. Small experiments without a pretrained VAE fit one first (a random VAE decodes any latent to noise); a
    #    resumed run restores the fitted VAE from its checkpoint instead.
    if script_args.vae_steps > 0 and resume is None:
        losses = fit_vae(detokenizer.vae, dataset, lambda items: collator.target_pixel_values(image_items(items)[0]),
                         script_args.vae_steps, training_args.per_device_train_batch_size)
        print(f"VAE fitted for {len(losses)} steps: reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    # 4. Train the detokenizer on the visual tokenizer's codes, with the EMA of its weights checkpointed alongside.
    #    The trainer tokenizes each batch with the frozen visual tokenizer outside the trained model, so DDP and
    #    DeepSpeed wrap the detokenizer only; the EMA callback restores its averages from the checkpoint on resume.
    callbacks = [JsonlLoggerCallback(), *configure_evaluation(training_args, script_args, eval_dataset is not None),
                 *callbacks]
    if script_args.ema_decay > 0:
        callbacks.append(EMACallback(detokenizer, script_args.ema_decay, resume))
    trainer = LaVITDetokenizerTrainer(
        model=detokenizer, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=collator, visual_tokenizer=visual_tokenizer, skip_counter=counter,
        eval_skip_counter=eval_counter, eval_data_name=script_args.eval_data or script_args.data, callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)

    # 5. The final folder, a pipeline's: the EMA weights (copied into the model when training ended) as its decoder
    #    components, beside the language model of `language_model_folders`.
    return save_final(trainer, training_args.output_dir, convert=lambda saved, folder: trained_pipeline(
        LaVITDetokenizer.from_pretrained(saved), language_model_folders).save_pretrained(folder))


def main(script_args: DetokenizerTrainingArguments, training_args: LaVITTrainingArguments):
    print(f"trained pixel decoder saved as a LaVITPipeline folder: {train_detokenizer(script_args, training_args)}")


def make_parser(subparsers=None):
    # the same parser for `lavit train-detokenizer` (a sub-command of `subparsers`) and for this script run alone
    return stage_parser("train-detokenizer", subparsers)


def cli(args=None):
    """`lavit-train-detokenizer ARGS` and `python -m lavit.training.stage3_detokenizer ARGS`."""
    main(*make_parser().parse_args_and_config(args))


# `python -m ...` and console scripts; launchers (torchrun, accelerate, deepspeed) run this module on every rank
if __name__ == "__main__":
    cli()
