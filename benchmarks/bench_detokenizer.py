"""Speed of image synthesis: visual-token generation (LaVITForCausalLM.generate_image_tokens) + pixel decoding
(LaVITDetokenizer.decode, i.e. the sampling loop of LaVITPipeline), with classifier-free guidance batched (the
pipeline's one way) vs off, and with fewer steps / a faster scheduler.
Random weights (speed does not depend on them); all variants in one process.

  tokens      generate_image_tokens: --image-tokens visual tokens (min = max), LM guidance 4.0, batch 1, with the
              device's defaults (CUDA: static cache + compiled step) and, beside it, dynamic cache uncompiled
  features    codebook lookup + feature decoder + conditioning heads
  unet        the denoising loop (UNet calls + scheduler steps)
  vae         latents -> pixels

Sizes: `official` = LLaMA-2-7B + the SD-1.5-architecture lowres decoder at 512x512 (the official `pixel_decoding`),
and the SDXL-architecture highres decoder at 1024x1024 with --highres; `tiny` = a CPU smoke run.

    python benchmarks/bench_detokenizer.py --size tiny                          # CPU smoke run
    python benchmarks/bench_detokenizer.py --size official --dtype bfloat16     # GPU
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_causal_lm import build_model  # noqa: E402

from lavit import LaVITDetokenizer, LaVITDetokenizerConfig  # noqa: E402

TINY_DETOKENIZER = dict(
    prompt_projection_sizes=[32], negative_context_length=8, image_size=64,
    unet_config=dict(sample_size=8, layers_per_block=1, block_out_channels=[32, 64], norm_num_groups=8,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32, attention_head_dim=8),
    vae_config=dict(latent_channels=4, layers_per_block=1, block_out_channels=[16, 32], norm_num_groups=8,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device, repeats):
    function()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_detokenizer(size, conditioning, lm_config, device, dtype) -> LaVITDetokenizer:
    settings = dict(TINY_DETOKENIZER) if size == "tiny" else {}
    config = LaVITDetokenizerConfig.from_tokenizer_config(lm_config.tokenizer_config, conditioning=conditioning,
                                                          **settings)
    with torch.device(device):
        return LaVITDetokenizer(config).to(dtype).eval()


def time_token_generation(size, image_tokens, device, dtype, repeats):
    """Seconds to sample one image's visual tokens with LM guidance 4.0, with the device's default settings (on CUDA
    the static cache and a compiled step: what `LaVITPipeline` runs) and with the dynamic cache, uncompiled; the
    tokens; the LM config. The LM is freed before the decoders are built."""
    model = build_model("tiny" if size == "tiny" else "7b", device, dtype)
    model.config.text_config.pad_token_id = 0
    prompt = torch.randint(3, model.config.text_vocab_size, (1, 12), device=device)
    settings = dict(min_new_tokens=image_tokens, max_new_tokens=image_tokens, guidance_scale=4.0)
    eager = dict(settings, cache_implementation="dynamic", compile_decoding=False)
    seconds = {"default": timed(lambda: model.generate_image_tokens(prompt, **settings), device, repeats),
               "eager": timed(lambda: model.generate_image_tokens(prompt, **eager), device, repeats)}
    return seconds, model.generate_image_tokens(prompt, **settings), model.config


def stage_times(detokenizer, code_ids, token_counts, steps, guidance, scheduler, device, repeats):
    """Seconds of the feature, UNet and VAE parts of one `decode` call."""
    side = detokenizer.config.image_size
    features = timed(lambda: detokenizer.get_conditions(code_ids, token_counts), device, repeats)
    decode = dict(num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                  generator=torch.Generator(device).manual_seed(0))
    to_latents = timed(lambda: detokenizer.decode(code_ids, token_counts, output_type="latent", **decode), device,
                       repeats)
    latents = detokenizer.decode(code_ids, token_counts, output_type="latent", **decode)
    pipe = detokenizer.as_pipeline()
    vae = timed(lambda: pipe.decode_latents(latents), device, repeats)
    return {"features_s": features, "unet_s": to_latents - features, "vae_s": vae, "height": side, "width": side}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "official"], default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--highres", action="store_true", help="also the SDXL-architecture decoder at 1024x1024")
    parser.add_argument("--image-tokens", type=int, default=85, help="visual tokens per image (paper mean ~ 85-90)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (DPM-Solver++ runs 0.4x as many)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    from diffusers import DPMSolverMultistepScheduler

    token_seconds, tokens, lm_config = time_token_generation(args.size, args.image_tokens, device, dtype,
                                                             args.repeats)
    tokens_s = token_seconds["default"]
    code_ids, token_counts = tokens.code_ids, tokens.token_counts
    rows = []
    for conditioning in ["lowres"] + (["highres"] if args.highres else []):
        detokenizer = build_detokenizer(args.size, conditioning, lm_config, device, dtype)
        fast = DPMSolverMultistepScheduler.from_config(detokenizer.scheduler.config)
        ddim, dpm = args.steps, max(1, round(0.4 * args.steps))
        variants = [
            (f"DDIM {ddim} steps, CFG 7 batched", ddim, 7.0, None),
            (f"DDIM {ddim} steps, no CFG", ddim, 1.0, None),
            (f"DPM-Solver++ {dpm} steps, CFG 7 batched", dpm, 7.0, fast),
        ]
        for name, steps, guidance, scheduler in variants:
            parts = stage_times(detokenizer, code_ids, token_counts, steps, guidance, scheduler, device, args.repeats)
            total = tokens_s + parts["features_s"] + parts["unet_s"] + parts["vae_s"]
            rows.append({"decoder": conditioning, "variant": name, "tokens_s": tokens_s,
                         "tokens_eager_s": token_seconds["eager"], **parts,
                         "total_s": total, "images_per_s": 1 / total})
        del detokenizer
    print(f"{'decoder':8} {'variant':38} {'tokens':>8} {'features':>9} {'unet':>8} {'vae':>8} {'total s':>8} "
          f"{'img/s':>7}")
    for row in rows:
        print(f"{row['decoder']:8} {row['variant']:38} {row['tokens_s']:8.3f} {row['features_s']:9.3f} "
              f"{row['unet_s']:8.3f} {row['vae_s']:8.3f} {row['total_s']:8.3f} {row['images_per_s']:7.2f}")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "image_tokens": args.image_tokens,
              "rows": rows}
    output = Path(args.output or Path(__file__).parent / "results" / f"detokenizer_{args.size}_{device.type}.json")
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
