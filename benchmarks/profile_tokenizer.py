"""Kernel-level profile of the post-encoder tokenizer path (selector, selection, merger, quantizer) on a GPU.

    python benchmarks/profile_tokenizer.py --attention exact --batch-size 128
"""

import argparse

import torch
from bench_tokenizer import build_model, post_encoder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="exact", choices=["exact", "official"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model("official", args.attention, device, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(args.batch_size, model.config.num_patches, model.config.vision_hidden_size,
                           device=device, dtype=torch.bfloat16, generator=generator)
    with torch.no_grad():
        for _ in range(3):
            post_encoder(model, features, generator)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(5):
                post_encoder(model, features, generator)
            torch.cuda.synchronize()
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
