"""What a local folder holds, read from its JSON files alone (no model code, no diffusers): whether it is a saved
`LaVITPipeline`, and which LaVIT language model (and processor) it means. Every loader and command asks here, so the
`lavit` command answers without importing the pipeline."""

import os
from pathlib import Path

from .saving_lavit import loads_json

# read here without importing the classes (and transformers, diffusers): `LaVITPipeline`'s name, the `_class_name`
# of its model_index.json, and `LaVITConfig.model_type` (which is this constant)
PIPELINE_CLASS = "LaVITPipeline"
LANGUAGE_MODEL_TYPE = "lavit"
# the files a saved processor (or its image processor, which a LaVIT processor folder always has) writes
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_lavit_pipeline_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a saved [`LaVITPipeline`]: a `model_index.json` naming the class (another diffusers
    pipeline's folder, with a LaVIT model saved in it, is not one)."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = loads_json(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return (class_name[-1] if isinstance(class_name, list) and class_name else class_name) == PIPELINE_CLASS


def language_model_folders(folder: str | os.PathLike, with_processor: bool = True) -> tuple[Path, Path] | None:
    """
    `(model folder, processor folder)` of the LaVIT language model a local `folder` holds, the one answer to "which
    language model does this folder mean" for every loader: a `LaVITPipeline` folder (its `language_model/` and
    `processor/`), the `language_model/` sub-folder of one (the processor beside it), or a model folder (itself:
    its processor files lie with the model's). None for a folder that holds no LaVIT language model.
    `with_processor`: the processor folder must hold a saved processor (the caller loads it).

    Raises:
        ValueError: a pipeline folder that holds a decoder alone (no language model), or whose language model has no
            processor to read prompts with; the message names the fix.
    """
    folder = Path(folder).expanduser()
    pipeline = folder if is_lavit_pipeline_folder(folder) else None
    real = folder.resolve()  # a link to a pipeline's `language_model/` means that sub-folder, whatever its own name
    if pipeline is None and real.name == "language_model" and is_lavit_pipeline_folder(real.parent):
        pipeline = real.parent
    if pipeline is not None:
        model_folder, processor_folder = pipeline / "language_model", pipeline / "processor"
        if not (model_folder / "config.json").is_file():
            raise ValueError(f"{pipeline} is a LaVITPipeline folder without a language model (a pixel decoder "
                             f"alone): give the folder of a LaVIT model, or a pipeline that holds one")
    elif (saved_config(folder) or {}).get("model_type") == LANGUAGE_MODEL_TYPE:
        model_folder = processor_folder = folder
    else:
        return None
    if with_processor and not any((processor_folder / name).is_file() for name in PROCESSOR_FILES):
        raise ValueError(f"{processor_folder} holds no processor ({' or '.join(PROCESSOR_FILES)}) for the language "
                         f"model of {folder}: save the model's LaVITProcessor there "
                         f"(processor.save_pretrained({str(processor_folder)!r}))")
    return model_folder, processor_folder


def saved_config(folder: str | os.PathLike) -> dict | None:
    """The JSON object of a local folder's config.json; None where it has none, or one that cannot be read as a JSON
    object (a Hub id names no local folder): the caller's loader then says what is wrong."""
    config_file = Path(folder) / "config.json"
    try:
        config = loads_json(config_file.read_text()) if config_file.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


__all__ = ["LANGUAGE_MODEL_TYPE", "PIPELINE_CLASS", "PROCESSOR_FILES", "is_lavit_pipeline_folder",
           "language_model_folders", "saved_config"]
