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

from lavit.atomic import NotLavitFolderError, require_replaceable
from lavit.command_inputs import (
    DEBUG_VARIABLE,
    CommandError,
    PerItem,
    load_lavit_model,
    one_line,
    resolve_model_folder,
)
from lavit.file_kinds import PickledWeightsError, require_safetensors_inputs
from lavit.modeling.validation_lavit import GUIDANCE_SCALE, OPEN_FRACTION, POSITIVE_FLOAT, POSITIVE_INT
from lavit.modeling.validation_lavit import SEED as SEED_RANGE
from lavit.paths import (
    InputPath,
    OutputFile,
    OutputPath,
    PathConflictError,
    check_output_files,
    check_paths,
    numbered_output,
)

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




# every numeric flag's range, declared once (`lavit.modeling.validation_lavit`): its `type=` checks it
POSITIVE, GUIDANCE, SEED = POSITIVE_INT, GUIDANCE_SCALE, SEED_RANGE


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
    demo.add_argument("--output", type=OutputPath, default="lavit-demo",
                      help="folder for the runs, images and the Hub folder")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (about a minute; used by CI)")
    demo.add_argument("--model", type=InputPath, default=None, help="unused: the demo builds its own model")

    tokenize = commands.add_parser("tokenize", help="visual tokens of images")
    tokenize.add_argument("images", type=InputPath, nargs="+", help="image files")
    tokenize.add_argument("--model", type=InputPath, required=True,
                          help="a visual tokenizer or LaVIT folder (or Hub id)")
    tokenize.add_argument("--budget", type=POSITIVE, default=None, help="keep at most N tokens per image (top-k)")
    tokenize.add_argument("--visualize", type=OutputFile, default=None,
                          help="write the kept patches to this PNG (-N per image)")
    add_selection_arguments(tokenize)

    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", type=InputPath, nargs="+", help="image files")
    caption.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    caption.add_argument("--prompt", default="", help="text after the image (official: empty)")
    caption.add_argument("--max-new-tokens", type=POSITIVE, default=36)
    caption.add_argument("--num-beams", type=POSITIVE, default=2)
    caption.add_argument("--batch-size", type=POSITIVE, default=8, help="images captioned together (same results)")
    add_selection_arguments(caption, text=True)

    vqa = commands.add_parser("vqa", help="answer a question about an image")
    vqa.add_argument("images", type=InputPath, nargs="+", help="image files (the same question for each)")
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    vqa.add_argument("--max-new-tokens", type=POSITIVE, default=10)
    vqa.add_argument("--num-beams", type=POSITIVE, default=5)
    add_selection_arguments(vqa, text=True)


def add_generation_parsers(commands) -> None:
    """The commands that draw images: generate, reconstruct."""
    generate = commands.add_parser("generate", help="text-to-image")
    generate.add_argument("prompts", nargs="+", help="one or more prompts")
    generate.add_argument("-o", "--output", type=OutputFile, required=True,
                          help="PNG path (-N suffixes for several images)")
    generate.add_argument("--model", type=InputPath, required=True,
                          help="a LaVITPipeline folder (or Hub id)")
    generate.add_argument("--num-images", type=POSITIVE, default=1)
    generate.add_argument("--seed", type=SEED, default=0)
    generate.add_argument("--guidance-scale", type=GUIDANCE, default=4.0, help="LM guidance (official 4.0)")
    generate.add_argument("--decoder-guidance-scale", type=GUIDANCE, default=None, help="pixel decoder guidance")
    generate.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the decoder's)")
    generate.add_argument("--height", type=POSITIVE, default=None)
    generate.add_argument("--width", type=POSITIVE, default=None)

    reconstruct = commands.add_parser("reconstruct", help="image -> visual tokens -> image")
    reconstruct.add_argument("images", type=InputPath, nargs="+", help="image files")
    reconstruct.add_argument("-o", "--output", type=OutputFile, required=True,
                             help="PNG path (-N suffixes for several images)")
    reconstruct.add_argument("--model", type=InputPath, required=True,
                             help="a LaVITPipeline folder (or Hub id)")
    reconstruct.add_argument("--budget", type=POSITIVE, default=None, help="keep at most N tokens")
    reconstruct.add_argument("--seed", type=SEED, default=0)
    reconstruct.add_argument("--steps", type=POSITIVE, default=None)


