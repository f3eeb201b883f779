"""Stage-2 steps on raw images with compact placeholders under gradient accumulation: the frozen encoder once per
image and step (the Trainer hands its output to the model) against twice (the model encodes the images again, as
before `image_patch_features`), side by side in one process, through the real `LaVITTrainer`.

Each step has `--accumulation` micro-batches of `--batch` rows `[IMG][/IMG] caption` with random pixels, so the
Trainer must run the frozen selector before it counts the targets. The "encoder twice" variant is the same Trainer
with the encoder's output dropped from the expanded batch. Reported: the median step time and the images the vision
encoder read per step (counted by a forward hook). Variants alternate, `--repeats` times each.

    OMP_NUM_THREADS=1 python benchmarks/bench_compact_images.py --json benchmarks/results/compact_images_cpu.json
"""

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from lavit.training.arguments import LaVITTrainingArguments
from lavit.training.trainer import LaVITTrainer
from transformers import TrainerCallback

from lavit import LaVITConfig, LaVITForCausalLM, LaVITTokenizerConfig

TEXT_VOCAB_SIZE, CODEBOOK_SIZE = 500, 256
# a vision encoder large enough that its pass is a visible share of the step (the frozen ViT of a real run dominates)
TOKENIZER = dict(
    codebook_size=CODEBOOK_SIZE,
    vision_config=dict(image_size=112, patch_size=14, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                       intermediate_size=1024),
    merger_num_layers=1, merger_num_heads=4, merger_intermediate_size=128, code_dim=8,
    decoder_hidden_size=64, decoder_num_layers=1, decoder_num_heads=4, decoder_intermediate_size=128,
)


def build_model() -> LaVITForCausalLM:
    config = LaVITConfig(
        text_config=dict(model_type="llama", vocab_size=TEXT_VOCAB_SIZE + 2 + CODEBOOK_SIZE, pad_token_id=0,
                         hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False),
        tokenizer_config=LaVITTokenizerConfig(**TOKENIZER), text_vocab_size=TEXT_VOCAB_SIZE,
    )
    torch.manual_seed(0)
    return LaVITForCausalLM(config)


class CompactRows(torch.utils.data.Dataset):
    """Rows `[IMG][/IMG] caption` (image and caption supervised) with one random image each."""

    def __init__(self, config: LaVITConfig, count: int):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(count, 3, 112, 112, generator=generator)
        self.captions = torch.randint(3, TEXT_VOCAB_SIZE, (count, 16), generator=generator)
        self.config = config

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        ids = torch.cat([torch.tensor([self.config.image_start_token_id, self.config.image_end_token_id]),
                         self.captions[index]])
        return {"input_ids": ids, "labels": ids.clone(), "pixel_values": self.pixels[index]}


def collate(items: list[dict]) -> dict:
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


class EncoderTwiceTrainer(LaVITTrainer):
    """The cost before: the model runs the frozen encoder again on the expanded batch."""

    def _expand_compact_images(self, batch) -> dict:
        fields = super()._expand_compact_images(batch)
        fields.pop("image_patch_features")
        return fields


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps: the Trainer's target count (its encoder pass), the forwards,
    the backwards and the optimizer."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [end - start for start, end in zip(self.stamps[1:-1], self.stamps[2:], strict=True)]  # 1st: warm-up


def run(trainer_class, steps: int, batch: int, accumulation: int) -> dict:
    model = build_model().train()
    images = []
    model.visual_tokenizer.vision_model.register_forward_hook(lambda module, args, output: images.append(
        args[0].shape[0] if args else 0))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = LaVITTrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch,
                                      gradient_accumulation_steps=accumulation, learning_rate=1e-4, report_to=[],
                                      save_strategy="no", logging_steps=steps, use_cpu=True,
                                      remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=args, train_dataset=CompactRows(model.config, steps * batch *
                                                                                  accumulation),
                                data_collator=collate, callbacks=[timer])
        trainer.train()
    return {"step_seconds": statistics.median(timer.step_times()), "encoder_images_per_step": sum(images) / steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    variants = {"encoder once (Trainer hands its output to the model)": LaVITTrainer,
                "encoder twice (before)": EncoderTwiceTrainer}
    results = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, trainer_class in variants.items():
            results[name].append(run(trainer_class, args.steps, args.batch, args.accumulation))
    rows = {name: {"step_seconds": statistics.median(run["step_seconds"] for run in runs),
                   "encoder_images_per_step": runs[0]["encoder_images_per_step"]} for name, runs in results.items()}
    images_per_step = args.batch * args.accumulation
    print(f"{images_per_step} images per step ({args.accumulation} micro-batches of {args.batch}), "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    for name, row in rows.items():
        print(f"{name:55s} {row['step_seconds']:.3f} s/step, encoder read {row['encoder_images_per_step']:.0f} "
              f"images per step")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "torch_threads": torch.get_num_threads(), "results": rows}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
