"""Training the pixel detokenizer (never released by the official authors).

The visual tokenizer stays frozen: each image is tokenized on the fly, the detokenizer reconstructs its features
from the codes (the feature decoder is copied from the tokenizer and frozen unless `--train_feature_decoder`), and the
projection heads and diffusion UNet learn to denoise the image's VAE latents (noise-prediction loss). Each image's
condition is dropped with probability `condition_dropout` for classifier-free guidance, and an EMA of the trained
weights is kept, checkpointed, and written as the final model.

    lavit-train-detokenizer --visual_tokenizer runs/tokenizer/final --data photos/ --detokenizer_config tiny \\
        --output_dir runs/detokenizer --max_steps 2000
    # start from a pretrained latent diffusion model (its unet/ vae/ scheduler/ sub-folders, e.g. SDXL)
    lavit-train-detokenizer ... --detokenizer_config paper --diffusers_model path/to/sdxl
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lavit.modeling import LaVITDetokenizer, LaVITTokenizerModel
from lavit.processing import LaVITImageProcessor
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .arguments import DataArguments, LaVITTrainingArguments, limit_records, load_config_preset, parse_arguments
from .collators import image_items
from .data import BadRecordCounter, image_dataset, load_records
from .preprocess import load_visual_tokenizer
from .trainer import (
    JsonlLoggerCallback,
    LaVITTrainer,
    resolve_resume,
    save_final,
    whole_weights,
)

EMA_FILE = "ema.safetensors"


@dataclass
class DetokenizerTrainingArguments(DataArguments):
    visual_tokenizer: str = field(default=None, metadata={
        "help": "The frozen visual tokenizer: a LaVITTokenizerModel folder or a LaVIT model folder."})
    detokenizer: str | None = field(default=None, metadata={"help": "A LaVITDetokenizer folder to continue training."})
    detokenizer_config: str | None = field(default=None, metadata={
        "help": "A new detokenizer: a config JSON file or a preset name in training/configs ('tiny', 'paper')."})
    diffusers_model: str | None = field(default=None, metadata={
        "help": "A diffusers folder whose unet/, vae/ and scheduler/ replace the new detokenizer's (e.g. SDXL)."})
    train_feature_decoder: bool = field(default=False, metadata={
        "help": "Also train the feature decoder (copied from the tokenizer; frozen by default)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay of the trained weights (0 turns EMA off)."})
    crop_scale: float = field(default=1.0, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops)."})
    vae_steps: int = field(default=0, metadata={
        "help": "Fit the VAE to the images for N steps before the diffusion training: for small experiments "
                "without a pretrained VAE (a random VAE decodes any latent to noise)."})


def build_detokenizer(script_args: DetokenizerTrainingArguments, visual_tokenizer) -> LaVITDetokenizer:
    if script_args.detokenizer:
        detokenizer = LaVITDetokenizer.from_pretrained(script_args.detokenizer)
    else:
        if not script_args.detokenizer_config:
            raise ValueError("give --detokenizer (a detokenizer to continue) or --detokenizer_config (a new one)")
        settings = load_config_preset(script_args.detokenizer_config, "detokenizer")
        detokenizer = LaVITDetokenizer.from_visual_tokenizer(visual_tokenizer, **settings)
        if script_args.diffusers_model:
            detokenizer.load_diffusers_components(script_args.diffusers_model)
    if not torch.equal(detokenizer.codebook.cpu(), visual_tokenizer.quantizer.codebook.cpu()):
        raise ValueError("the detokenizer's codebook differs from the visual tokenizer's: they were not trained "
                         "together")
    detokenizer.codebook.requires_grad_(False)
    detokenizer.decoder.requires_grad_(script_args.train_feature_decoder)
    return detokenizer


@dataclass
class DetokenizerCollator:
    """Items of `training.data.image_dataset` (decoded, cropped images) -> `tokenizer_pixel_values` (the tokenizer's
    preprocessing) and `pixel_values` (the same crop, squashed to the detokenizer's resolution like the tokenizer's
    input, in [-1, 1] for the VAE), plus the batch's `skipped_records`."""

    image_processor: LaVITImageProcessor
    image_size: int

    def __call__(self, items: list) -> dict:
        images, skipped = image_items(items)
        return {
            "tokenizer_pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"],
            "pixel_values": self.target_pixel_values(images),
            "skipped_records": torch.tensor(skipped),
        }

    def target_pixel_values(self, images: list) -> torch.Tensor:
        """Images -> (B, 3, image_size, image_size) in [-1, 1], the VAE's input."""
        targets = [np.asarray(image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC),
                              dtype=np.float32) for image in images]
        return torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2) / 127.5 - 1


