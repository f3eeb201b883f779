"""Stage 1: train the dynamic visual tokenizer (paper section 3.1, eq. 4).

The encoder stays frozen; the selector, merger, quantizer and feature decoder learn to reconstruct the encoder's
features from the kept, merged, quantized tokens, with the keep ratio pulled towards rho. Recipe of the official
authors: `quantizer_start_step` steps without quantization (the decoder reads continuous latents), then VQ is
switched on, its codebook initialised by k-means on the warmed-up latents and updated by EMA (dead codes restart).

    lavit-train-tokenizer --data photos/ --tokenizer_config tiny --output_dir runs/tokenizer --max_steps 2000
    python -m lavit.training.stage1_tokenizer config.yaml
"""

from dataclasses import dataclass, field
from pathlib import Path

from lavit.modeling import LaVITTokenizerConfig, LaVITTokenizerModel
from lavit.processing import LaVITImageProcessor
from transformers import AutoModel, set_seed
from transformers.trainer_utils import has_length

from .arguments import (
    DataArguments,
    LaVITTrainingArguments,
    config_preset_names,
    limit_records,
    load_config_preset,
    parse_arguments,
)
from .collators import ImageCollator
from .data import BadRecordCounter, image_dataset, load_records
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, preset_field, report_preset
from .trainer import (
    JsonlLoggerCallback,
    LaVITTrainer,
    resolve_resume,
    save_final,
    whole_weights,
)

TOKENIZER_METRICS = ("reconstruction_loss", "keep_ratio_loss", "commitment_loss", "reconstruction_cosine",
                     "mean_keep_ratio", "codebook_usage", "perplexity")


@dataclass
class TokenizerTrainingArguments(DataArguments):
    model: str | None = field(default=None, metadata={"help": "A LaVITTokenizerModel folder to continue training."})
    tokenizer_config: str | None = field(default=None, metadata={
        "help": f"A new tokenizer: a config JSON file or a preset name: {config_preset_names('tokenizer')} ('tiny': "
                f"64 px, 8 px patches, 64 codes; 'small': the same with 256 codes, for small data; 'paper': the "
                f"released LaVIT sizes)."})
    vision_model: str | None = field(default=None, metadata={
        "help": "A transformers vision model (folder or Hub id, e.g. a CLIP/SigLIP vision tower) to use as the "
                "frozen encoder of a new tokenizer."})
    quantizer_start_step: int = field(default=0, metadata={
        "help": "Steps trained without quantization before VQ (k-means init + EMA) is switched on."})
    crop_scale: float = field(default=0.5, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops)."})
    preset: str | None = preset_field("tokenizer")


def build_tokenizer(script_args: TokenizerTrainingArguments) -> LaVITTokenizerModel:
    if script_args.model:
        return LaVITTokenizerModel.from_pretrained(script_args.model)
    if not script_args.tokenizer_config:
        raise ValueError("give --model (a tokenizer to continue) or --tokenizer_config (a new one)")
    settings = load_config_preset(script_args.tokenizer_config, "tokenizer")
    vision_model = None
    if script_args.vision_model:
        vision_model = AutoModel.from_pretrained(script_args.vision_model)
        vision_model = getattr(vision_model, "vision_model", vision_model)  # a full CLIP/SigLIP: its vision tower
        settings["vision_config"] = vision_model.config.to_dict()
    model = LaVITTokenizerModel(LaVITTokenizerConfig(**settings))
    if vision_model is not None:
        model.vision_model.load_state_dict(vision_model.state_dict())
    return model


class LaVITTokenizerTrainer(LaVITTrainer):
    """Stage-1 trainer: the loss of eq. 4, VQ switched on at `quantizer_start_step`, tokenizer statistics logged."""

    def __init__(self, *args, quantizer_start_step: int = 0, **kwargs):
        self.quantizer_start_step = quantizer_start_step
        super().__init__(*args, logged_outputs=TOKENIZER_METRICS, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_quantizer": self.state.global_step >= self.quantizer_start_step}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_tokenizer(script_args: TokenizerTrainingArguments, training_args: LaVITTrainingArguments,
                    callbacks=()) -> Path:
    """Runs stage 1 and returns the folder of the trained tokenizer (`output_dir/final`, with its image processor);
    `callbacks` are extra `TrainerCallback`s."""
    set_seed(training_args.seed)
    preset, applied = apply_preset("tokenizer", script_args.preset, script_args, training_args)
    with whole_weights(training_args):
        model = build_tokenizer(script_args)
    image_processor = LaVITImageProcessor.from_tokenizer_config(model.config)
    counter = BadRecordCounter()
    records = load_records(script_args.data, script_args.split, script_args.streaming, script_args.image_column,
                           script_args.text_column, require_text=False, counter=counter)
    crop_scale = None if script_args.crop_scale >= 1 else (script_args.crop_scale, 1.0)
    # the dataset's own counter only logs: its counts reach `counter` through the batches
    dataset = image_dataset(limit_records(records, script_args.max_samples), None, crop_scale, training_args.seed)
    num_images = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_images))
    if preset is not None and script_args.quantizer_start_step == 0:  # k-means needs warmed-up latents
        applied["quantizer_start_step"] = script_args.quantizer_start_step = training_args.max_steps // 4
    report_preset(preset, applied, num_images, training_args)
    trainer = LaVITTokenizerTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=ImageCollator(image_processor),
        quantizer_start_step=script_args.quantizer_start_step,
        skip_counter=counter,
        callbacks=[JsonlLoggerCallback(),
                   ShortRunWarningCallback(num_images, preset=script_args.preset), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resolve_resume(script_args.resume, training_args.output_dir))
    return save_final(trainer, training_args.output_dir, image_processor)


def main(argv=None):
    script_args, training_args = parse_arguments((TokenizerTrainingArguments, LaVITTrainingArguments), argv)
    final_dir = train_tokenizer(script_args, training_args)
    print(f"trained tokenizer saved to {final_dir}")


if __name__ == "__main__":
    main()
