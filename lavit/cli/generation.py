"""`lavit generate` (text-to-image) and `lavit reconstruct` (image -> visual tokens -> image): the commands that
draw images with a `LaVITPipeline`."""

from lavit.command_inputs import PerItem
from lavit.modeling.validation_lavit import GUIDANCE_SCALE, POSITIVE_INT, SEED
from lavit.paths import InputPath, OutputFile, numbered_output

from .common import add_command, load_pipeline, open_image


def add_parsers(commands) -> None:
    generate = add_command(commands, "generate", "text-to-image")
    generate.add_argument("prompts", nargs="+", help="one or more prompts")
    generate.add_argument("-o", "--output", type=OutputFile, required=True,
                          help="PNG path (-N suffixes for several images)")
    generate.add_argument("--model", type=InputPath, required=True, help="a LaVITPipeline folder (or Hub id)")
    generate.add_argument("--num-images", type=POSITIVE_INT, default=1, help="images per prompt")
    generate.add_argument("--seed", type=SEED, default=0, help="seed of the image generator")
    generate.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=4.0, help="LM guidance (official 4.0)")
    add_decoder_arguments(generate)

    reconstruct = add_command(commands, "reconstruct", "image -> visual tokens -> image")
    reconstruct.add_argument("images", type=InputPath, nargs="+", help="image files")
    reconstruct.add_argument("-o", "--output", type=OutputFile, required=True,
                             help="PNG path (-N suffixes for several images)")
    reconstruct.add_argument("--model", type=InputPath, required=True, help="a LaVITPipeline folder (or Hub id)")
    reconstruct.add_argument("--budget", type=POSITIVE_INT, default=None,
                             help="keep at most N tokens (default: the selector's own count)")
    reconstruct.add_argument("--seed", type=SEED, default=0, help="seed of the selection and the decoder's noise")
    reconstruct.add_argument("--steps", type=POSITIVE_INT, default=None,
                             help="denoising steps (default: the decoder's)")


def add_decoder_arguments(parser) -> None:
    parser.add_argument("--decoder-guidance-scale", type=GUIDANCE_SCALE, default=None,
                        help="pixel decoder guidance (default: the decoder's)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=None, help="denoising steps (default: the decoder's)")
    parser.add_argument("--height", type=POSITIVE_INT, default=None, help="image height (default: the decoder's)")
    parser.add_argument("--width", type=POSITIVE_INT, default=None, help="image width (default: the decoder's)")


# every file argument of a command (see `images.FILE_OUTPUTS`)
FILE_OUTPUTS = {
    "generate": lambda args: ("--output", args.output, len(args.prompts) * args.num_images, {"--model": args.model}),
    "reconstruct": lambda args: ("--output", args.output, len(args.images), {"images": args.images,
                                                                              "--model": args.model}),
}


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
        targets = [numbered_output(args.output, index * args.num_images + number, total)
                   for number in range(len(images))]
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
        target = numbered_output(args.output, index, len(args.images))
        save_png_atomically(image, target)
        items.done(index, {"output": str(target)}, str(target))

    items.each_index(reconstruct, list(images))
    items.finish()


RUNNERS = {"generate": run_generate, "reconstruct": run_reconstruct}
