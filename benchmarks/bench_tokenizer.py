"""Speed and memory of `LaVITTokenizerModel.tokenize`, `official` vs `exact` merger attention, side by side.

For each size (official: EVA ViT-g/14 + 12-block merger + 16384x32 codebook; small: a ViT-S-like stack), batch size
and merger implementation it times, with random weights:
  whole    tokenize(pixel_values): encoder + selector + selection + merger + quantizer
  encoder  the frozen encoder alone
  post     selector + selection + merger + quantizer on precomputed encoder features
The selector's last bias is set so that p_keep = 1/3 and tokens are drawn in "sample" mode (the official behaviour),
so about 85 of 256 patches are kept and the count changes every batch, as in the anchor measurements of the official
code (shared/research/gpu_anchors.md: 301 images/s whole path, 758 images/s post-encoder, H100 bf16, batch 128).

    python benchmarks/bench_tokenizer.py                       # CPU: small size, fp32
    python benchmarks/bench_tokenizer.py --sizes official,small --batch-sizes 1,32,128 --dtype bfloat16  # GPU
"""

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch

from lavit import LaVITTokenizerConfig, LaVITTokenizerModel

SIZES = {
    "official": dict(),
    "small": dict(
        vision_config=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
        merger_num_layers=4,
        merger_num_heads=6,
        merger_intermediate_size=1536,
        codebook_size=4096,
        decoder_hidden_size=384,
        decoder_num_layers=2,
        decoder_num_heads=6,
        decoder_intermediate_size=1536,
    ),
}


def build_model(size: str, attention: str, device, dtype) -> LaVITTokenizerModel:
    config = LaVITTokenizerConfig(merger_attention=attention, **SIZES[size])
    with torch.device(device):
        model = LaVITTokenizerModel(config)
    with torch.no_grad():
        # p_keep = 1/3, as in the official-code anchor runs
        model.selector.classifier.bias.copy_(torch.tensor([math.log(0.5), 0.0]))
    return model.to(dtype=dtype).eval()


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return times


def post_encoder(model: LaVITTokenizerModel, image_features, generator):
    keep_log_probs = model.selector(image_features)
    keep_weights = model.select_tokens(keep_log_probs, mode="sample", generator=generator)
    merged = model.merger(image_features, keep_weights)
    code_ids, _ = model.quantizer.lookup(model.quantizer.project_in(merged))
    return code_ids


def measure(model, batch_size, device, warmup, repeats) -> dict:
    timer = Timer(device)
    generator = torch.Generator(device=device).manual_seed(0)
    size = model.config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, device=device, dtype=model.dtype, generator=generator)
    token_counts = []

    @torch.no_grad()
    def whole():
        token_counts.append(model.tokenize(pixel_values, mode="sample", generator=generator).token_counts)

    with torch.no_grad():
        image_features = model.encode_patches(pixel_values)
    results = {}
    for name, fn in [
        ("whole", whole),
        ("encoder", torch.no_grad()(lambda: model.encode_patches(pixel_values))),
        ("post", torch.no_grad()(lambda: post_encoder(model, image_features, generator))),
    ]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = timer(fn, warmup, repeats)
        median = statistics.median(times)
        results[name] = {
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "images_per_s": batch_size / median,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
    counts = torch.cat(token_counts).float()
    results["tokens_per_image"] = counts.mean().item()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--batch-sizes", default=None, help="comma list (default: 1,32,128 on GPU, 1,4 on CPU)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = (args.sizes or ("official,small" if on_gpu else "small")).split(",")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,32,128" if on_gpu else "1,4")).split(",")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats if args.repeats is not None else (15 if on_gpu else 3)

    rows = []
    for size in sizes:
        for attention in ("official", "exact"):
            model = build_model(size, attention, device, dtype)
            for batch_size in batch_sizes:
                result = measure(model, batch_size, device, warmup, repeats)
                rows.append({"size": size, "attention": attention, "batch_size": batch_size, **result})
                print(f"done {size} {attention} B={batch_size}", flush=True)
            del model
            if on_gpu:
                torch.cuda.empty_cache()

    environment = {
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
    }
    header = (f"{'size':<9}{'attention':<10}{'batch':>6}{'tok/img':>9}{'whole img/s':>13}{'encoder img/s':>15}"
              f"{'post img/s':>12}{'whole peak GiB':>16}")
    print(f"\n{environment}\n{header}")
    for row in rows:
        peak = row["whole"]["peak_memory_gib"]
        print(f"{row['size']:<9}{row['attention']:<10}{row['batch_size']:>6}{row['tokens_per_image']:>9.1f}"
              f"{row['whole']['images_per_s']:>13.1f}{row['encoder']['images_per_s']:>15.1f}"
              f"{row['post']['images_per_s']:>12.1f}{(f'{peak:.2f}' if peak is not None else '-'):>16}")
    print("\nexact / official speed-up (same size and batch):")
    for row in rows:
        if row["attention"] != "exact":
            continue
        base = next(r for r in rows if r["attention"] == "official" and r["size"] == row["size"]
                    and r["batch_size"] == row["batch_size"])
        whole_speedup = base["whole"]["median_s"] / row["whole"]["median_s"]
        post_speedup = base["post"]["median_s"] / row["post"]["median_s"]
        print(f"  {row['size']:<9} B={row['batch_size']:<4} whole x{whole_speedup:.2f}  post x{post_speedup:.2f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".json")
    with os.fdopen(handle, "w") as file:
        json.dump({"environment": environment, "results": rows}, file, indent=2)
    os.replace(temporary, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
