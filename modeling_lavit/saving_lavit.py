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

Every save into a folder that holds files is written into a fresh staging folder and then moved into place (a new or
empty folder is written directly: there is nothing to protect, and a killed save leaves nothing beside it), so the
library's own clean-up of old shards never runs in the destination; and lavit never overwrites or removes a file it
did not write there: a destination holding a file the save would replace or remove, which lavit's marker
(`.lavit_folder.json`, shared with `lavit.atomic`) does not record as lavit's own and unchanged, is refused with
[`NotLavitFilesError`] before anything is moved (the folder the object was loaded from excepted: its files are the
object's own). Each save records the files it wrote in the destination's marker.

A destination that contains a source folder, or is a folder of files inside one, is refused with
[`SourceFolderError`]: it would mix the files of two folders (a pipeline saved into its own `language_model/`, a
model saved over the pipeline folder holding it). A new or empty folder inside a source (a `Trainer` checkpoint in
the model's folder) holds none of the source's files and is allowed. Sources that are not local folders (Hub ids) are
not compared.

A save that is stopped (killed, a full disk) leaves a folder of cut or mixed files: each save first records in the
destination's marker that it is under way (`"saving"`: the files it may write or remove, or `"*"` for a folder that
was empty), and clears it once every file is in place. Loading a folder whose marker, or an ancestor's, still says so
is refused with [`UnfinishedSaveError`] (transformers would load the mixed weights without a word); the next save into
it may replace those files, and so completes it.
"""

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def save_beside_sources(save: Callable[[Path], Any], save_directory, sources: list[Path], what: str):
    """Runs `save(folder)` for `save_directory`: directly when it holds no files yet, else through a staging folder
    beside it, then moves the files into place ([`_move_into`]); refuses a destination that lies inside or
    contains a source ([`SourceFolderError`]) or holds files of the user's that the save would replace
    ([`NotLavitFilesError`]). `what` names the object in the message. The parts an object saves with itself (a
    pipeline's model and processor, a processor's image processor) write where the outer save, already checked,
    tells them: its staging folder. Returns what `save` returned, its paths under the staging folder given as the
    paths they were moved to (transformers' processors return the files they wrote)."""
    if getattr(_SAVING, "active", False):
        return save(Path(save_directory))
    _SAVING.active = True
    try:
        return _checked_save(save, save_directory, sources, what)
    finally:
        _SAVING.active = False


def _checked_save(save: Callable[[Path], Any], save_directory, sources: list[Path], what: str):
    target = Path(save_directory).expanduser().resolve()
    for source in sources:
        inside = target != source and target.is_relative_to(source) and target.is_dir() and any(target.iterdir())
        if inside or (target != source and source.is_relative_to(target)):
            relation = "lies inside" if inside else "contains"
            raise SourceFolderError(
                f"save_directory {save_directory} ({target}) {relation} {source}, the folder this {what} was loaded "
                f"from: saving there would mix the files of the two folders; {_where_instead(source, sources)}"
            )
    if target.exists() and not target.is_dir():
        raise NotLavitFilesError(f"save_directory {save_directory} is a file, not a folder: choose a folder")
    if not _holds_files(target):  # nothing there to overwrite, remove or read from: written in place
        target.mkdir(parents=True, exist_ok=True)
        _begin_saving(target, None)
        result = save(target)
        record_saved_files(target, sorted(path.relative_to(target) for path in target.rglob("*")
                                          if path.is_file() and path.name != MARKER_FILE))
        return result
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_INFIX}", dir=target.parent))
    try:
        result = save(staging)
        _move_into(staging, target, save_directory, what, own_files=target in sources)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _moved_paths(result, staging, target)


def _moved_paths(value, staging: Path, target: Path):
    """`value` (a path, or a list or tuple of paths and other values) with every path under `staging` replaced by
    the same path under `target`."""
    if isinstance(value, (list, tuple)):
        return type(value)(_moved_paths(item, staging, target) for item in value)
    if isinstance(value, (str, os.PathLike)) and Path(value).is_relative_to(staging):
        moved = target / Path(value).relative_to(staging)
        return str(moved) if isinstance(value, str) else moved
    return value


def _holds_files(folder: Path) -> bool:
    """True when `folder` holds a file other than lavit's marker (a new or empty folder, such as the staging folder
    of an export, holds none: a save writes into it directly, leaving nothing beside it if it is killed)."""
    return folder.is_dir() and any(path.name != MARKER_FILE for path in folder.rglob("*") if not path.is_dir())


def _where_instead(source: Path, sources: list[Path]) -> str:
    """The fix a refusal names: `source` itself where a save may go there, else (its parts were loaded from folders
    nested in each other, as a folder of lavit <= 0.x holds its decoder in `detokenizer/`) a new folder outside
    them all; never a destination that would be refused in turn."""
    nested = [other for other in dict.fromkeys(sources) if other != source and (other.is_relative_to(source)
                                                                                 or source.is_relative_to(other))]
    if not nested:
        return f"save into {source} itself or into a folder outside it"
    outermost = min([source, *nested], key=lambda folder: len(folder.parts))
    return (f"its parts were loaded from folders nested in each other ({', '.join(map(str, [source, *nested]))}), "
            f"so it cannot be saved in place: save into a new folder outside {outermost}")


def _move_into(staging: Path, target: Path, save_directory, what: str, own_files: bool) -> None:
    """Moves every file of `staging` onto the same path under `target`, then, in each folder where this save wrote
    weights, removes the weight files it did not write (a previous save's shards), and records what it wrote in
    `target`'s marker. Unless `own_files` (`target` is the object's source), a file to be replaced or removed must
    be lavit's ([`written_by_lavit`]), checked for all of them before anything moves."""
    written = sorted(path.relative_to(staging) for path in staging.rglob("*")
                     if path.is_file() and path.name != MARKER_FILE)  # markers are merged, not moved
    stale = sorted({path.relative_to(target) for folder in {relative.parent for relative in written
                                                             if WEIGHT_FILE.match(relative.name)}
                    if (target / folder).is_dir() for path in (target / folder).iterdir()
                    if WEIGHT_FILE.match(path.name) and path.is_file()} - set(written))
    if not own_files:
        theirs = [str(relative) for relative in written + stale
                  if os.path.lexists(target / relative) and not written_by_lavit(target, relative)]
        if theirs:
            raise NotLavitFilesError(
                f"save_directory {save_directory} holds files lavit did not write ({', '.join(theirs[:5])}"
                f"{', ...' if len(theirs) > 5 else ''}) that saving this {what} there would overwrite or remove: "
                f"save into a new or empty folder, or move those files out first"
            )
    _begin_saving(target, written + stale)
    for relative in written:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target / relative)
    for relative in stale:
        (target / relative).unlink()
    record_saved_files(target, written, removed=stale)


