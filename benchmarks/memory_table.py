"""Memory to load, run and train each LaVIT stage at the official size, from the real parameter counts (every model
built on the meta device, so nothing is allocated). Weights, gradients and optimizer states only: activations,
the KV cache and framework overhead come on top (the KV cache of the 7B LM is 0.5 MiB per cached token in bf16).

Byte counts per parameter:
  load / inference      bf16 weights: 2
  train, full (amp)     the Trainer's --bf16: float32 master weights, float32 gradients, Adam moments: 4 + 4 + 8 = 16
                        per trainable parameter, 4 per frozen one (loaded float32, computed in bf16 under autocast)
  ZeRO-3, 8 GPUs        DeepSpeed bf16: bf16 weights and gradients, float32 master copy and Adam moments: 2 + 2 + 4 + 8
                        = 16 per trainable, 2 per frozen, all partitioned over the GPUs
  ZeRO-3 + CPU offload  the float32 master copy and Adam moments (12 per trainable) live in CPU memory (all ranks
                        together); per GPU: its bf16 weight and gradient partitions (whole layers are gathered one at
                        a time)
  detokenizer (stage 3) also holds the frozen visual tokenizer (it tokenizes each batch) and a float32 EMA of the
                        trained weights, whole on every GPU
  LoRA (r=16, q/v)      bf16 frozen weights (2 per parameter) + the adapters at 16 bytes per parameter

    python benchmarks/memory_table.py          # prints the markdown table of docs/sizes.md
"""

import torch

from lavit import (
    LaVITConfig,
    LaVITDetokenizer,
    LaVITDetokenizerConfig,
    LaVITForCausalLM,
    LaVITTokenizerConfig,
    LaVITTokenizerModel,
)

GIB = 2**30
GPUS = 8


def count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def lora_parameters(language_model, rank: int = 16) -> int:
    """Adapters on every q_proj and v_proj: rank x (in + out) each."""
    return sum(rank * (module.in_features + module.out_features) for name, module in language_model.named_modules()
               if name.endswith(("q_proj", "v_proj")))


def stages() -> list[dict]:
    """(name, trainable, frozen parameter counts, LoRA adapter count or None) of each stage at the official size."""
    with torch.device("meta"):
        unified = LaVITForCausalLM(LaVITConfig())
        tokenizer = LaVITTokenizerModel(LaVITTokenizerConfig())
        detokenizers = {conditioning: LaVITDetokenizer(LaVITDetokenizerConfig.from_tokenizer_config(
            LaVITTokenizerConfig(), conditioning=conditioning)) for conditioning in ("lowres", "highres")}
    encoder = count(tokenizer.vision_model)
    tokenizer_total = count(tokenizer)
    unified_total = count(unified)
    frozen_tokenizer = count(unified.model.visual_tokenizer)
    rows = [
        dict(name="visual tokenizer (stage 1)", total=tokenizer_total, trainable=tokenizer_total - encoder,
             lora=None),
        dict(name="unified 7B (stage 2, fine-tuning)", total=unified_total, trainable=unified_total - frozen_tokenizer,
             lora=lora_parameters(unified.model.language_model)),
    ]
    for conditioning, detokenizer in detokenizers.items():
        trainable = count(detokenizer.unet) + count(detokenizer.condition)
        # stage 3 also runs the frozen tokenizer; the EMA keeps a float32 copy of the trained weights
        rows.append(dict(name=f"detokenizer {conditioning} (stage 3)", total=count(detokenizer), trainable=trainable,
                         frozen_extra=tokenizer_total, ema=trainable, lora=None))
    return rows


def table_row(row: dict) -> str:
    total, trainable = row["total"], row["trainable"]
    frozen = total - trainable + row.get("frozen_extra", 0)
    ema = 4 * row.get("ema", 0)
    full = 16 * trainable + 4 * frozen + ema
    zero3 = (16 * trainable + 2 * frozen) / GPUS + ema
    offload_gpu = (2 * (trainable + frozen) + 2 * trainable) / GPUS + ema  # bf16 weight + gradient partitions
    offload_cpu = 12 * trainable
    lora = f"{(2 * (total + row.get('frozen_extra', 0)) + 16 * row['lora']) / GIB:.1f}" if row["lora"] else "-"
    return (f"| {row['name']} | {total / 1e9:.3f}B ({trainable / 1e9:.3f}B trained) | {2 * total / GIB:.1f} | "
            f"{full / GIB:.1f} | {zero3 / GIB:.1f} | {offload_gpu / GIB:.1f} GPU + {offload_cpu / GIB:.0f} CPU | "
            f"{lora} |")


def main():
    print("| model (stage) | parameters | load / inference, bf16 (GiB) | train, 1 GPU, --bf16 (GiB) | ZeRO-3, per GPU "
          f"of {GPUS} (GiB) | ZeRO-3 + CPU offload, per GPU of {GPUS} (GiB) | LoRA r=16 (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for row in stages():
        print(table_row(row))


if __name__ == "__main__":
    main()
