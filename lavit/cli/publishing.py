"""`lavit convert-original`, `lavit export` and `lavit push`: Hub folders with model cards (`lavit.hub_cards`)."""

import json
import tempfile
from pathlib import Path

from lavit.atomic import require_replaceable
from lavit.command_inputs import CommandError, load_lavit_model, require_folder, resolve_model_folder
from lavit.modeling.saving_lavit import loads_json
from lavit.modeling.validation_lavit import POSITIVE_INT
from lavit.paths import InputPath, OutputPath

from .common import add_command


def add_parsers(commands) -> None:
    convert = add_command(commands, "convert-original", "an official LaVIT release folder -> a LaVIT Hub folder")
    convert.add_argument("source", type=InputPath,
                         help="official release folder (language_model/, visual_tokenizer/, ...)")
    convert.add_argument("destination", type=OutputPath, help="output folder")
    convert.add_argument("--pixel-decoder", choices=["highres", "lowres", "none"], default="highres",
                         help="which of the release's pixel decoders the folder gets ('none': the LM only)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="weights' dtype (default: the release's)")
    convert.add_argument("--num-heads", type=POSITIVE_INT, default=16,
                         help="attention heads of the ViT, merger and decoder")

    export = add_command(commands, "export", "write a Hub-ready folder with a model card")
    export.add_argument("destination", type=OutputPath, help="output folder")
    export.add_argument("--model", type=InputPath, required=True, help="a LaVIT model folder")
    export.add_argument("--metadata", type=InputPath, default=None, help="JSON file of run metadata for the model card")
    export.add_argument("--repo-id", default=None, help="the Hub id used in the card's examples")
    export.add_argument("--max-shard-size", default="5GB", help="the largest safetensors file")

    push = add_command(commands, "push", "upload a model folder to the Hub")
    push.add_argument("repo_id", help="the Hub repository, e.g. org/name")
    push.add_argument("--model", type=InputPath, required=True,
                      help="a LaVIT model folder (exported first when needed)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def run_convert(args) -> None:
    from lavit.hub_cards import export_loaded
    from lavit.hub_cards.convert import convert_release_folder

    require_replaceable(args.destination)  # refused before the conversion, not after it
    try:
        model, processor, pipeline, metadata = convert_release_folder(
            args.source, None if args.pixel_decoder == "none" else args.pixel_decoder, args.dtype, args.num_heads)
    except ValueError as error:  # a folder that is not a release, or a release that does not fit together
        raise CommandError(str(error)) from error
    # with the release's pixel decoder, the folder is a LaVITPipeline's (the language model is one of its components)
    print(export_loaded(model, processor, args.destination, metadata, pipeline=pipeline))


def run_export(args) -> None:
    from lavit.hub_cards import export_model
    from lavit.modeling.folders_lavit import is_lavit_pipeline_folder

    metadata = None
    if args.metadata:
        try:
            metadata = loads_json(Path(args.metadata).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CommandError(f"cannot read metadata file {args.metadata!r}: {error}") from error
        if not isinstance(metadata, dict):
            raise CommandError(f"metadata file {args.metadata!r} must hold a JSON object ({{\"summary\": ...}}), "
                               f"got a {type(metadata).__name__}")
    if not is_lavit_pipeline_folder(args.model):
        require_folder(args.model, ("lavit",))
        if resolve_model_folder(args.model)[1] is not None:  # a PEFT adapter folder: the merged model is exported
            from lavit.hub_cards import export_loaded

            print(export_loaded(*load_lavit_model(args.model), args.destination, metadata, args.repo_id,
                                args.max_shard_size))
            return
    print(export_model(args.model, args.destination, metadata, args.repo_id, args.max_shard_size))


def run_push(args) -> None:
    from lavit.hub_cards import check_export_folder, export_loaded, export_model, push_to_hub
    from lavit.modeling.folders_lavit import is_lavit_pipeline_folder

    if not is_lavit_pipeline_folder(args.model):
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


RUNNERS = {"convert-original": run_convert, "export": run_export, "push": run_push}
