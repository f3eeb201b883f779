"""Stage-2 training throughput: packed multimodal rows vs padded batches, through the real `LaVITTrainer` and
`LaVITDataCollator`, side by side in one process, with and without gradient checkpointing (and under DeepSpeed ZeRO
with --deepspeed).

Every step trains on the same amount of data: synthetic image-caption segments in both orders, each image with
N(90, 30) visual tokens (clipped to 8..256, as LaVIT keeps about 90 of 256 patches) and 8..48 text tokens, drawn
until `--rows` rows of `--row-length` tokens are full. The segments are pre-tokenized: visual tokens enter as code
ids (`[IMG] v_1 ... v_n [/IMG]`, as generated images are fed), so the step is the LM's (the frozen ViT of a stage-2
run on pixels is not timed). Variants:

  padded          one segment per row, right-padded to the longest (the `packed=False` fallback), SDPA
  packed rows     segments packed into `--rows` rows of `--row-length` tokens, positions restarting per segment
                  (block-diagonal attention), SDPA
  packed 1 row    all segments in one row of rows x row-length tokens, FlexAttention (CUDA only: FlexAttention has
                  no CPU backward)

Options after a layout, e.g. "packed 1 row +liger +bf16": "+liger" trains with `use_liger_kernel` (Liger's RMSNorm,
RoPE, SwiGLU and the fused linear cross-entropy over the head; liger-kernel), "+bf16" with pure bf16 weights and
Kahan-summed AdamW (torch-optimi) instead of AMP.

tokens/s counts real tokens only (padding excluded), so the variants are compared on the same useful work.
MFU = (6 N + 12 L H s) tokens/s / peak, with N the LM's parameters (embedding and head included), L layers, H the
hidden size and s each token's segment length (attention inside its segment, non-causal count), as in
shared/research/gpu_anchors.md section C (plain HF, 1.1B LLaMA, seq 2048, H100: 40,650 tokens/s, 33.3% MFU amp).
Peak: --peak-tflops (989, H100 SXM dense bf16).

    python benchmarks/bench_training.py --size tiny --steps 4                                # CPU smoke run
    python benchmarks/bench_training.py --size 1b --json benchmarks/results/training_h100.json   # GPU, amp
    python benchmarks/bench_training.py --size 1b --deepspeed training/configs/zero2.json        # GPU, ZeRO-2
"""

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time

import torch
from lavit.training.arguments import LaVITTrainingArguments
from lavit.training.collators import LaVITDataCollator
from lavit.training.trainer import LaVITTrainer
from transformers import TrainerCallback

from lavit import LaVITConfig, LaVITForCausalLM, LaVITTokenizerConfig

# LM sizes: "1b" has TinyLlama's dimensions (the gpu_anchors baseline); text vocabulary + [IMG]/[/IMG] + codebook
SIZES = {
    "1b": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4),
               text_vocab_size=32000, codebook_size=16384),
    "small": dict(text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8),
                  text_vocab_size=32000, codebook_size=16384),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
                 text_vocab_size=1000, codebook_size=512),
}
# the visual tokenizer is carried by the model but not run (pre-tokenized segments): its size does not matter
SMALL_TOKENIZER = dict(
    vision_config=dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=128),
    merger_num_layers=1, merger_num_heads=4, merger_intermediate_size=128, code_dim=8,
    decoder_hidden_size=64, decoder_num_layers=1, decoder_num_heads=4, decoder_intermediate_size=128,
)
EOS_TOKEN_ID = 2
# variant options after the layout: Liger's kernels (use_liger_kernel), pure bf16 weights (the stages' --dtype bfloat16)
OPTIONS = ("liger", "bf16")


