"""What several `lavit` commands share: the help format, the model-folder checks and loaders, image reading.

Light to import (argparse and lavit's path/range declarations): torch, transformers' models, datasets and peft are
imported by the functions that use them, so that building a parser (and `--help`) costs no model import.
"""

import argparse
from pathlib import Path

from lavit.command_inputs import CommandError, load_lavit_model, require_folder


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, once: `(default: X)` is added unless the help already says what the
    default is, and left out for flags whose default is "not given" (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or not action.option_strings or action.required:
            return help_text
        if action.default in (None, False, "", [], argparse.SUPPRESS):
            return help_text
        return f"{help_text} (default: %(default)s)"


def add_command(commands: argparse._SubParsersAction, name: str, help: str, **settings) -> argparse.ArgumentParser:
    """A sub-command `lavit NAME` whose help shows each default once and whose description is its one-line help."""
    return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **settings)


def load_lavit(path: str, flag: str = "--model"):
    require_folder(path, ("lavit",), flag)
    return load_lavit_model(path, flag)


def load_pipeline(path: str):
    """A `LaVITPipeline` folder (or Hub id), or a LaVIT model folder of lavit <= 0.x with its `detokenizer/`."""
    from lavit import LaVITPipeline
    from lavit.modeling.folders_lavit import is_lavit_pipeline_folder

    folder = Path(path).expanduser()
    if folder.is_dir() and not is_lavit_pipeline_folder(folder):
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