class NotLavitFilesError(FileExistsError):
    """`save_pretrained` into a folder holding files lavit did not write that the save would overwrite or remove."""


class UnfinishedSaveError(OSError):
    """Loading a folder a save of lavit was writing when it stopped: its files may be cut short or mix two saves."""


def refuse_unfinished_save(pretrained_model_name_or_path) -> None:
    """Raises [`UnfinishedSaveError`] when `pretrained_model_name_or_path` is a local folder that a save of lavit, or
    a save of a folder holding it (a pipeline's `language_model/`), began and did not finish. Every `from_pretrained`
    of lavit calls it first; a Hub id is not a local folder and is not checked."""
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        return
    folder = Path(pretrained_model_name_or_path).expanduser()
    if not folder.is_dir():
        return
    folder = folder.resolve()
    for candidate in (folder, *folder.parents):
        marker = read_marker(candidate)
        if marker is not None and marker.get("saving"):
            raise UnfinishedSaveError(
                f"{pretrained_model_name_or_path} was being saved when that save stopped ({candidate / MARKER_FILE} "
                f"still says \"saving\"), so its files may be cut short or mix two saves: run the same save into "
                f"{candidate} again to finish it, or load another copy"
            )


# ----------------------------------------------------------------------------------------------- lavit's marker

STAGING_INFIX = ".saving-"  # in the name of the staging folder of a save: `.<destination>.saving-<random>`
MARKER_FILE = ".lavit_folder.json"  # lavit's marker, in every folder it made or saved into; `lavit.atomic` reads it


