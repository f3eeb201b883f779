"""Speed of LaVITForCausalLM: captioning with dynamic visual tokens vs the same LM fed a fixed 576-token image, and
image-token generation with classifier-free guidance on vs off. Random weights; all variants in one process.

  caption     model.generate(input_ids, pixel_values): visual tokenizer + placeholder expansion + LM prefill + greedy
              decoding of --new-tokens tokens (tokenizer included in the time); dynamic cache, and on CUDA also the
              static cache (transformers compiles the decoding step: LaVIT's CUDA default), for both LMs
  prefill     one forward with logits_to_keep=1 (what generate does first), tokenizer included
  fixed576    the same LM and the same calls on a 576-image-token + 10-text-token prompt (LLaVA-1.5 style), fed as
              embeddings, without any vision encoder (so the baseline is favoured)
  image gen   model.generate_image_tokens: --image-tokens sampled visual tokens at batch 1, CFG scale 4 vs 1, and
              CFG 4 with a static KV cache (plus a compiled decoding step on CUDA)

The selector keeps p_keep = 1/3 per patch in "sample" mode (about 85 of 256 tokens per image, as the anchors of
shared/research/gpu_anchors.md). Plain-HF references (H100, bf16, LLaMA-2-7B size): prefill B=32 at 586 tokens
58.3 seq/s, at 97 tokens 322.8 seq/s; eager decode 27-32 tokens/s at batch 1.

    python benchmarks/bench_causal_lm.py --size tiny                                     # CPU smoke run
    python benchmarks/bench_causal_lm.py --size 7b --dtype bfloat16 --batch-sizes 1,32   # GPU
"""

import argparse
import json
import math
import platform
import statistics
import time

import torch
from transformers import GenerationMixin

from lavit import LaVITConfig, LaVITForCausalLM, LaVITTokenizerConfig

SIZES = {
    "7b": dict(text_config=None, tokenizer_config=None),
    "tiny": dict(
        text_config=dict(model_type="llama", vocab_size=1000 + 2 + 512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, pad_token_id=0),
        tokenizer_config=dict(
            vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
            merger_num_layers=2, merger_num_heads=4, merger_intermediate_size=128, codebook_size=512, code_dim=8,
            decoder_hidden_size=64, decoder_num_layers=1, decoder_num_heads=4, decoder_intermediate_size=128,
        ),
        text_vocab_size=1000,
    ),
}
PROMPT_TEXT_TOKENS = 10
FIXED_IMAGE_TOKENS = 576


def build_model(size: str, device, dtype) -> LaVITForCausalLM:
    settings = dict(SIZES[size])
    if settings.get("tokenizer_config") is not None:
        settings["tokenizer_config"] = LaVITTokenizerConfig(**settings["tokenizer_config"])
    config = LaVITConfig(**{key: value for key, value in settings.items() if value is not None})
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LaVITForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.visual_tokenizer.selector.classifier.bias.copy_(torch.tensor([math.log(0.5), 0.0]))
    return model.eval()