def fit_vae(vae, dataset, collate_fn, steps: int, batch_size: int, learning_rate: float = 1e-3,
            kl_weight: float = 1e-6) -> list[float]:
    """Trains `vae` as an autoencoder of the dataset's images (`collate_fn` turns a list of them into the VAE's
    input) with reconstruction MSE + a small KL term, and freezes it again; returns the losses. A plain loop: a few
    hundred steps on small images."""
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    losses = []
    progress = tqdm(total=steps, desc="fitting the VAE", unit="step")  # minutes on a CPU: never silent
    while len(losses) < steps:
        for batch in loader:
            pixel_values = batch.to(vae.device, vae.dtype)
            posterior = vae.encode(pixel_values).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(reconstruction, pixel_values) + kl_weight * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            progress.update()
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if len(losses) == steps:
                break
    progress.close()
    vae.requires_grad_(False).eval()
    return losses


class LaVITDetokenizerTrainer(LaVITTrainer):
    """Tokenizes each batch with the frozen visual tokenizer (outside the trained model, so DDP/DeepSpeed never wrap
    it), then trains the detokenizer on the codes."""

    def __init__(self, *args, visual_tokenizer: LaVITTokenizerModel, **kwargs):
        super().__init__(*args, logged_outputs=(), **kwargs)
        self.visual_tokenizer = visual_tokenizer.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs.pop("tokenizer_pixel_values")
        if self.visual_tokenizer.device != pixel_values.device:
            self.visual_tokenizer.to(pixel_values.device)
        with torch.no_grad():
            tokens = self.visual_tokenizer.tokenize(pixel_values.to(self.visual_tokenizer.dtype))
        inputs = {**inputs, "code_ids": tokens.code_ids, "token_counts": tokens.token_counts}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class EMACallback(TrainerCallback):
    """An exponential moving average of the trained parameters (diffusers' `EMAModel`), saved as `ema.safetensors`
    in every checkpoint, restored on resume, and copied into the model at the end of training."""

    def __init__(self, model, decay: float, resume_from_checkpoint: str | None = None):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.parameters = [param for param in model.parameters() if param.requires_grad]
        self.ema = EMAModel(self.parameters, decay=decay)
        if resume_from_checkpoint is not None:
            self.load(Path(resume_from_checkpoint) / EMA_FILE)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.parameters)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tensors = {name: shadow.detach().cpu().contiguous()
                       for name, shadow in zip(self.names, self.ema.shadow_params, strict=True)}
            save_file(tensors, checkpoint / EMA_FILE, metadata={"optimization_step": str(self.ema.optimization_step)})

    def on_train_end(self, args, state, control, **kwargs):
        # under ZeRO-3 each rank holds a shard of every parameter: gather them whole, write the averages, re-shard
        gathered = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(self.parameters, modifier_rank=0)
        with gathered:
            self.ema.copy_to(self.parameters)

    def load(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written without its EMA weights")
        from safetensors import safe_open

        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            self.ema.optimization_step = int(handle.metadata()["optimization_step"])
        for name, shadow in zip(self.names, self.ema.shadow_params, strict=True):
            shadow.copy_(tensors[name])


def train_detokenizer(
    script_args: DetokenizerTrainingArguments, training_args: LaVITTrainingArguments, callbacks=()
) -> Path:
    """Trains the detokenizer and returns its folder (`output_dir/final`, EMA weights when EMA is on)."""
    if not script_args.visual_tokenizer:
        raise ValueError("--visual_tokenizer is required (the frozen tokenizer whose codes are decoded)")
    set_seed(training_args.seed)
    with whole_weights(training_args):
        visual_tokenizer = load_visual_tokenizer(script_args.visual_tokenizer)
        detokenizer = build_detokenizer(script_args, visual_tokenizer)
    counter = BadRecordCounter()
    records = load_records(script_args.data, script_args.split, script_args.streaming, script_args.image_column,
                           script_args.text_column, require_text=False, counter=counter)
    crop_scale = None if script_args.crop_scale >= 1 else (script_args.crop_scale, 1.0)
    # the dataset's own counter only logs: its counts reach `counter` through the batches
    dataset = image_dataset(limit_records(records, script_args.max_samples), None, crop_scale, training_args.seed)
    collator = DetokenizerCollator(LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config),
                                   detokenizer.config.image_size)
    resume = resolve_resume(script_args.resume, training_args.output_dir)
    if script_args.vae_steps > 0 and resume is None:  # a resumed run restores the fitted VAE from its checkpoint
        losses = fit_vae(detokenizer.vae, dataset, lambda items: collator.target_pixel_values(image_items(items)[0]),
                         script_args.vae_steps, training_args.per_device_train_batch_size)
        print(f"VAE fitted for {len(losses)} steps: reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    callbacks = [JsonlLoggerCallback(), *callbacks]
    if script_args.ema_decay > 0:
        callbacks.append(EMACallback(detokenizer, script_args.ema_decay, resume))
    trainer = LaVITDetokenizerTrainer(
        model=detokenizer, args=training_args, train_dataset=dataset, data_collator=collator,
        visual_tokenizer=visual_tokenizer, skip_counter=counter, callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return save_final(trainer, training_args.output_dir)


def main(argv=None):
    script_args, training_args = parse_arguments((DetokenizerTrainingArguments, LaVITTrainingArguments), argv)
    final_dir = train_detokenizer(script_args, training_args)
    print(f"trained detokenizer saved to {final_dir}")


if __name__ == "__main__":
    main()
