"""The `lavit` command line: one entry point for using, training, converting and publishing LaVIT models.

    lavit demo [--quick]                            build a tiny LaVIT end to end, offline, on this machine
    lavit tokenize IMAGE... --model M [--budget N] [--visualize out.png]
    lavit caption IMAGE... --model M                lavit vqa IMAGE --question Q --model M
    lavit generate "a red bus" -o out.png --model M lavit reconstruct IMAGE -o out.png --model M
    lavit train-tokenizer | train | finetune | preprocess | train-detokenizer ARGS...   (the training stages)
    lavit convert-original SRC DST                  lavit export DST --model M      lavit push REPO_ID --model M

Bad arguments and unreadable files end with one line on stderr and a non-zero exit status, never a traceback.
"""

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

TRAINING_COMMANDS = {
    "train-tokenizer": ("lavit.training.stage1_tokenizer", "stage 1: train the visual tokenizer", "--model"),
    "train": ("lavit.training.stage2_pretrain", "stage 2: unified pretraining", "--model"),
    "finetune": ("lavit.training.finetune", "caption / VQA / chat fine-tuning, full or LoRA", "--model"),
    "preprocess": ("lavit.training.preprocess", "store keep masks and code ids of a dataset", "--visual_tokenizer"),
    "train-detokenizer": ("lavit.training.stage3_detokenizer", "train the pixel detokenizer", "--visual_tokenizer"),
}


class CommandError(Exception):
    """A user error: printed as one line."""


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
    parser = argparse.ArgumentParser(prog="lavit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build a tiny LaVIT end to end, offline (minutes on a CPU)")
    demo.add_argument("--output", default="lavit-demo", help="folder for the runs, images and the Hub folder")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (about a minute; used by CI)")
    demo.add_argument("--model", default=None, help="unused: the demo builds its own model")

    tokenize = commands.add_parser("tokenize", help="visual tokens of images")
    tokenize.add_argument("images", nargs="+", help="image files")
    tokenize.add_argument("--model", required=True, help="a visual tokenizer or LaVIT folder (or Hub id)")
    tokenize.add_argument("--budget", type=POSITIVE, default=None, help="keep at most N tokens per image (top-k)")
    tokenize.add_argument("--visualize", default=None, help="write the kept patches to this PNG (-N per image)")

    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--model", required=True, help="a LaVIT folder or Hub id")
    caption.add_argument("--prompt", default="", help="text after the image (official: empty)")
    caption.add_argument("--max-new-tokens", type=POSITIVE, default=36)
    caption.add_argument("--num-beams", type=POSITIVE, default=2)

    vqa = commands.add_parser("vqa", help="answer a question about an image")
    vqa.add_argument("image", help="an image file")
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--model", required=True, help="a LaVIT folder or Hub id")
    vqa.add_argument("--max-new-tokens", type=POSITIVE, default=10)
    vqa.add_argument("--num-beams", type=POSITIVE, default=5)

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

    for name, (_, description, _) in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=f"{description} (--help lists its flags)", add_help=False)

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
    return parser


# ------------------------------------------------------------------------------------------------ helpers


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
    from lavit.training.preprocess import load_visual_tokenizer

    require_folder(args.model, ("lavit_tokenizer", "lavit"))
    images = [open_image(path) for path in args.images]
    tokenizer = load_visual_tokenizer(args.model).eval()
    selection = {"max_tokens": args.budget} if args.budget else {}
    for index, (path, image) in enumerate(zip(args.images, images, strict=True)):
        tokens = tokenizer.tokenize(tokenizer.image_to_pixel_values(image), **selection)
        print(f"{path}: {int(tokens.token_counts[0])} of {tokenizer.config.num_patches} tokens, "
              f"code ids {tokens.code_ids.tolist()}")
        if args.visualize:
            target = numbered(args.visualize, index, len(args.images))
            tokenizer.visualize(image, target, **selection)
            print(f"  kept patches -> {target}")