def build_model(size: str, attn_implementation: str, dtype: torch.dtype, device) -> LaVITForCausalLM:
    settings = SIZES[size]
    vocab_size = settings["text_vocab_size"] + 2 + settings["codebook_size"]
    config = LaVITConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, pad_token_id=0, tie_word_embeddings=False,
                         **settings["text"]),
        tokenizer_config=LaVITTokenizerConfig(codebook_size=settings["codebook_size"], **SMALL_TOKENIZER),
        text_vocab_size=settings["text_vocab_size"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LaVITForCausalLM(config)
    model.get_decoder().set_attn_implementation(attn_implementation)
    return model.to(dtype)


def draw_segment(rng: random.Random, config: LaVITConfig) -> list[int]:
    visual_count = min(256, max(8, round(rng.gauss(90, 30))))
    visual_ids = [config.visual_token_offset + rng.randrange(config.tokenizer_config.codebook_size)
                  for _ in range(visual_count)]
    image_ids = [config.image_start_token_id, *visual_ids, config.image_end_token_id]
    text_ids = [rng.randrange(3, config.text_vocab_size) for _ in range(rng.randint(8, 48))]
    body = image_ids + text_ids if rng.random() < 0.5 else text_ids + image_ids
    return body + [EOS_TOKEN_ID]


def step_segments(config: LaVITConfig, steps: int, rows: int, row_length: int, seed: int) -> list[list[dict]]:
    """The segments of every step: those that fill `rows` rows of `row_length` tokens greedily (the collator's
    packing rule, so the packed variant gets exactly `rows` rows)."""
    rng = random.Random(seed)
    steps_segments, pending = [], draw_segment(rng, config)
    for _ in range(steps):
        segments = []
        for _ in range(rows):
            used = 0
            while used + len(pending) <= row_length:
                segments.append({"input_ids": pending, "labels": pending})
                used += len(pending)
                pending = draw_segment(rng, config)
        steps_segments.append(segments)
    return steps_segments


class PreTokenizedCollator(LaVITDataCollator):
    """A dataset item is one step's segments, already holding their visual code ids (no images to decode)."""

    def __call__(self, items: list[list[dict]]) -> dict:
        segments = [segment for item in items for segment in item]
        return self.pack(segments) if self.packed else self.pad(segments)


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps (data loading, collation, forward, backward, optimizer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [self._now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(self._now())

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_times(self, warmup: int) -> list[float]:
        return [end - start for start, end in zip(self.stamps[warmup:-1], self.stamps[warmup + 1:], strict=True)]


def run_variant(args, variant: dict, gradient_checkpointing: bool, steps: list[list[dict]], device) -> dict:
    pure_bf16 = args.precision == "bf16" or "bf16" in variant["options"]
    dtype = torch.bfloat16 if pure_bf16 else torch.float32
    model = build_model(args.size, variant["attention"], dtype, device)
    config = model.config
    collator = PreTokenizedCollator(None, config.image_start_token_id, pad_token_id=0, packed=variant["packed"],
                                    max_row_length=variant["max_row_length"],
                                    pad_to_multiple_of=variant["pad_to_multiple_of"])
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = LaVITTrainingArguments(
            output_dir=output_dir, max_steps=len(steps), per_device_train_batch_size=1, learning_rate=1e-4,
            warmup_steps=0, save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
            use_cpu=device.type == "cpu", bf16=args.precision == "amp" and not pure_bf16,
            gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
            dataloader_num_workers=0, seed=0, deepspeed=args.deepspeed, use_liger_kernel="liger" in variant["options"],
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer = None
        try:  # Liger's kernels apply in `train()`; pure bf16 takes torch-optimi's AdamW (kahan_adamw)
            trainer = LaVITTrainer(model=model, args=training_args, train_dataset=steps, data_collator=collator,
                                   callbacks=[timer])
            trainer.train()
            error = None
        except torch.OutOfMemoryError:
            error = "out of memory"
        except ImportError as missing:  # liger-kernel or torch-optimi not installed
            error = f"not installed: {missing}"
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        del trainer
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = dict(variant=variant["name"], attention=variant["attention"], gradient_checkpointing=gradient_checkpointing,
               weights="bf16" if pure_bf16 else "fp32", liger="liger" in variant["options"], peak_memory_gib=peak_gib,
               error=error)
    if error is None:
        times = timer.step_times(args.warmup)
        batch = collator([steps[args.warmup]])
        real = sum(len(segment["input_ids"]) for segment in steps[args.warmup])
        row.update(step_s=statistics.median(times), min_step_s=min(times), batch_shape=list(batch["input_ids"].shape),
                   padding_fraction=1 - real / batch["input_ids"].numel())
    return row


def lm_flops_per_step(config: LaVITConfig, segments: list[dict], lm_parameters: int) -> float:
    text_config = config.text_config
    lengths = [len(segment["input_ids"]) for segment in segments]
    attention = 12 * text_config.num_hidden_layers * text_config.hidden_size * sum(length**2 for length in lengths)
    return 6 * lm_parameters * sum(lengths) + attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--precision", default=None, choices=["amp", "bf16", "fp32"],
                        help="amp: fp32 weights + bf16 autocast (Trainer --bf16); bf16: bf16 weights; default: amp on "
                             "CUDA, fp32 on CPU")
    parser.add_argument("--rows", type=int, default=4, help="rows per step (the tokens of a step: rows x row-length)")
    parser.add_argument("--row-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", default="off,on", help="comma list of off/on")
    parser.add_argument("--variants", default="padded,packed rows,packed 1 row")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config (e.g. training/configs/zero2.json)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # erratic with shapes that change every batch (gpu_anchors)
    if args.deepspeed:  # a single process outside a launcher
        for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT="29533").items():
            os.environ.setdefault(name, value)
    tokens_per_step = args.rows * args.row_length
    variants = {
        "padded": dict(packed=False, max_row_length=None, pad_to_multiple_of=64, attention="sdpa"),
        "packed rows": dict(packed=True, max_row_length=args.row_length, pad_to_multiple_of=args.row_length,
                            attention="sdpa"),
        "packed 1 row": dict(packed=True, max_row_length=None, pad_to_multiple_of=tokens_per_step,
                             attention="flex_attention"),
    }
    chosen = []
    for name in args.variants.split(","):  # a layout, then options: "packed 1 row +liger +bf16"
        layout, *options = name.split(" +")
        unknown = sorted(set(options) - set(OPTIONS))
        if layout not in variants or unknown:
            parser.error(f"--variants: {name!r}: layouts {sorted(variants)}, options {OPTIONS}")
        chosen.append(dict(name=name, options=options, **variants[layout]))
    if device.type != "cuda":  # FlexAttention has no CPU backward; Liger's Triton kernels need a GPU
        chosen = [variant for variant in chosen
                  if variant["attention"] != "flex_attention" and "liger" not in variant["options"]]

    reference = build_model(args.size, "sdpa", torch.float32, "meta")
    lm_parameters = sum(parameter.numel() for parameter in reference.model.language_model.parameters())
    lm_parameters += reference.lm_head.weight.numel()
    steps = step_segments(reference.config, args.warmup + args.steps, args.rows, args.row_length, seed=0)
    # the Trainer shuffles the steps; they differ by less than one segment per row, so their mean is used
    real_tokens = statistics.mean(sum(len(segment["input_ids"]) for segment in step) for step in steps)
    flops = statistics.mean(lm_flops_per_step(reference.config, step, lm_parameters) for step in steps)

    results = []
    for checkpointing in [value == "on" for value in args.gradient_checkpointing.split(",")]:
        for variant in chosen:
            row = run_variant(args, variant, checkpointing, steps, device)
            if row["error"] is None:
                row.update(tokens_per_s=real_tokens / row["step_s"],
                           mfu=flops / row["step_s"] / (args.peak_tflops * 1e12))
            results.append(row)
            print(f"done: {variant['name']} (gradient checkpointing {'on' if checkpointing else 'off'})", flush=True)

    print(f"\nLM {lm_parameters / 1e9:.3f}B parameters, {args.precision}, {real_tokens:.0f} real tokens per step "
          f"(rows {args.rows} x {args.row_length}), device {device.type}")
    print(f"{'variant':<28}{'attention':<16}{'ckpt':>5}{'batch':>12}{'padding':>9}{'step ms':>10}{'tokens/s':>12}"
          f"{'MFU %':>8}{'peak GiB':>10}")
    for row in results:
        if row["error"]:
            print(f"{row['variant']:<28}{row['attention']:<16}{'on' if row['gradient_checkpointing'] else 'off':>5}"
                  f"  {row['error']}")
            continue
        shape = "x".join(map(str, row["batch_shape"]))
        print(f"{row['variant']:<28}{row['attention']:<16}{'on' if row['gradient_checkpointing'] else 'off':>5}"
              f"{shape:>12}{row['padding_fraction'] * 100:>8.1f}%{row['step_s'] * 1e3:>10.1f}"
              f"{row['tokens_per_s']:>12.0f}{row['mfu'] * 100:>8.1f}{row['peak_memory_gib']:>10.1f}")
    by_key = {(row["variant"], row["gradient_checkpointing"]): row for row in results if not row["error"]}
    for (name, checkpointing), row in by_key.items():
        padded = by_key.get(("padded", checkpointing))
        if name != "padded" and padded:
            print(f"{name} / padded tokens/s (checkpointing {'on' if checkpointing else 'off'}): "
                  f"{row['tokens_per_s'] / padded['tokens_per_s']:.2f}x")
    if args.json:
        result = dict(size=args.size, precision=args.precision, rows=args.rows, row_length=args.row_length,
                      deepspeed=args.deepspeed, lm_parameters=lm_parameters, real_tokens_per_step=real_tokens,
                      device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                      torch=torch.__version__, peak_tflops=args.peak_tflops, results=results)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
