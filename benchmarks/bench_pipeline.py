"""Seconds per image of `LaVITPipeline.__call__` vs the path it replaces (`LaVITForCausalLM.generate_image_tokens`
then the sampling loop `LaVITDetokenizer.decode` had of its own, what `generate_images` ran: `released_decode` below,
the loop as it was at commit ec012e8, kept here only as the baseline now that the pipeline owns the one loop), side by
side in one process on the same weights, prompts and seeds.
Classifier-free guidance is batched in both stages of both paths (LM guidance 4, decoder guidance 7).
Random weights: speed does not depend on them. The two paths give the same pixels (checked on every run).

Sizes: `tiny` = the CPU tiny preset of `bench_causal_lm.py` + the tiny decoder of `bench_detokenizer.py` at 64x64.

    python benchmarks/bench_pipeline.py                     # CPU tiny preset
    python benchmarks/bench_pipeline.py --images-per-prompt 1,4 --repeats 5
"""

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_causal_lm import build_model  # noqa: E402
from bench_detokenizer import build_detokenizer  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from lavit.modeling.generation_lavit import row_generators  # noqa: E402
from lavit.modeling.modeling_lavit_detokenizer import LaVITDetokenizerConditions  # noqa: E402

from lavit import LaVITImageProcessor, LaVITPipeline, LaVITProcessor  # noqa: E402

PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"


def word_processor(text_vocab_size: int, codebook_size: int, image_size: int) -> LaVITProcessor:
    """A word-level tokenizer of exactly `text_vocab_size` tokens (the tiny LM's text vocabulary), as a processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{index}" for index in range(text_vocab_size - 3)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    LaVITProcessor.add_image_tokens(tokenizer, codebook_size)
    return LaVITProcessor(LaVITImageProcessor(size={"height": image_size, "width": image_size}), tokenizer)


@torch.no_grad()
def released_decode(detokenizer, code_ids, token_counts, generator, guidance_scale: float, steps: int) -> torch.Tensor:
    """Code ids -> (B, 3, H, W) images in [0, 1] by the released path: the detokenizer's conditions, its own DDIM loop
    with both guidance halves in one UNet batch, its VAE."""
    conditions = detokenizer.get_conditions(code_ids, token_counts)
    batch_size, side = len(token_counts), detokenizer.config.image_size
    negative = detokenizer.negative_conditions(batch_size, conditions.prompt_embeds.dtype)
    guided = LaVITDetokenizerConditions.cat([negative, conditions])
    shape = (batch_size, detokenizer.unet.config.in_channels, side // detokenizer.vae_scale_factor,
             side // detokenizer.vae_scale_factor)
    scheduler = detokenizer.scheduler
    scheduler.set_timesteps(steps)
    latents = randn_tensor(shape, generator=generator, dtype=detokenizer.unet.dtype) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep).repeat(2, 1, 1, 1)
        noise_pred = detokenizer.predict_noise(model_input, timestep, guided, side, side)
        unconditional, conditional = noise_pred.chunk(2)
        noise_pred = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(noise_pred, timestep, latents, generator=generator).prev_sample
    vae = detokenizer.vae
    images = vae.decode(latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def interleaved_seconds(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two functions timed turn by turn, the order swapped every round (after one warm-up each), so
    that the drifts of a shared machine and the cost of going second hit both alike."""
    first(), second()
    times = ([], [])
    for round_index in range(repeats):
        pairs = list(zip((first, second), times, strict=True))
        for function, record in pairs if round_index % 2 == 0 else reversed(pairs):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, default=20, help="visual tokens per image (min = max)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--images-per-prompt", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cpu"), torch.float32
    language_model = build_model("tiny", device, dtype)
    language_model.config.text_config.pad_token_id = 0
    detokenizer = build_detokenizer("tiny", "lowres", language_model.config, device, dtype)
    processor = word_processor(language_model.config.text_vocab_size,
                               language_model.config.tokenizer_config.codebook_size, 224)
    pipe = LaVITPipeline.from_detokenizer(language_model, processor, detokenizer)
    pipe.set_progress_bar_config(disable=True)
    tokens = dict(min_new_tokens=args.image_tokens, max_new_tokens=args.image_tokens)
    inputs = processor(text=PROMPT, return_tensors="pt")

    def released_path(per_prompt: int):
        generator = torch.Generator().manual_seed(0)
        visual = language_model.generate_image_tokens(**inputs, generator=generator, guidance_scale=4.0,
                                                      num_images_per_prompt=per_prompt, **tokens)
        streams = row_generators(generator, per_prompt, per_prompt, device)
        return released_decode(detokenizer, visual.code_ids, visual.token_counts, streams, 7.0, args.steps)

    def pipeline(per_prompt: int):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_images_per_prompt=per_prompt,
                    token_guidance_scale=4.0, guidance_scale=7.0, num_inference_steps=args.steps, output_type="pt",
                    **tokens).images

    rows = []
    for per_prompt in [int(value) for value in args.images_per_prompt.split(",")]:
        same = torch.allclose(released_path(per_prompt), pipeline(per_prompt), atol=1e-5)
        released, piped = interleaved_seconds(functools.partial(released_path, per_prompt),
                                              functools.partial(pipeline, per_prompt), args.repeats)
        released, piped = released / per_prompt, piped / per_prompt
        rows.append({"images_per_prompt": per_prompt, "released_s_per_image": released,
                     "pipeline_s_per_image": piped, "pipeline_over_released": piped / released, "same_pixels": same})
    print(f"{'images/prompt':>13} {'released s/img':>15} {'pipeline s/img':>15} {'ratio':>6} {'same pixels':>12}")
    for row in rows:
        print(f"{row['images_per_prompt']:13d} {row['released_s_per_image']:15.3f} {row['pipeline_s_per_image']:15.3f} "
              f"{row['pipeline_over_released']:6.2f} {row['same_pixels']!s:>12}")
    result = {"device": platform.processor() or "cpu", "torch": torch.__version__, "size": "tiny", "dtype": "float32",
              "image_tokens": args.image_tokens, "steps": args.steps, "threads": torch.get_num_threads(),
              "rows": rows}
    output = Path(args.output or Path(__file__).parent / "results" / "pipeline_tiny_cpu.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