def add_language_model_parser(commands) -> None:
    from lavit.training.language_model import SIZE_RANGES

    language_model = commands.add_parser(
        "new-language-model", help="write a small random LLaMA + a BPE tokenizer trained on your texts (stage 2 "
                                   "without the Hub)")
    language_model.add_argument("output", type=OutputPath,
                                help="folder for the LM and its tokenizer (--language_model of stage 2)")
    language_model.add_argument("--data", type=InputPath, default=None,
                                help="image-text data: its captions (and VQA questions and "
                                     "answers) train the tokenizer")
    language_model.add_argument("--texts", type=InputPath, nargs="+", default=[],
                                help="text files (.txt lines, or JSON/CSV/Parquet "
                                     "with a 'text' column)")
    language_model.add_argument("--vocab-size", type=SIZE_RANGES["vocab_size"], default=1000,
                                help="the most BPE tokens")
    language_model.add_argument("--hidden-size", type=SIZE_RANGES["hidden_size"], default=64)
    language_model.add_argument("--num-layers", type=SIZE_RANGES["num_hidden_layers"], default=2)
    language_model.add_argument("--num-heads", type=SIZE_RANGES["num_attention_heads"], default=4)
    language_model.add_argument("--seed", type=SEED, default=0, help="seed of the random weights")
    language_model.add_argument("--model", type=InputPath, default=None, help="unused: the command writes a new model")