def file_record(path: Path) -> dict:
    """What identifies the content of the file lavit wrote at `path`: its size and SHA-256, and its modification and
    change times (the times only spare re-hashing a file whose size and times are unchanged; the change time cannot
    be set back by hand, as `touch -r` sets the modification time back)."""
    if path.is_symlink():
        return {"link": os.readlink(path)}
    status = path.stat()
    with open(path, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"size": status.st_size, "sha256": sha256, "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns}


def unchanged(path: Path, record) -> bool:
    """True when the file at `path` still holds what lavit wrote (`record` from [`file_record`]; a marker of lavit
    <= 0.x recorded names only, and its files count as unchanged)."""
    if not isinstance(record, dict):
        return True
    if "link" in record or path.is_symlink():
        return path.is_symlink() and os.readlink(path) == record.get("link")
    status = path.stat()
    if status.st_size != record.get("size"):
        return False
    if (status.st_mtime_ns, status.st_ctime_ns) == (record.get("mtime_ns"), record.get("ctime_ns")):
        return True
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest() == record.get("sha256")


def read_marker(folder: Path) -> dict | None:
    """The content of lavit's marker in `folder` (a real folder, not a link), or None where there is none."""
    marker = folder / MARKER_FILE
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("made_by") == "lavit" else None


def written_by_lavit(target: Path, relative: Path) -> bool:
    """True when the file `target / relative` is lavit's, unchanged: a marker in `target` or in a folder between it
    and the file records it (or vouches for its whole folder: a marker without a file list, of a folder lavit
    made), or names it among the files of a save that did not finish ([`_begin_saving`]: whatever it holds now is
    that save's)."""
    for depth in range(len(relative.parts)):
        folder = target.joinpath(*relative.parts[:depth])
        marker = read_marker(folder)
        if marker is None:
            continue
        recorded, saving = marker.get("files"), marker.get("saving")
        name = str(Path(*relative.parts[depth:]))
        if saving == "*" or (isinstance(saving, list) and name in saving):
            return True
        if recorded is None or (isinstance(recorded, list) and name in recorded):
            return True
        if isinstance(recorded, dict) and name in recorded and unchanged(target / relative, recorded[name]):
            return True
    return False


def _begin_saving(target: Path, names: list[Path] | None) -> None:
    """Records in `target`'s marker, before a save writes, moves or removes anything there, that it is under way and
    which files it may touch (`names`; None: all, `target` held none). A save that stops before
    [`record_saved_files`] leaves the record: loading refuses the folder, and the next save may replace those files.
    A record left by an earlier save that stopped is widened, never narrowed."""
    if _inside_staging(target):
        return
    marker = read_marker(target) or {"made_by": "lavit", "kind": "saved", "lavit_version": _version(), "files": {}}
    before = marker.get("saving")
    if names is None or before == "*":
        marker["saving"] = "*"
    else:
        marker["saving"] = sorted(set(before if isinstance(before, list) else []) | {str(name) for name in names})
    _write_marker(target, marker)


def record_saved_files(target: Path, written: list[Path], removed: list[Path] = ()) -> None:
    """Records in `target`'s marker the files a save wrote there, and that the save finished (a marker without a file
    list vouches for its whole folder already and stays so)."""
    if _inside_staging(target):
        return
    marker = read_marker(target)
    if not written and not removed and not (marker or {}).get("saving"):
        return  # e.g. a process other than the main one of a distributed save
    if marker is None:
        marker = {"made_by": "lavit", "kind": "saved", "lavit_version": _version(), "files": {}}
    marker.pop("saving", None)
    recorded = marker.get("files")
    if recorded is not None:
        if isinstance(recorded, list):  # a marker of lavit <= 0.x: names only
            recorded = dict.fromkeys(recorded)
        for relative in removed:
            recorded.pop(str(relative), None)
        recorded.update({str(relative): file_record(target / relative) for relative in written})
        marker["files"] = recorded
    _write_marker(target, marker)


def _inside_staging(target: Path) -> bool:
    """True for a part saved into the staging folder of a whole (a pipeline's component): the whole records it."""
    return any(part.startswith(".") and STAGING_INFIX in part for part in target.parts)


def _write_marker(target: Path, marker: dict) -> None:
    temporary = target / f"{MARKER_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, target / MARKER_FILE)


def _version() -> str:
    try:
        return importlib.metadata.version("lavit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class SaveBesideSourcesMixin:
    """The first base of every lavit class that saves (models, processors, image processors, the transformers
    pipeline): its `save_pretrained` goes through [`save_beside_sources`], with the folders it and its parts
    (`source_objects`) were loaded from as the sources."""

    def source_objects(self) -> list:
        """The objects whose folders this one was loaded from: itself (a processor adds its tokenizer and image
        processor, a pipeline its model and processor)."""
        return [self]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The library's `from_pretrained`, refusing a local folder a save did not finish ([`UnfinishedSaveError`])."""
        refuse_unfinished_save(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not kwargs.get("is_main_process", True):  # a distributed save writes its files from the main process only
            return self._save_folder(Path(save_directory), *args, **kwargs)
        return save_beside_sources(lambda folder: self._save_folder(folder, *args, **kwargs), save_directory,
                                   loaded_from(*self.source_objects()), type(self).__name__)

    def _save_folder(self, folder, *args, **kwargs):
        """Writes the object's folder at `folder` (the staging folder of the guard): the library's save; a class that
        writes more files there overrides this."""
        return super().save_pretrained(folder, *args, **kwargs)


__all__ = ["MARKER_FILE", "NotLavitFilesError", "SaveBesideSourcesMixin", "SourceFolderError", "UnfinishedSaveError",
           "code_files", "file_record", "loaded_from", "read_marker", "record_saved_files", "refuse_unfinished_save",
           "remember_source", "save_beside_sources", "unchanged", "written_by_lavit"]