def run_caption(args) -> None:
    images = [open_image(path) for path in args.images]  # every file is read before the model loads
    model, processor = load_lavit(args.model)
    for path, image in zip(args.images, images, strict=True):
        inputs = processor(images=[image], text="<image>" + args.prompt, return_tensors="pt")
        output = model.generate(**inputs, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                do_sample=False)
        text = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        print(f"{path}: {text.strip()}")


def run_vqa(args) -> None:
    image = open_image(args.image)
    model, processor = load_lavit(args.model)
    inputs = processor(images=[image], text=f"<image>Question: {args.question} Answer:",
                       return_tensors="pt")
    output = model.generate(**inputs, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                            length_penalty=0.0, do_sample=False)
    print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())


def decoder_settings(args) -> dict:
    settings = {"num_inference_steps": args.steps, "show_progress": True}
    for name in ("height", "width"):
        if getattr(args, name, None):
            settings[name] = getattr(args, name)
    return settings


def run_generate(args) -> None:
    import torch

    from lavit.modeling.modeling_lavit_tokenizer import save_png_atomically

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

    from lavit.modeling.modeling_lavit_tokenizer import save_png_atomically

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


# the kinds of model folder each training command's model argument takes
TRAINING_MODEL_TYPES = {"train-tokenizer": ("lavit_tokenizer",), "train": ("lavit",), "finetune": ("lavit",),
                        "preprocess": ("lavit_tokenizer", "lavit"), "train-detokenizer": ("lavit_tokenizer", "lavit")}


def run_training(command: str, argv: list[str]) -> None:
    module_name, _, model_flag = TRAINING_COMMANDS[command]
    # every command takes --model; a stage whose model argument has another name gets it under that name
    argv = [model_flag if arg == "--model" else arg.replace("--model=", f"{model_flag}=", 1) for arg in argv]
    for index, arg in enumerate(argv):
        value = argv[index + 1] if arg == model_flag and index + 1 < len(argv) else arg.partition("=")[2] \
            if arg.startswith(f"{model_flag}=") else None
        if value:
            require_folder(value, TRAINING_MODEL_TYPES[command])
    sys.argv[0] = f"lavit {command}"
    importlib.import_module(module_name).main(argv)


def run_convert(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor
    from lavit.hub_cards import export_loaded

    source = Path(args.source)
    if not (source / "language_model").is_dir() or not (source / "visual_tokenizer").is_dir():
        raise CommandError(f"{source} is not an official LaVIT release folder (language_model/ and "
                           f"visual_tokenizer/ expected)")
    model = LaVITForCausalLM.from_original(
        source, pixel_decoder=None if args.pixel_decoder == "none" else args.pixel_decoder,
        dtype=getattr(torch, args.dtype) if args.dtype else None, vision_num_heads=args.num_heads,
        merger_num_heads=args.num_heads, decoder_num_heads=args.num_heads,
    )
    tokenizer = AutoTokenizer.from_pretrained(source / "language_model")
    if LaVITProcessor.add_image_tokens(tokenizer) != model.config.text_vocab_size:
        raise CommandError(f"the release's tokenizer has {len(tokenizer) - 2} text tokens, the LM "
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


def run_demo(args) -> None:
    from lavit.demo import run_demo as demo

    demo(Path(args.output), quick=args.quick)


RUNNERS = {"tokenize": run_tokenize, "caption": run_caption, "vqa": run_vqa, "generate": run_generate,
           "reconstruct": run_reconstruct, "convert-original": run_convert, "export": run_export, "push": run_push,
           "demo": run_demo}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in TRAINING_COMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        args = parser.parse_args(argv)  # argparse prints one usage line and exits with 2 on bad arguments
        command, rest = args.command, None
    try:
        if rest is not None:
            run_training(command, rest)
        else:
            RUNNERS[command](args)
    except CommandError as error:
        print(f"lavit {command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError, KeyError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"lavit {command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lavit {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