def add_publishing_parsers(commands) -> None:
    """convert-original, export, push."""
    convert = commands.add_parser("convert-original", help="an official LaVIT release folder -> a LaVIT Hub folder")
    convert.add_argument("source", type=InputPath,
                         help="official release folder (language_model/, visual_tokenizer/, ...)")
    convert.add_argument("destination", type=OutputPath, help="output folder")
    convert.add_argument("--model", type=InputPath, default=None, help="unused: the source is the model")
    convert.add_argument("--pixel-decoder", choices=["highres", "lowres", "none"], default="highres")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    convert.add_argument("--num-heads", type=POSITIVE, default=16,
                         help="attention heads of the ViT, merger and decoder")

    export = commands.add_parser("export", help="write a Hub-ready folder with a model card")
    export.add_argument("destination", type=OutputPath, help="output folder")
    export.add_argument("--model", type=InputPath, required=True, help="a LaVIT model folder")
    export.add_argument("--metadata", type=InputPath, default=None, help="JSON file of run metadata for the model card")
    export.add_argument("--repo-id", default=None, help="the Hub id used in the card's examples")
    export.add_argument("--max-shard-size", default="5GB")

    push = commands.add_parser("push", help="upload a model folder to the Hub")
    push.add_argument("repo_id")
    push.add_argument("--model", type=InputPath, required=True,
                      help="a LaVIT model folder (exported first when needed)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def add_evaluate_parser(commands) -> None:
    from lavit.evaluation.benchmarks import BENCHMARKS
    from lavit.evaluation.data import FORMATS
    from lavit.evaluation.runner import EvalConfig

    evaluate = commands.add_parser("evaluate", help="zero-shot evaluation on a benchmark (resumable, data-parallel)")
    evaluate.add_argument("benchmark", choices=sorted(BENCHMARKS), help="a paper benchmark, or caption|vqa|"
                          "text-to-image with --format")
    evaluate.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    evaluate.add_argument("--output", type=OutputPath, required=True,
                          help="folder for predictions-*.jsonl, images/ and results.json")
    evaluate.add_argument("--format", choices=FORMATS, default=None, help="annotation format (default: the "
                          "benchmark's)")
    evaluate.add_argument("--annotations", type=InputPath, default=None,
                          help="annotation JSON (captions, answers or questions)")
    evaluate.add_argument("--questions", type=InputPath, default=None, help="VQAv2/OK-VQA questions JSON")
    evaluate.add_argument("--images", type=InputPath, default=None,
                          help="image folder (paths in the annotations are relative to it)")
    evaluate.add_argument("--image-pattern", default=None, help="VQAv2 image file name, e.g. "
                          "'COCO_val2014_{image_id:012d}.jpg'")
    evaluate.add_argument("--dataset", type=InputPath, default=None,
                          help="a datasets Hub id or folder (--format datasets)")
    evaluate.add_argument("--columns", default=None, help="role=column pairs: id, image, question, answers, "
                          "captions, text")
    evaluate.add_argument("--split", default=None, help="Karpathy split or datasets split (default: the benchmark's)")
    evaluate.add_argument("--limit", type=POSITIVE, default=None, help="only the first N samples")
    evaluate.add_argument("--batch-size", type=EvalConfig.field_ranges["batch_size"], default=8)
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    evaluate.add_argument("--prompt", default="", help="caption: text after the image (official: empty)")
    evaluate.add_argument("--num-beams", type=POSITIVE, default=None, help="override the official setting")
    evaluate.add_argument("--max-new-tokens", type=POSITIVE, default=None, help="override the official setting")
    evaluate.add_argument("--steps", type=POSITIVE, default=None, help="text-to-image decoder steps (official 50)")
    evaluate.add_argument("--seed", type=SEED, default=0, help="text-to-image sampling seed")
    evaluate.add_argument("--num-candidates", type=EvalConfig.field_ranges["num_candidates"], default=1,
                          help="text-to-image: images per caption, the closest to it under --clip-model kept "
                          "(official 4)")
    evaluate.add_argument("--fid-features", type=InputPath, default=None,
                          help="vision model (path/Hub id) for FID features "
                               "(default: torchmetrics' Inception, needs torch-fidelity)")
    evaluate.add_argument("--clip-model", type=InputPath, default=None, help="CLIP model (path/Hub id) for CLIP score")
    evaluate.add_argument("--no-java", action="store_true", help="skip the Java tools (PTB tokenizer, METEOR, SPICE)")
    evaluate.add_argument("--allow-unmatched", action="store_true", help="drop (and count) captions of no image "
                          "and answers of no question instead of stopping")
    evaluate.add_argument("--record", action="store_true", help="add the scores to MODEL/lavit_run.json for the "
                          "model card (`lavit export`)")
    evaluate.add_argument("--json", action="store_true", help="print the results (failed samples included) as JSON")


# ------------------------------------------------------------------------------------------------ helpers


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
    folder, adapter = resolve_model_folder(path)
    if folder is None or not model_types:
        return
    if adapter is not None:  # a PEFT adapter: the base model it names must be of the kind
        require_folder(adapter["base_model_name_or_path"], model_types)
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
    require_folder(path, ("lavit",))
    return load_lavit_model(path)


def load_pipeline(path: str):
    """A `LaVITPipeline` folder (or Hub id), or a LaVIT model folder of lavit <= 0.x with its `detokenizer/`."""
    from lavit import LaVITPipeline

    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        require_folder(path, ("lavit",))
        if not (folder / "detokenizer").is_dir():
            raise CommandError(f"{path} is a language model without a pixel decoder: give a LaVITPipeline folder "
                               f"(model_index.json) to draw images")
    else:
        require_folder(path)
    pipe = LaVITPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(desc="denoising")
    return pipe


def open_image(path: str):
    from lavit.processing.image_processing_lavit import to_rgb_image

    return to_rgb_image(path)  # a clear ValueError naming the file when it cannot be read


def numbered(path: str, index: int, count: int) -> Path:
    return numbered_output(path, index, count)


# every file argument (`OutputFile`) of a command -> (its flag, the value, how many files it names, the inputs): all
# of them checked before any work (`lavit.paths.check_output_files`)
FILE_OUTPUTS = {
    "tokenize": lambda args: ("--visualize", args.visualize, len(args.images), {"images": args.images}),
    "generate": lambda args: ("--output", args.output, len(args.prompts) * args.num_images, {"--model": args.model}),
    "reconstruct": lambda args: ("--output", args.output, len(args.images), {"images": args.images,
                                                                              "--model": args.model}),
}


def check_file_outputs(command: str, args) -> None:
    if command in FILE_OUTPUTS:
        name, path, count, inputs = FILE_OUTPUTS[command](args)
        if path:
            check_output_files(path, count, inputs, name)


# ------------------------------------------------------------------------------------------------ commands


def run_tokenize(args) -> None:
    from lavit.atomic import save_png_atomically
    from lavit.command_inputs import load_visual_tokenizer_of
    from lavit.processing.image_processing_lavit import LaVITImageProcessor, draw_kept_patches

    require_folder(args.model, ("lavit_tokenizer", "lavit"))
    items = PerItem("tokenize", "image", args.images, args.json)
    images = items.each(open_image)  # every file is read before the model loads
    if images:
        tokenizer = load_visual_tokenizer_of(args.model).eval()
        image_processor = LaVITImageProcessor.from_tokenizer_config(tokenizer.config)
        grid = tokenizer.config.image_size // tokenizer.config.patch_size

    def tokenize(index):
        pixel_values = image_processor(images=images[index], return_tensors="pt")["pixel_values"]
        tokens = tokenizer.tokenize(pixel_values.to(tokenizer.device, tokenizer.dtype), **image_selection(args))
        result = {"token_count": int(tokens.token_counts[0]), "num_patches": tokenizer.config.num_patches,
                  "code_ids": tokens.code_ids.tolist()}
        text = f"{args.images[index]}: {result['token_count']} of {result['num_patches']} tokens, code ids " \
               f"{result['code_ids']}"
        if args.visualize:
            result["visualization"] = str(numbered(args.visualize, index, len(args.images)))
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


def run_new_language_model(args) -> None:
    from lavit.training.language_model import corpus_from_data, write_small_language_model

    if not args.data and not args.texts:
        raise CommandError("give --data (image-text data) and/or --texts (text files): the tokenizer trains on them")
    items = PerItem("new-language-model", "text_file", args.texts)
    texts = corpus_from_data(args.data) + [text for part in items.each(lambda path: corpus_from_data(None, [path]))
                                           .values() for text in part]
    if not texts:
        items.finish()
        raise CommandError("no texts to train the tokenizer on")
    folder = write_small_language_model(args.output, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                                        seed=args.seed)
    print(f"{folder}  ({len(texts)} texts; stage 2: --language_model {folder})")
    items.finish()


def decoder_settings(args) -> dict:
    settings = {"num_inference_steps": args.steps}
    for name in ("height", "width"):
        if getattr(args, name, None):
            settings[name] = getattr(args, name)
    return settings


def run_generate(args) -> None:
    import torch

    from lavit.atomic import save_png_atomically

    pipe = load_pipeline(args.model)
    items = PerItem("generate", "prompt", args.prompts)
    total = len(args.prompts) * args.num_images

    def draw(index):
        images = pipe(
            args.prompts[index], num_images_per_prompt=args.num_images, token_guidance_scale=args.guidance_scale,
            guidance_scale=args.decoder_guidance_scale, generator=torch.Generator().manual_seed(args.seed),
            **decoder_settings(args),
        ).images
        targets = [numbered(args.output, index * args.num_images + number, total) for number in range(len(images))]
        for image, target in zip(images, targets, strict=True):
            save_png_atomically(image, target)
        items.done(index, {"images": list(map(str, targets))}, "\n".join(map(str, targets)))

    items.each_index(draw, range(len(args.prompts)))
    items.finish()


def run_reconstruct(args) -> None:
    import torch

    from lavit.atomic import save_png_atomically

    items = PerItem("reconstruct", "image", args.images)
    images = items.each(open_image)
    if not images:
        items.finish()
    pipe = load_pipeline(args.model)

    def reconstruct(index):
        selection = {"max_tokens": args.budget} if args.budget else {}
        generator = torch.Generator().manual_seed(args.seed)
        image = pipe.reconstruct([images[index]], image_selection=selection, generator=generator,
                                 **decoder_settings(args)).images[0]
        target = numbered(args.output, index, len(args.images))
        save_png_atomically(image, target)
        items.done(index, {"output": str(target)}, str(target))

    items.each_index(reconstruct, list(images))
    items.finish()


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

    from lavit import LaVITImageProcessor, LaVITPipeline, LaVITProcessor
    from lavit.hub_cards import export_loaded
    from lavit.modeling.convert_original_lavit import convert_release

    require_replaceable(args.destination)  # refused before the conversion, not after it
    source = Path(args.source)
    if not (source / "language_model").is_dir() or not (source / "visual_tokenizer").is_dir():
        raise CommandError(f"{source} is not an official LaVIT release folder (language_model/ and "
                           f"visual_tokenizer/ expected)")
    model, detokenizer = convert_release(
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
    # with the release's pixel decoder, the folder is a LaVITPipeline's (the language model is one of its components)
    pipeline = LaVITPipeline.from_detokenizer(model, processor, detokenizer) if detokenizer is not None else None
    print(export_loaded(model, processor, args.destination, metadata, pipeline=pipeline))


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
    if not (Path(args.model) / "model_index.json").is_file():
        require_folder(args.model, ("lavit",))
        if resolve_model_folder(args.model)[1] is not None:  # a PEFT adapter folder: the merged model is exported
            from lavit.hub_cards import export_loaded

            print(export_loaded(*load_lavit_model(args.model), args.destination, metadata, args.repo_id,
                                args.max_shard_size))
            return
    print(export_model(args.model, args.destination, metadata, args.repo_id, args.max_shard_size))


def run_push(args) -> None:
    from lavit.hub_cards import check_export_folder, export_loaded, export_model, push_to_hub

    if not (Path(args.model) / "model_index.json").is_file():
        require_folder(args.model, ("lavit",))
    folder = Path(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        if resolve_model_folder(args.model)[1] is not None:  # a PEFT adapter folder: the merged model is pushed
            folder = export_loaded(*load_lavit_model(args.model), Path(scratch) / "export", repo_id=args.repo_id)
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

    from lavit.command_inputs import report_failed_samples
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
                           args.columns, args.image_pattern, args.allow_unmatched)[: args.limit]
    require_folder(args.model)
    dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    if config.task == "text-to-image":  # images come from the LaVITPipeline, whose processor it holds
        model = load_pipeline(args.model).to(distributed_state().device, **dtype)
        processor = model.processor
    else:  # a model folder, Hub id or PEFT adapter folder
        model, processor = load_lavit_model(args.model, **dtype)
        model = model.to(distributed_state().device)
    results = evaluate(model, processor, samples, config, args.output)
    if results is None:  # not the main process
        return
    if args.json:
        print_json(results)
    for name, value in ({} if args.json else results["metrics"]).items():
        print(f"{name}: {value:.2f}")
    for name, reason in ({} if args.json else results["unavailable"]).items():
        print(f"{name}: not computed ({reason})")
    print(Path(args.output) / "results.json", file=sys.stderr if args.json else sys.stdout)
    report_failed_samples(results, args.record)  # each bad sample on its own line; exit 1 if any
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
            run_training(command, rest)  # its parser checks the paths (LaVITArgumentParser)
        else:
            check_paths(args)  # no destination is, holds or lies inside an input (lavit.paths)
            check_file_outputs(command, args)  # nor overwrites a file lavit did not write, numbered ones included
            require_safetensors_inputs(args)  # no model folder with pickled weights is loaded (lavit.file_kinds)
            RUNNERS[command](args)
    except (CommandError, PathConflictError, NotLavitFolderError, PickledWeightsError) as error:  # user errors
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
