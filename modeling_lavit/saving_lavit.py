"""Where a LaVIT object may be saved, relative to the folders it was loaded from (every `save_pretrained` lavit
defines goes through [`save_beside_sources`]).

transformers and diffusers let `obj.save_pretrained(folder)` write into the very folder `obj` was loaded from (a
notebook adds tokens and saves back), and users rely on it, so it stays allowed; but the files written there are the
files the object may still be reading: safetensors are memory-mapped when loaded, a disk-offloaded model reads its
weights from them while it saves, and a save that shards differently writes a new `model-00001-of-00003` over an old
shard that still holds tensors of a later one. Such a save is written into a staging folder beside the source first,
then each file is moved into place (`os.replace`: whoever still maps an old file keeps reading the old content, no
file is ever half written), and the weight files of the previous save that the new one does not have are removed,
as the library's own save removes them (a stale `model.safetensors` beside a new shard index would be loaded instead
of it).

A destination that contains a source folder, or is a folder of files inside one, is refused with
[`SourceFolderError`]: it would mix the files of two folders (a pipeline saved into its own `language_model/`, a
model saved over the pipeline folder holding it). A new or empty folder inside a source (a `Trainer` checkpoint in
the model's folder) holds none of the source's files and is allowed. Sources that are not local folders (Hub ids) are
not compared.
"""

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

# a relative import (`from .x import`): what ties the code files of a Hub folder together, as transformers' and
# diffusers' remote-code loaders read them
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)
# the weight files a save writes and the library's own save removes when it shards differently
WEIGHT_FILE = re.compile(r"^(model|diffusion_pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|safetensors\.index\.json)$")


def code_files(*module_files: Path) -> list[Path]:
    """
    The code files a Hub folder needs for the classes of `module_files`: each file and every file it imports
    relatively (`from .x import`), transitively, from the same package folder; sorted by name. The one answer to
    "which `.py` files does a folder hold": `LaVITPipeline.save_pretrained` copies them, `hub_cards.export` checks
    them, and transformers' own save (`custom_object_save`) follows the same imports.
    """
    found: dict[str, Path] = {}
    pending = [Path(path) for path in module_files]
    while pending:
        path = pending.pop()
        if path.name in found:
            continue
        found[path.name] = path
        pending += [path.parent / f"{name}.py" for name in RELATIVE_IMPORT.findall(path.read_text())]
    return [found[name] for name in sorted(found)]


class SourceFolderError(ValueError):
    """`save_pretrained` into a folder that lies inside, or contains, a folder the object was loaded from."""


SOURCE_ATTRIBUTE = "_lavit_loaded_from"  # where an object that records no path of its own (an image processor) was read


def remember_source(obj, pretrained_model_name_or_path):
    """Records on `obj` the folder it was loaded from, for objects whose library keeps no `name_or_path` (image
    processors); returns `obj`. A `from_pretrained(..., return_unused_kwargs=True)` tuple is handled."""
    target = obj[0] if isinstance(obj, tuple) else obj
    setattr(target, SOURCE_ATTRIBUTE, str(pretrained_model_name_or_path))
    return obj


def loaded_from(*objects) -> list[Path]:
    """The local folders `objects` (models, pipelines, processors, tokenizers) were loaded from: their
    `name_or_path`, `config._name_or_path` or recorded source ([`remember_source`]), kept where it is an existing
    folder."""
    folders = []
    for obj in objects:
        config = getattr(obj, "config", None)
        for value in (getattr(obj, "name_or_path", None), getattr(config, "_name_or_path", None),
                      getattr(obj, SOURCE_ATTRIBUTE, None)):
            if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).expanduser().is_dir():
                folders.append(Path(value).expanduser().resolve())
    return folders


_SAVING = threading.local()  # set while a save checked by `save_beside_sources` runs


def save_beside_sources(save: Callable[[Path], None], save_directory, sources: list[Path], what: str) -> None:
    """Runs `save(folder)` for `save_directory`: directly, or through a staging folder when `save_directory` is one
    of `sources`; refuses one that lies inside or contains a source ([`SourceFolderError`]). `what` names the
    object in the message. The parts an object saves with itself (a pipeline's model and processor, a processor's
    image processor) write where the outer save, already checked, tells them."""
    if getattr(_SAVING, "active", False):
        save(Path(save_directory))
        return
    _SAVING.active = True
    try:
        _checked_save(save, save_directory, sources, what)
    finally:
        _SAVING.active = False


def _checked_save(save: Callable[[Path], None], save_directory, sources: list[Path], what: str) -> None:
    target = Path(save_directory).expanduser().resolve()
    for source in sources:
        inside = target != source and target.is_relative_to(source) and target.is_dir() and any(target.iterdir())
        if inside or (target != source and source.is_relative_to(target)):
            relation = "lies inside" if inside else "contains"
            raise SourceFolderError(
                f"save_directory {save_directory} ({target}) {relation} {source}, the folder this {what} was loaded "
                f"from: saving there would mix the files of the two folders; save into {source} itself or into a "
                f"folder outside it"
            )
    if target not in sources:
        save(Path(save_directory))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        save(staging)
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, target: Path) -> None:
    """Moves every file of `staging` onto the same path under `target`, then, in each folder where this save wrote
    weights, removes the weight files it did not write (a previous save's shards)."""
    written = sorted(path.relative_to(staging) for path in staging.rglob("*") if path.is_file())
    for relative in written:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target / relative)
    for folder in {relative.parent for relative in written if WEIGHT_FILE.match(relative.name)}:
        for stale in (target / folder).iterdir():
            if WEIGHT_FILE.match(stale.name) and stale.is_file() and stale.relative_to(target) not in written:
                stale.unlink()





class SaveBesideSourcesMixin:
    """The first base of every lavit class that saves (models, processors, image processors, the transformers
    pipeline): its `save_pretrained` goes through [`save_beside_sources`], with the folders it and its parts
    (`source_objects`) were loaded from as the sources."""

    def source_objects(self) -> list:
        """The objects whose folders this one was loaded from: itself (a processor adds its tokenizer and image
        processor, a pipeline its model and processor)."""
        return [self]

    def save_pretrained(self, save_directory, *args, **kwargs):
        parent = super()
        save_beside_sources(lambda folder: parent.save_pretrained(folder, *args, **kwargs), save_directory,
                            loaded_from(*self.source_objects()), type(self).__name__)

__all__ = ["SaveBesideSourcesMixin", "SourceFolderError", "code_files", "loaded_from", "remember_source",
           "save_beside_sources"]
