"""The `lavit` command line: one entry point for using, training, converting and publishing LaVIT models.

    lavit demo [--quick]                            build a tiny LaVIT end to end, offline, on this machine
    lavit tokenize IMAGE... --model M [--budget N] [--visualize out.png]
    lavit caption IMAGE... --model M                lavit vqa IMAGE --question Q --model M
    lavit generate "a red bus" -o out.png --model M lavit reconstruct IMAGE -o out.png --model M
    lavit new-language-model LM_DIR --data D        a small LLaMA + BPE tokenizer from your texts (offline stage 2)
    lavit train-tokenizer | train | finetune | preprocess | train-detokenizer ARGS...   (the training stages)
    lavit convert-original SRC DST                  lavit export DST --model M      lavit push REPO_ID --model M
    lavit evaluate BENCHMARK --model M --annotations FILE --images DIR --output OUT   (the paper's benchmarks)
    lavit serve MODEL [--port 8000] [--replicas N]  an OpenAI-compatible server (Ray Serve)

Whatever fails (bad arguments, unreadable files, an error inside a library) ends with one line on stderr and a
non-zero exit status, never a traceback; `LAVIT_DEBUG=1 lavit ...` shows the traceback of an internal error.
tokenize, caption and vqa give the same output for the same input on every run (random draws come from --seed).
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

# each training command is a stage script whose `make_parser(commands)` adds the command under this name
TRAINING_COMMANDS = {
    "train-tokenizer": "lavit.training.stage1_tokenizer",
    "train": "lavit.training.stage2_pretrain",
    "finetune": "lavit.training.finetune",
    "preprocess": "lavit.training.preprocess",
    "train-detokenizer": "lavit.training.stage3_detokenizer",
}
# the model folder each training command reads (the stage's argument) and the kinds of folder it takes
TRAINING_MODEL_ARGUMENTS = {
    "train-tokenizer": ("model", ("lavit_tokenizer",)),
    "train": ("model", ("lavit",)),
    "finetune": ("model", ("lavit",)),
    "preprocess": ("visual_tokenizer", ("lavit_tokenizer", "lavit")),
    "train-detokenizer": ("visual_tokenizer", ("lavit_tokenizer", "lavit")),
}


DEBUG_VARIABLE = "LAVIT_DEBUG"


class CommandError(Exception):
    """A user error: printed as one line."""


def one_line(error: BaseException) -> str:
    """`Type: first line of the message` of an exception, for the one-line error of a failed command."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def at_least(low, kind=int):
    """An argparse type: a finite `kind` (int or float) >= `low`; argparse names the flag in its error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")) or value < low:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'} >= {low}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


POSITIVE, GUIDANCE = at_least(1), at_least(1.0, float)


def build_parser() -> argparse.ArgumentParser:
    from lavit.training.arguments import LaVITArgumentParser

    parser = argparse.ArgumentParser(prog="lavit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # sub-commands are HfArgumentParsers (trl's CLI shape): a training stage adds its own dataclass parser
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=LaVITArgumentParser)
    add_image_parsers(commands)
    add_generation_parsers(commands)
    add_evaluate_parser(commands)
    add_language_model_parser(commands)
    for module_name in TRAINING_COMMANDS.values():
        importlib.import_module(module_name).make_parser(commands)
    add_publishing_parsers(commands)
    importlib.import_module("lavit.serving.command").make_parser(commands)
    return parser


def add_image_parsers(commands) -> None:
    """demo, and the commands that read images: tokenize, caption, vqa."""
    demo = commands.add_parser("demo", help="build a tiny LaVIT end to end, offline (minutes on a CPU)")
    demo.add_argument("--output", default="lavit-demo", help="folder for the runs, images and the Hub folder")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (about a minute; used by CI)")
    demo.add_argument("--model", default=None, help="unused: the demo builds its own model")

    tokenize = commands.add_parser("tokenize", help="visual tokens of images")
    tokenize.add_argument("images", nargs="+", help="image files")
    tokenize.add_argument("--model", required=True, help="a visual tokenizer or LaVIT folder (or Hub id)")
    tokenize.add_argument("--budget", type=POSITIVE, default=None, help="keep at most N tokens per image (top-k)")
    tokenize.add_argument("--visualize", default=None, help="write the kept patches to this PNG (-N per image)")
    add_selection_arguments(tokenize)

    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--model", required=True, help="a LaVIT folder or Hub id")
    caption.add_argument("--prompt", default="", help="text after the image (official: empty)")
    caption.add_argument("--max-new-tokens", type=POSITIVE, default=36)
    caption.add_argument("--num-beams", type=POSITIVE, default=2)
    caption.add_argument("--batch-size", type=POSITIVE, default=8, help="images captioned together (same results)")
    add_selection_arguments(caption, text=True)

    vqa = commands.add_parser("vqa", help="answer a question about an image")
    vqa.add_argument("image", help="an image file")
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--model", required=True, help="a LaVIT folder or Hub id")
    vqa.add_argument("--max-new-tokens", type=POSITIVE, default=10)
    vqa.add_argument("--num-beams", type=POSITIVE, default=5)
    add_selection_arguments(vqa, text=True)


def add_generation_parsers(commands) -> None:
    """The commands that draw images: generate, reconstruct."""
    generate = commands.add_parser("generate", help="text-to-image")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", required=True, help="PNG path (-N suffixes for several images)")
    generate.add_argument("--model", required=True, help="a LaVIT folder with a detokenizer/ (or Hub id)")
    generate.add_argument("--num-images", type=POSITIVE, default=1)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--guidance-scale", type=GUIDANCE, default=4.0, help="LM guidance (official 4.0)")
    generate.add_argument("--decoder-guidance-scale", type=GUIDANCE, default=None, help="pixel decoder guidance")
    generate.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the decoder's)")
    generate.add_argument("--height", type=POSITIVE, default=None)
    generate.add_argument("--width", type=POSITIVE, default=None)

    reconstruct = commands.add_parser("reconstruct", help="image -> visual tokens -> image")
    reconstruct.add_argument("image", help="an image file")
    reconstruct.add_argument("-o", "--output", required=True, help="PNG path")
    reconstruct.add_argument("--model", required=True, help="a LaVIT folder with a detokenizer/ (or Hub id)")
    reconstruct.add_argument("--budget", type=POSITIVE, default=None, help="keep at most N tokens")
    reconstruct.add_argument("--seed", type=int, default=0)
    reconstruct.add_argument("--steps", type=POSITIVE, default=None)


def add_language_model_parser(commands) -> None:
    language_model = commands.add_parser(
        "new-language-model", help="write a small random LLaMA + a BPE tokenizer trained on your texts (stage 2 "
                                   "without the Hub)")
    language_model.add_argument("output", help="folder for the LM and its tokenizer (--language_model of stage 2)")
    language_model.add_argument("--data", default=None, help="image-text data: its captions (and VQA questions and "
                                                             "answers) train the tokenizer")
    language_model.add_argument("--texts", nargs="+", default=[], help="text files (.txt lines, or JSON/CSV/Parquet "
                                                                       "with a 'text' column)")
    language_model.add_argument("--vocab-size", type=int, default=1000, help="the most BPE tokens")
    language_model.add_argument("--hidden-size", type=int, default=64)
    language_model.add_argument("--num-layers", type=int, default=2)
    language_model.add_argument("--num-heads", type=int, default=4)
    language_model.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    language_model.add_argument("--model", default=None, help="unused: the command writes a new model")


def add_publishing_parsers(commands) -> None:
    """convert-original, export, push."""
    convert = commands.add_parser("convert-original", help="an official LaVIT release folder -> a LaVIT Hub folder")
    convert.add_argument("source", help="official release folder (language_model/, visual_tokenizer/, ...)")
    convert.add_argument("destination", help="output folder")
    convert.add_argument("--model", default=None, help="unused: the source is the model")
    convert.add_argument("--pixel-decoder", choices=["highres", "lowres", "none"], default="highres")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    convert.add_argument("--num-heads", type=POSITIVE, default=16,
                         help="attention heads of the ViT, merger and decoder")

    export = commands.add_parser("export", help="write a Hub-ready folder with a model card")
    export.add_argument("destination", help="output folder")
    export.add_argument("--model", required=True, help="a LaVIT model folder")
    export.add_argument("--metadata", default=None, help="JSON file of run metadata for the model card")
    export.add_argument("--repo-id", default=None, help="the Hub id used in the card's examples")
    export.add_argument("--max-shard-size", default="5GB")

    push = commands.add_parser("push", help="upload a model folder to the Hub")
    push.add_argument("repo_id")
    push.add_argument("--model", required=True, help="a LaVIT model folder (exported first when needed)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def add_evaluate_parser(commands) -> None:
    from lavit.evaluation.benchmarks import BENCHMARKS
    from lavit.evaluation.data import FORMATS

    evaluate = commands.add_parser("evaluate", help="zero-shot evaluation on a benchmark (resumable, data-parallel)")
    evaluate.add_argument("benchmark", choices=sorted(BENCHMARKS), help="a paper benchmark, or caption|vqa|"
                          "text-to-image with --format")
    evaluate.add_argument("--model", required=True, help="a LaVIT folder or Hub id")
    evaluate.add_argument("--output", required=True, help="folder for predictions-*.jsonl, images/ and results.json")
    evaluate.add_argument("--format", choices=FORMATS, default=None, help="annotation format (default: the "
                          "benchmark's)")
    evaluate.add_argument("--annotations", default=None, help="annotation JSON (captions, answers or questions)")
    evaluate.add_argument("--questions", default=None, help="VQAv2/OK-VQA questions JSON")
    evaluate.add_argument("--images", default=None, help="image folder (paths in the annotations are relative to it)")
    evaluate.add_argument("--image-pattern", default=None, help="VQAv2 image file name, e.g. "
                          "'COCO_val2014_{image_id:012d}.jpg'")
    evaluate.add_argument("--dataset", default=None, help="a datasets Hub id or folder (--format datasets)")
    evaluate.add_argument("--columns", default=None, help="role=column pairs: id, image, question, answers, "
                          "captions, text")
    evaluate.add_argument("--split", default=None, help="Karpathy split or datasets split (default: the benchmark's)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N samples")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    evaluate.add_argument("--prompt", default="", help="caption: text after the image (official: empty)")
    evaluate.add_argument("--num-beams", type=int, default=None, help="override the official setting")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="override the official setting")
    evaluate.add_argument("--steps", type=int, default=None, help="text-to-image decoder steps (official 50)")
    evaluate.add_argument("--seed", type=int, default=0, help="text-to-image sampling seed")
    evaluate.add_argument("--num-candidates", type=int, default=1, help="text-to-image: images per caption, the "
                          "closest to it under --clip-model kept (official 4)")
    evaluate.add_argument("--fid-features", default=None, help="vision model (path/Hub id) for FID features "
                          "(default: torchmetrics' Inception, needs torch-fidelity)")
    evaluate.add_argument("--clip-model", default=None, help="CLIP model (path/Hub id) for CLIP score")
    evaluate.add_argument("--no-java", action="store_true", help="skip the Java tools (PTB tokenizer, METEOR, SPICE)")
    evaluate.add_argument("--record", action="store_true", help="add the scores to MODEL/lavit_run.json for the "
                          "model card (`lavit export`)")


# ------------------------------------------------------------------------------------------------ helpers


def add_selection_arguments(parser, text: bool = False) -> None:
    """Reproducible outputs: the same input gives the same output on every run unless `--seed` changes."""
    parser.add_argument("--selection", choices=["deterministic", "sample"], default=None,
                        help="patch selection: 'deterministic' (p_keep > threshold) or 'sample' (Bernoulli(p_keep), "
                             "drawn from --seed); default: the tokenizer's own selection_mode")
    if text:
        parser.add_argument("--do-sample", action="store_true", help="sample the text (default: beam search)")
        parser.add_argument("--temperature", type=float, default=1.0, help="with --do-sample")
        parser.add_argument("--top-p", type=float, default=1.0, help="with --do-sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (sampled selection, "
                                                            "--do-sample), fixed per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def image_selection(args) -> dict:
    """The selector options of one image: a generator seeded from `--seed`, so sampling repeats run to run."""
    import torch

    selection = {"generator": torch.Generator().manual_seed(args.seed)}
    if args.selection:
        selection["mode"] = args.selection
    if getattr(args, "budget", None):
        selection["max_tokens"] = args.budget
    return selection


def selection_inputs(model, pixel_values, args) -> dict:
    """The selection arguments of `generate` for a batch of images. A sampled selection is drawn image by image, each
    from its own generator seeded with `--seed`, so an image gets the same tokens alone or in any batch."""
    import torch

    selection = image_selection(args)
    sampled = (args.selection or model.visual_tokenizer.config.selection_mode) == "sample"
    if not sampled or "max_tokens" in selection:
        return {"image_selection": selection}
    keep_masks = [model.visual_tokenizer.tokenize(image[None], **image_selection(args)).keep_mask
                  for image in pixel_values]
    return {"image_keep_mask": torch.cat(keep_masks)}


def text_generation(args) -> dict:
    """`generate` options of caption/VQA: beam search, or sampling with `--do-sample` from a generator seeded with
    `--seed` (every row draws from its own stream, so a row's text does not depend on its batch)."""
    import torch

    if not args.do_sample:
        return {"num_beams": args.num_beams, "do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "num_beams": 1,
            "generator": torch.Generator().manual_seed(args.seed)}


def print_json(document) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


MODEL_KINDS = {"lavit": "a LaVIT model", "lavit_tokenizer": "a LaVIT visual tokenizer",
               "lavit_detokenizer": "a LaVIT pixel decoder (detokenizer)"}


def require_folder(path: str, model_types: tuple[str, ...] = ()) -> None:
    """A path that does not exist must look like a Hub id (`name` or `org/name`); a local folder must hold a
    `config.json` of one of `model_types` (checked before anything is built: a model of the wrong kind would be
    built from default sizes)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise CommandError(f"model folder not found: {path}")
        return
    if not model_types:
        return
    if not (folder / "config.json").is_file():
        raise CommandError(f"{path} is not a model folder (no config.json)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CommandError(f"{folder / 'config.json'} is not a JSON object: {error}") from error
    if model_type not in model_types:
        kind = MODEL_KINDS.get(model_type, f"a model of type {model_type!r}")
        wanted = " or ".join(MODEL_KINDS[name] for name in model_types)
        raise CommandError(f"{path} holds {kind}, but this command needs {wanted} folder")


def load_lavit(path: str):
    from lavit import LaVITForCausalLM, LaVITProcessor

    require_folder(path, ("lavit",))
    return LaVITForCausalLM.from_pretrained(path).eval(), LaVITProcessor.from_pretrained(path)


def open_image(path: str):
    from lavit.processing.image_processing_lavit import to_rgb_image

    return to_rgb_image(path)  # a clear ValueError naming the file when it cannot be read


def numbered(path: str, index: int, count: int) -> Path:
    path = Path(path)
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


# ------------------------------------------------------------------------------------------------ commands


def run_tokenize(args) -> None:
    from lavit.atomic import save_png_atomically
    from lavit.processing.image_processing_lavit import LaVITImageProcessor, draw_kept_patches
    from lavit.training.models import load_visual_tokenizer

    require_folder(args.model, ("lavit_tokenizer", "lavit"))
    images = [open_image(path) for path in args.images]
    tokenizer = load_visual_tokenizer(args.model).eval()
    image_processor = LaVITImageProcessor.from_tokenizer_config(tokenizer.config)
    grid = tokenizer.config.image_size // tokenizer.config.patch_size
    results = []
    for index, (path, image) in enumerate(zip(args.images, images, strict=True)):
        pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
        tokens = tokenizer.tokenize(pixel_values.to(tokenizer.device, tokenizer.dtype), **image_selection(args))
        result = {"image": path, "token_count": int(tokens.token_counts[0]),
                  "num_patches": tokenizer.config.num_patches, "code_ids": tokens.code_ids.tolist()}
        if args.visualize:
            result["visualization"] = str(numbered(args.visualize, index, len(args.images)))
            save_png_atomically(draw_kept_patches(image, tokens.keep_mask[0], grid), result["visualization"])
        results.append(result)
        if not args.json:
            print(f"{path}: {result['token_count']} of {result['num_patches']} tokens, code ids {result['code_ids']}")
            if args.visualize:
                print(f"  kept patches -> {result['visualization']}")
    if args.json:
        print_json(results)


def run_caption(args) -> None:
    images = [open_image(path) for path in args.images]  # every file is read before the model loads
    model, processor = load_lavit(args.model)
    results = []
    for first in range(0, len(images), args.batch_size):
        paths, batch = args.images[first : first + args.batch_size], images[first : first + args.batch_size]
        inputs = processor(images=batch, text=["<image>" + args.prompt] * len(batch), return_tensors="pt")
        output = model.generate(**inputs, **selection_inputs(model, inputs["pixel_values"], args),
                                max_new_tokens=args.max_new_tokens, **text_generation(args))
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for path, text in zip(paths, texts, strict=True):
            results.append({"image": path, "caption": text.strip()})
            if not args.json:
                print(f"{path}: {text.strip()}")
    if args.json:
        print_json(results)


def run_vqa(args) -> None:
    image = open_image(args.image)
    model, processor = load_lavit(args.model)
    inputs = processor(images=[image], text=f"<image>Question: {args.question} Answer:",
                       return_tensors="pt")
    output = model.generate(**inputs, image_selection=image_selection(args), max_new_tokens=args.max_new_tokens,
                            length_penalty=0.0, **text_generation(args))
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    if args.json:
        print_json({"image": args.image, "question": args.question, "answer": answer})
    else:
        print(answer)


def run_new_language_model(args) -> None:
    from lavit.training.language_model import corpus_from_data, write_small_language_model

    if not args.data and not args.texts:
        raise CommandError("give --data (image-text data) and/or --texts (text files): the tokenizer trains on them")
    texts = corpus_from_data(args.data, args.texts)
    folder = write_small_language_model(args.output, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                                        seed=args.seed)
    print(f"{folder}  ({len(texts)} texts; stage 2: --language_model {folder})")


def decoder_settings(args) -> dict:
    settings = {"num_inference_steps": args.steps, "show_progress": True}
    for name in ("height", "width"):
        if getattr(args, name, None):
            settings[name] = getattr(args, name)
    return settings


def run_generate(args) -> None:
    import torch

    from lavit.atomic import save_png_atomically

    model, processor = load_lavit(args.model)
    if not model.can_decode_pixels:
        raise CommandError(f"{args.model} has no pixel decoder (detokenizer/ sub-folder): it cannot draw images")
    images = model.generate_images(
        **processor(text=args.prompt, return_tensors="pt"), num_images_per_prompt=args.num_images,
        guidance_scale=args.guidance_scale, decoder_guidance_scale=args.decoder_guidance_scale,
        generator=torch.Generator().manual_seed(args.seed), **decoder_settings(args),
    )
    for index, image in enumerate(images):
        target = numbered(args.output, index, len(images))
        save_png_atomically(image, target)
        print(f"{target}")


def run_reconstruct(args) -> None:
    import torch

    from lavit.atomic import save_png_atomically

    image = open_image(args.image)
    model, processor = load_lavit(args.model)
    if not model.can_decode_pixels:
        raise CommandError(f"{args.model} has no pixel decoder (detokenizer/ sub-folder)")
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    selection = {"max_tokens": args.budget} if args.budget else {}
    generator = torch.Generator().manual_seed(args.seed)
    image = model.reconstruct(pixel_values, image_selection=selection, generator=generator, **decoder_settings(args))[0]
    save_png_atomically(image, args.output)
    print(args.output)


def run_training(command: str, argv: list[str]) -> None:
    """Runs a training stage with the parser of `python -m lavit.training.<stage>` (flags, or one config file),
    named `lavit COMMAND`; the model folder it reads is checked before anything is built."""
    from lavit.training.arguments import LaVITArgumentParser

    stage = importlib.import_module(TRAINING_COMMANDS[command])
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(parser_class=LaVITArgumentParser)
    arguments = stage.make_parser(commands).parse_args_and_config(argv)
    name, model_types = TRAINING_MODEL_ARGUMENTS[command]
    if getattr(arguments[0], name):
        require_folder(getattr(arguments[0], name), model_types)
    stage.main(*arguments)


def run_convert(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from lavit import LaVITImageProcessor, LaVITProcessor
    from lavit.hub_cards import export_loaded
    from lavit.modeling.convert_original_lavit import convert_release

    source = Path(args.source)
    if not (source / "language_model").is_dir() or not (source / "visual_tokenizer").is_dir():
        raise CommandError(f"{source} is not an official LaVIT release folder (language_model/ and "
                           f"visual_tokenizer/ expected)")
    model, _ = convert_release(
        source, pixel_decoder=None if args.pixel_decoder == "none" else args.pixel_decoder,
        dtype=getattr(torch, args.dtype) if args.dtype else None, vision_num_heads=args.num_heads,
        merger_num_heads=args.num_heads, decoder_num_heads=args.num_heads,
    )
    tokenizer = AutoTokenizer.from_pretrained(source / "language_model")
    codebook_size = model.config.tokenizer_config.codebook_size
    text_tokens = LaVITProcessor.add_image_tokens(tokenizer, codebook_size)
    if text_tokens != model.config.text_vocab_size:
        raise CommandError(f"the release's tokenizer has {text_tokens} text tokens, the LM "
                           f"{model.config.text_vocab_size}")
    processor = LaVITProcessor(LaVITImageProcessor.from_tokenizer_config(model.config.tokenizer_config), tokenizer)
    metadata = {"summary": f"LaVIT converted from the official release `{source.name}` (jy0205/LaVIT) with "
                           f"`lavit convert-original`; every official tensor was mapped or is known to be unused.",
                "training_stages": [{"name": "official training",
                                     "description": "by the LaVIT authors (see the paper); no training here"}]}
    print(export_loaded(model, processor, args.destination, metadata))


def run_export(args) -> None:
    from lavit.hub_cards import export_model

    metadata = None
    if args.metadata:
        try:
            metadata = json.loads(Path(args.metadata).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CommandError(f"cannot read metadata file {args.metadata!r}: {error}") from error
        if not isinstance(metadata, dict):
            raise CommandError(f"metadata file {args.metadata!r} must hold a JSON object ({{\"summary\": ...}}), "
                               f"got a {type(metadata).__name__}")
    require_folder(args.model, ("lavit",))
    print(export_model(args.model, args.destination, metadata, args.repo_id, args.max_shard_size))


def run_push(args) -> None:
    from lavit.hub_cards import check_export_folder, export_model, push_to_hub

    require_folder(args.model, ("lavit",))
    folder = Path(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            check_export_folder(folder)
        except ValueError:
            folder = export_model(folder, Path(scratch) / "export", repo_id=args.repo_id)
        print(push_to_hub(folder, args.repo_id, token=args.token, private=args.private))


def evaluation_config(args, task_benchmark):
    from lavit.evaluation import EvalConfig

    overrides = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    if task_benchmark.task == "text-to-image":
        overrides = {"num_inference_steps": args.steps}
    return EvalConfig(
        task=task_benchmark.task, generation={key: value for key, value in overrides.items() if value is not None},
        prompt=args.prompt, vqa_metric=task_benchmark.vqa_metric, vizwiz_two_stage=task_benchmark.vizwiz_two_stage,
        batch_size=args.batch_size, seed=args.seed, num_candidates=args.num_candidates,
        fid_features=args.fid_features, clip_model=args.clip_model, use_java=False if args.no_java else None,
        name=task_benchmark.name, dataset_type=task_benchmark.dataset_type, split=args.split or task_benchmark.split,
    )


def run_evaluate(args) -> None:
    import torch

    from lavit import LaVITForCausalLM, LaVITProcessor
    from lavit.evaluation import BENCHMARKS, evaluate, load_samples, record_results
    from lavit.evaluation.runner import distributed_state

    benchmark = BENCHMARKS[args.benchmark]
    data_format = args.format or benchmark.format
    if data_format is None:
        raise CommandError(f"benchmark {args.benchmark!r} needs --format")
    if args.record and not Path(args.model).is_dir():
        raise CommandError(f"--record writes into the model folder, but {args.model} is not a local folder")
    config = evaluation_config(args, benchmark)
    samples = load_samples(data_format, args.annotations, args.questions, args.images, config.split, args.dataset,
                           args.columns, args.image_pattern)[: args.limit]
    require_folder(args.model)
    dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    model = LaVITForCausalLM.from_pretrained(args.model, **dtype).eval().to(distributed_state().device)
    results = evaluate(model, LaVITProcessor.from_pretrained(args.model), samples, config, args.output)
    if results is None:  # not the main process
        return
    for name, value in results["metrics"].items():
        print(f"{name}: {value:.2f}")
    for name, reason in results["unavailable"].items():
        print(f"{name}: not computed ({reason})")
    print(Path(args.output) / "results.json")
    if args.record:
        print(record_results(args.model, results))


def run_demo(args) -> None:
    from lavit.demo import run_demo as demo

    demo(Path(args.output), quick=args.quick)


RUNNERS = {"tokenize": run_tokenize, "caption": run_caption, "vqa": run_vqa, "generate": run_generate,
           "reconstruct": run_reconstruct, "convert-original": run_convert, "export": run_export, "push": run_push,
           "demo": run_demo, "evaluate": run_evaluate, "new-language-model": run_new_language_model,
           "serve": lambda args: importlib.import_module("lavit.serving.command").run(args)}


def dashed_flag(arg: str) -> str:
    """`--max_new_tokens[=V]` -> `--max-new-tokens[=V]`: both spellings work, as in accelerate and TRL, and as in the
    training commands (whose dataclass parsers accept both)."""
    if not arg.startswith("--"):
        return arg
    name, separator, value = arg.partition("=")
    return name.replace("_", "-") + separator + value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in TRAINING_COMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        # argparse prints one usage line and exits with 2 on bad arguments
        args = parser.parse_args([dashed_flag(arg) for arg in argv])
        command, rest = args.command, None
    try:
        if rest is not None:
            run_training(command, rest)
        else:
            RUNNERS[command](args)
    except CommandError as error:
        print(f"lavit {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lavit {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # any internal failure: one line, unless LAVIT_DEBUG asks for the traceback
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"lavit {command}: error: {one_line(error)} (set {DEBUG_VARIABLE}=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
