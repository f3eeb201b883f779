"""`lavit tokenize`, `lavit caption` and `lavit vqa`: the commands that read images. Each gives the same output for
the same input on every run: every random draw comes from `--seed`."""

import argparse

from lavit.command_inputs import PerItem, require_folder
from lavit.modeling.validation_lavit import OPEN_FRACTION, POSITIVE_FLOAT, POSITIVE_INT, SEED
from lavit.paths import InputPath, OutputFile, numbered_output

from .common import add_command, load_lavit, open_image


def question_text(value: str) -> str:
    """`--question`: text that is not empty (an empty question gets an empty answer, as if answered)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must be a non-empty question")
    return value


def add_parsers(commands) -> None:
    tokenize = add_command(commands, "tokenize", "visual tokens of images")
    tokenize.add_argument("images", type=InputPath, nargs="+", help="image files")
    tokenize.add_argument("--model", type=InputPath, required=True,
                          help="a visual tokenizer or LaVIT folder (or Hub id)")
    tokenize.add_argument("--budget", type=POSITIVE_INT, default=None,
                          help="keep at most N tokens per image (top-k; default: the selector's own count)")
    tokenize.add_argument("--visualize", type=OutputFile, default=None,
                          help="write the kept patches to this PNG (-N per image)")
    add_selection_arguments(tokenize)

    caption = add_command(commands, "caption", "caption images")
    caption.add_argument("images", type=InputPath, nargs="+", help="image files")
    caption.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    caption.add_argument("--prompt", default="", help="text after the image (default and official: empty)")
    caption.add_argument("--max-new-tokens", type=POSITIVE_INT, default=36, help="the longest caption, in tokens")
    caption.add_argument("--num-beams", type=POSITIVE_INT, default=2, help="beam search width")
    caption.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images captioned together (same results)")
    add_selection_arguments(caption, text=True)

    vqa = add_command(commands, "vqa", "answer a question about an image")
    vqa.add_argument("images", type=InputPath, nargs="+", help="image files (the same question for each)")
    vqa.add_argument("--question", type=question_text, required=True, help="the question asked about every image")
    vqa.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    vqa.add_argument("--max-new-tokens", type=POSITIVE_INT, default=10, help="the longest answer, in tokens")
    vqa.add_argument("--num-beams", type=POSITIVE_INT, default=5, help="beam search width")
    add_selection_arguments(vqa, text=True)


def add_selection_arguments(parser, text: bool = False) -> None:
    """Reproducible outputs: the same input gives the same output on every run unless `--seed` changes."""
    parser.add_argument("--selection", choices=["deterministic", "sample"], default=None,
                        help="patch selection: 'deterministic' (p_keep > threshold) or 'sample' (Bernoulli(p_keep), "
                             "drawn from --seed); default: the tokenizer's own selection_mode")
    if text:
        parser.add_argument("--do-sample", action="store_true", help="sample the text (default: beam search)")
        parser.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="with --do-sample")
        parser.add_argument("--top-p", type=OPEN_FRACTION, default=1.0, help="with --do-sample")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of every random draw (sampled selection, "
                                                            "--do-sample), fixed per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


# FILE_OUTPUTS: every file argument (`OutputFile`) of a command -> (its flag, the value, how many files it names, the
# inputs), checked before any work (`lavit.paths.check_output_files`)
FILE_OUTPUTS = {
    "tokenize": lambda args: ("--visualize", args.visualize, len(args.images), {"images": args.images}),
}


def image_selection(args):
    """The selector options of one image (`LaVITImageSelection`): a generator seeded from `--seed`, so sampling repeats
    run to run."""
    from lavit.command_inputs import seeded_selection

    return seeded_selection(args.seed, args.selection or None, getattr(args, "budget", None) or None)


def selection_inputs(model, pixel_values, args) -> dict:
    """The selection arguments of `generate` for a batch of images, seeded with `--seed` image by image."""
    from lavit.command_inputs import per_image_selection

    return per_image_selection(model, pixel_values, args.seed, args.selection or None,
                               getattr(args, "budget", None) or None)


def text_generation(args) -> dict:
    """`generate` options of caption/VQA: beam search, or sampling with `--do-sample` from a generator seeded with
    `--seed` (every row draws from its own stream, so a row's text does not depend on its batch)."""
    import torch

    if not args.do_sample:
        return {"num_beams": args.num_beams, "do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "num_beams": 1,
            "generator": torch.Generator().manual_seed(args.seed)}
def run_tokenize(args) -> None:
    from lavit.atomic import save_png_atomically
    from lavit.command_inputs import load_visual_tokenizer_of
    from lavit.processing.image_processing_lavit import LaVITImageProcessor, draw_kept_patches

    require_folder(args.model, ("lavit_tokenizer", "lavit"))
    items = PerItem("tokenize", "image", args.images, args.json)
    images = items.each(open_image)  # every file is read before the model loads
    if images:
        visual_tokenizer = load_visual_tokenizer_of(args.model).eval()
        image_processor = LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config)
        grid = visual_tokenizer.config.image_size // visual_tokenizer.config.patch_size

    def tokenize(index):
        pixel_values = image_processor(images=images[index], return_tensors="pt")["pixel_values"]
        tokens = visual_tokenizer.tokenize(pixel_values.to(visual_tokenizer.device, visual_tokenizer.dtype),
                                          selection=image_selection(args))
        result = {"token_count": int(tokens.token_counts[0]), "num_patches": visual_tokenizer.config.num_patches,
                  "code_ids": tokens.code_ids.tolist()}
        text = f"{args.images[index]}: {result['token_count']} of {result['num_patches']} tokens, code ids " \
               f"{result['code_ids']}"
        if args.visualize:
            result["visualization"] = str(numbered_output(args.visualize, index, len(args.images)))
            save_png_atomically(draw_kept_patches(images[index], tokens.keep_mask[0], grid), result["visualization"])
            text += f"\n  kept patches -> {result['visualization']}"
        items.done(index, result, text)

    items.each_index(tokenize, list(images))
    items.finish()


def run_caption(args) -> None:
    items = PerItem("caption", "image", args.images, args.json)
    images = items.each(open_image)  # every file is read before the model loads
    if images:
        model, processor = load_lavit(args.model)

    def caption(indices):
        batch = [images[index] for index in indices]
        inputs = processor(images=batch, text=["<image>" + args.prompt] * len(batch), return_tensors="pt")
        output = model.generate(**inputs, **selection_inputs(model, inputs["pixel_values"], args),
                                max_new_tokens=args.max_new_tokens, **text_generation(args))
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for index, text in zip(indices, texts, strict=True):
            items.done(index, {"caption": text.strip()}, f"{args.images[index]}: {text.strip()}")

    items.each_batch(caption, args.batch_size)
    items.finish()


def run_vqa(args) -> None:
    items = PerItem("vqa", "image", args.images, args.json)
    images = items.each(open_image)
    if images:
        model, processor = load_lavit(args.model)

    def answer(index):
        inputs = processor(images=[images[index]], text=f"<image>Question: {args.question} Answer:",
                           return_tensors="pt")
        output = model.generate(**inputs, image_selection=image_selection(args), max_new_tokens=args.max_new_tokens,
                                length_penalty=0.0, **text_generation(args))
        text = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        items.done(index, {"question": args.question, "answer": text},
                   text if len(args.images) == 1 else f"{args.images[index]}: {text}")

    items.each_index(answer, list(images))
    items.finish(single_as_object=True)



RUNNERS = {"tokenize": run_tokenize, "caption": run_caption, "vqa": run_vqa}