def timed(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def caption_inputs(model, batch_size, device, dtype, generator):
    config = model.config
    text = torch.randint(3, config.text_vocab_size, (batch_size, PROMPT_TEXT_TOKENS), generator=generator)
    image = torch.tensor([config.image_start_token_id, config.image_end_token_id]).expand(batch_size, -1)
    input_ids = torch.cat([image, text], dim=1).to(device)
    size = config.tokenizer_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device, dtype)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                image_selection={"mode": "sample"})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="caption,image", help="comma list: caption (and prefill), image")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    parts = args.parts.split(",")
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")] if "caption" in parts else []

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args.size, device, dtype)
    generator = torch.Generator().manual_seed(0)
    hidden_size = model.config.text_config.hidden_size
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    # the dynamic cache (eager decoding), and on CUDA the static cache with which transformers compiles the decoding
    # step (LaVIT's `generate` default there); both LMs get the same cache
    caches = ["dynamic", "static"] if device.type == "cuda" else ["dynamic"]
    rows = []
    with torch.no_grad():
        for batch_size in batch_sizes:
            inputs = caption_inputs(model, batch_size, device, dtype, generator)
            prepared = model.model.prepare_multimodal_inputs(
                inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                image_selection=inputs["image_selection"],
            )
            lavit_prompt_tokens = prepared.attention_mask.sum(dim=1).float().mean().item()
            fixed_length = FIXED_IMAGE_TOKENS + 2 + PROMPT_TEXT_TOKENS
            fixed_embeds = torch.randn(batch_size, fixed_length, hidden_size, generator=generator).to(device, dtype)
            fixed_mask = torch.ones(batch_size, fixed_length, dtype=torch.long, device=device)

            def run_lavit_prefill(inputs=inputs):
                model(**inputs, logits_to_keep=1, use_cache=True)

            def run_fixed_prefill(embeds=fixed_embeds, mask=fixed_mask):
                model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=True)

            runs = []
            for cache in caches:
                def run_lavit_caption(inputs=inputs, cache=cache):
                    model.generate(**inputs, **greedy, cache_implementation=cache)

                def run_fixed_caption(embeds=fixed_embeds, mask=fixed_mask, cache=cache):
                    GenerationMixin.generate(model, inputs_embeds=embeds, attention_mask=mask, **greedy,
                                             cache_implementation=cache)

                suffix = "" if cache == "dynamic" else f" {cache}"
                runs += [(f"lavit caption{suffix}", run_lavit_caption, lavit_prompt_tokens),
                         (f"fixed576 caption{suffix}", run_fixed_caption, fixed_length)]
            runs += [("lavit prefill", run_lavit_prefill, lavit_prompt_tokens),
                     ("fixed576 prefill", run_fixed_prefill, fixed_length)]
            for name, fn, prompt_tokens in runs:
                times = timed(fn, device, args.warmup, args.repeats)
                median = statistics.median(times)
                rows.append(dict(name=name, batch_size=batch_size, median_s=median, min_s=min(times),
                                 images_per_s=batch_size / median, prompt_tokens_per_image=prompt_tokens))
            if device.type == "cuda":
                torch.cuda.empty_cache()

        prompt = caption_inputs(model, 1, device, dtype, generator)["input_ids"][:, 2:]
        image_variants = [(4.0, "dynamic", False), (1.0, "dynamic", False), (4.0, "static", False)]
        image_variants = image_variants if "image" in parts else []
        if image_variants and device.type == "cuda":
            image_variants.append((4.0, "static", True))  # compiled decoding step: the lever for >= 100 tokens/s
        for scale, cache, compiled in image_variants:
            def run_image_tokens(scale=scale, cache=cache, compiled=compiled):
                model.generate_image_tokens(prompt, guidance_scale=scale, min_new_tokens=args.image_tokens,
                                            max_new_tokens=args.image_tokens, generator=torch.Generator(device=device),
                                            cache_implementation=cache, compile_decoding=compiled)

            times = timed(run_image_tokens, device, args.warmup, args.repeats)
            median = statistics.median(times)
            name = f"image tokens cfg={scale:g}" + ("" if cache == "dynamic" else f" {cache}") + (
                " compiled" if compiled else "")
            rows.append(dict(name=name, batch_size=1, median_s=median, min_s=min(times),
                             tokens_per_s=args.image_tokens / median))

    header = (f"{'variant':<36}{'batch':>6}{'median ms':>12}{'min ms':>10}{'img/s':>10}{'prompt tok/img':>16}"
              f"{'tok/s':>9}")
    print(header)
    for row in rows:
        print(f"{row['name']:<36}{row['batch_size']:>6}{row['median_s'] * 1e3:>12.2f}{row['min_s'] * 1e3:>10.2f}"
              f"{row.get('images_per_s', float('nan')):>10.2f}{row.get('prompt_tokens_per_image', float('nan')):>16.1f}"
              f"{row.get('tokens_per_s', float('nan')):>9.1f}")
    by_key = {(row["name"], row["batch_size"]): row for row in rows}
    for batch_size in batch_sizes:
        for kind in ["prefill"] + [f"caption{'' if cache == 'dynamic' else ' ' + cache}" for cache in caches]:
            ratio = by_key[(f"lavit {kind}", batch_size)]["images_per_s"] / by_key[(f"fixed576 {kind}",
                                                                                    batch_size)]["images_per_s"]
            print(f"lavit / fixed576 {kind} throughput at batch {batch_size}: {ratio:.2f}x")
    result = dict(size=args.size, dtype=args.dtype, device=torch.cuda.get_device_name() if device.type == "cuda"
                  else platform.processor() or "cpu", torch=torch.__version__, new_tokens=args.new_tokens,
                  image_tokens=args.image_tokens, rows=rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
