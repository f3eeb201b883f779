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

Every save is written into a fresh staging folder and then moved into place, file by file (a new or empty folder too:
a library's writer stopped mid-file leaves a temporary file where it writes, which no later save would name), so the
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
destination's marker that it is under way (`"saving"`: the files it may write or remove; `"*"`, all files, in markers
of lavit 0.1 saves into empty folders), and clears it once every file is in place. Loading a folder whose marker, or
an ancestor's, still says so is refused with [`UnfinishedSaveError`] (transformers would load the mixed weights
without a word); the next save into it may replace those files, and so completes it.
"""

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
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


def loads_json(text, **options):
    """The JSON value of `text`, with JSON nested deeper than Python's parser recurses (a hand-made file of 100,000 `[`)
    refused as the `json.JSONDecodeError` of any other bad JSON, not a `RecursionError` past every reader's check.
    `options`: `json.loads`'s (e.g. `object_pairs_hook`)."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than the JSON parser goes", str(text)[:100], 0) from None


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
    """Runs `save(folder)` for `save_directory` through a staging folder beside it, then moves the files into place
    ([`_move_into`]); refuses a destination that lies inside or
    contains a source ([`SourceFolderError`]), whose marker is not of lavit's shape, or that holds files of the
    user's that the save would replace or links it would write through ([`NotLavitFilesError`]). `what` names the
    object in the message. The parts an object saves with itself (a pipeline's model and processor, a processor's
    image processor) write where the outer save, already checked, tells them: its staging folder. Returns what
    `save` returned, its paths under the staging folder given as the paths they were moved to (transformers'
    processors return the files they wrote)."""
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
    require_marker_shape(target, f"save_directory {save_directory}")
    target.mkdir(parents=True, exist_ok=True)
    with _one_save_at_a_time(target):
        _remove_abandoned_staging(target)
        # through a staging folder, an empty destination too: a library's writer leaves temporary files (safetensors'
        # `.tmpXXXXXX`) where it is stopped, and only whole files are ever moved into `target`
        if not _can_stage_beside(target):  # a mount point, or a writable folder in a read-only one
            if _holds_files(target):
                raise NotLavitFilesError(
                    f"save_directory {save_directory} cannot be saved over: the folder around it is read-only or on "
                    f"another file system, so the new files cannot be written beside it first and moved in whole; "
                    f"save into a new or empty folder")
            _begin_saving(target, None)  # empty: written in place, as the library writes
            result = save(target)
            record_saved_files(target, [Path(name) for name in folder_entries(target)
                                        if Path(name).name != MARKER_FILE])
            return result
        staging = _new_staging_folder(target)
        try:
            result = save(staging)
            _move_into(staging, target, save_directory, what, own_files=target in sources)
        finally:
            with _STAGING_LOCK:
                _STAGING_FOLDERS.discard(staging)
            shutil.rmtree(staging, ignore_errors=True)
        return _moved_paths(result, staging, target)


def _can_stage_beside(target: Path) -> bool:
    """Whether a staging folder beside `target` can be made and its files moved into `target` by renames: the parent
    is writable and on `target`'s file system (not so for a mount point, nor a writable volume in a read-only root)."""
    try:
        return os.access(target.parent, os.W_OK) and target.parent.stat().st_dev == target.stat().st_dev
    except OSError:
        return False


@contextlib.contextmanager
def _one_save_at_a_time(target: Path):
    """Holds an exclusive lock on the folder `target` itself (`flock`, POSIX) for one save: two processes saving into
    one new folder wrote in place together and mixed their shards. The second save waits for the first and then
    replaces its files, as a save into a folder of lavit's; a process that dies releases its lock. Where folders
    cannot be locked (Windows, a network file system without `flock`) saves run unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(target, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _moved_paths(value, staging: Path, target: Path):
    """`value` (a path, or a list or tuple of paths and other values) with every path under `staging` replaced by
    the same path under `target`; `value` itself where it names no such path."""
    if isinstance(value, (list, tuple)):
        moved = [_moved_paths(item, staging, target) for item in value]
        return value if all(new is old for new, old in zip(moved, value, strict=True)) else type(value)(moved)
    if isinstance(value, (str, os.PathLike)) and Path(value).is_relative_to(staging):
        moved = target / Path(value).relative_to(staging)
        return str(moved) if isinstance(value, str) else moved
    return value


def folder_entries(folder: Path) -> list[str]:
    """Every entry of `folder` that is not a folder, relative to it, sorted: its files and its links, to files or to
    folders, dangling ones too (a linked folder is listed, never entered: what it holds is not this folder's)."""
    found = []
    for root, folders, files in os.walk(folder):  # followlinks=False: a link to a folder is in `folders`, unentered
        found += [str(Path(root, name).relative_to(folder)) for name in files]
        found += [str(Path(root, name).relative_to(folder)) for name in folders if Path(root, name).is_symlink()]
    return sorted(found)


def _holds_files(folder: Path) -> bool:
    """True when `folder` holds anything but lavit's marker: a file or a link of any kind (a new or empty folder,
    such as the staging folder of an export, holds none: a save writes into it directly, leaving nothing beside it
    if it is killed)."""
    return folder.is_dir() and any(Path(name).name != MARKER_FILE for name in folder_entries(folder))


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
    weights, removes the weight files of the same name family (`model*`, `diffusion_pytorch_model*`) it did not
    write (a previous save's shards), and records what it wrote in `target`'s marker. Nothing is written or removed
    through a link inside `target` (lavit makes none there). A file to be replaced or removed must be lavit's
    ([`written_by_lavit`]); where `target` is the object's source (`own_files`), also one the object was loaded from
    ([`_loaded_from`]), and a stale weight file of the user's is then left in place. Everything is checked before
    anything moves."""
    written = sorted(Path(name) for name in folder_entries(staging)
                     if Path(name).name != MARKER_FILE)  # markers are merged, not moved
    if not written:  # e.g. a process other than the main one of a distributed save: its library wrote nothing
        return
    families = {(relative.parent, WEIGHT_FILE.match(relative.name)[1]) for relative in written
                if WEIGHT_FILE.match(relative.name)}
    weight_folders = {folder for folder, _ in families}
    _refuse_links_on_the_way(target, written, weight_folders, save_directory)
    stale = sorted({path.relative_to(target) for folder in weight_folders if (target / folder).is_dir()
                    for path in (target / folder).iterdir() if (path.is_file() or path.is_symlink()) and
                    WEIGHT_FILE.match(path.name) and (folder, WEIGHT_FILE.match(path.name)[1]) in families}
                   - set(written))
    if own_files:  # the object's own files may be replaced; of the weights, only those it was loaded from
        loaded = _loaded_from(target, families)
        stale = [relative for relative in stale if relative in loaded or written_by_lavit(target, relative)]
        theirs = [str(relative) for relative in written if WEIGHT_FILE.match(relative.name) and
                  os.path.lexists(target / relative) and relative not in loaded and
                  not written_by_lavit(target, relative)]
    else:
        theirs = [str(relative) for relative in written + stale
                  if os.path.lexists(target / relative) and not written_by_lavit(target, relative)]
    if theirs:
        owner = _recording_ancestor(target, Path(theirs[0]))
        if owner is not None:  # lavit's files, of the folder around: a pipeline's `unet/` under the pipeline's marker
            raise NotLavitFilesError(
                f"save_directory {save_directory} holds files of the folder lavit saved at {owner} "
                f"({', '.join(theirs[:5])}{', ...' if len(theirs) > 5 else ''}, recorded by its marker) that saving "
                f"this {what} there would overwrite or remove, breaking that folder: save into a new or empty folder"
            )
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


def _recording_ancestor(target: Path, relative: Path) -> Path | None:
    """The folder above `target` whose marker records `target / relative` as lavit's, or None."""
    for ancestor in target.parents:
        if written_by_lavit(ancestor, (target / relative).relative_to(ancestor)):
            return ancestor
    return None


def _loaded_from(target: Path, families: set[tuple[Path, str]]) -> set[Path]:
    """The weight files of each `(folder, family)` of `target` that a load of the folder reads: the single file
    (`model.safetensors`, which wins over shards), the index, and the shards the index names."""
    loaded = set()
    for folder, family in families:
        loaded.add(folder / f"{family}.safetensors")
        if (target / folder / f"{family}.safetensors").is_file():
            continue  # the single file wins: an index and shards beside it were never read
        loaded.add(folder / f"{family}.safetensors.index.json")
        try:
            weight_map = loads_json((target / folder / f"{family}.safetensors.index.json").read_text())["weight_map"]
            loaded |= {folder / name for name in weight_map.values() if isinstance(name, str)}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no index (a single file), or one that cannot be read: no shard counts as loaded
    return loaded


def _refuse_links_on_the_way(target: Path, written: list[Path], weight_folders: set[Path], save_directory) -> None:
    """Raises [`NotLavitFilesError`] where a folder this save writes into (or removes old shards from) is, inside
    `target`, a link or a file: writing through a link would change the folder it points to (the user's)."""
    for relative in sorted({*(path.parent for path in written), *weight_folders}):
        for depth in range(1, len(relative.parts) + 1):
            path = target.joinpath(*relative.parts[:depth])
            if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
                what = f"a link lavit did not make (to {os.readlink(path)})" if path.is_symlink() else "a file"
                raise NotLavitFilesError(
                    f"save_directory {save_directory} holds {path.relative_to(target)}, {what}, where this save "
                    f"writes a folder: lavit never writes through it; save into a new or empty folder, or replace "
                    f"{path} by a folder of its own first"
                )


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
STAGING_KIND = "staging"  # the "kind" of a staging folder's marker
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
    """The content of lavit's marker in `folder` (a real folder, not a link), or None where there is none or where
    what is there is not of the shape lavit writes ([`marker_problem`]: such a folder is not vouched for by lavit)."""
    return _checked_marker(folder)[0]


def marker_problem(folder: Path) -> str | None:
    """What is wrong with the marker in `folder`, where the marker's path holds something lavit did not write (not
    a file, not JSON, not lavit's shape); None where it is lavit's or absent."""
    return _checked_marker(folder)[1]


def require_marker_shape(folder: Path, what: str) -> None:
    """Raises [`NotLavitFilesError`] (one line: the marker and the fix) where `folder`'s marker is not of lavit's
    shape: a save would rewrite it, and nothing in the folder is vouched for by it. `what` names the folder."""
    problem = marker_problem(folder)
    if problem:
        raise NotLavitFilesError(
            f"{what}: {folder / MARKER_FILE} is not a marker lavit wrote ({problem}), so nothing there is known to be "
            f"lavit's: move {folder / MARKER_FILE} out of the folder (lavit then treats every file there as the "
            f"user's), or save into a new folder"
        )


def _checked_marker(folder: Path) -> tuple[dict | None, str | None]:
    """The one reader of lavit's marker: (its content, None), (None, None) where there is none, (None, the problem)
    where its path holds something not of lavit's shape."""
    marker = Path(folder) / MARKER_FILE
    if Path(folder).is_symlink() or not Path(folder).is_dir() or not os.path.lexists(marker):
        return None, None
    if marker.is_symlink() or not marker.is_file():
        return None, "it is a link or a folder, not a file"
    try:
        content = loads_json(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"it is not JSON: {type(error).__name__}"
    problem = _shape_problem(content)
    return (None, problem) if problem else (content, None)


def _shape_problem(content) -> str | None:
    """Why `content` is not a marker of lavit's shape: `{"made_by": "lavit", "kind": str, "lavit_version": str,
    "files": {name: record} | [name] | absent, "saving": "*" | [name] | absent}`; None when it is."""
    if not isinstance(content, dict) or content.get("made_by") != "lavit":
        return 'it is not a JSON object with "made_by": "lavit"'
    wrong = [key for key in ("kind", "lavit_version", "staging_of") if key in content and
             not isinstance(content[key], str)]
    if wrong:
        return f'"{wrong[0]}" is not a string'
    files, saving = content.get("files"), content.get("saving")
    if not (files is None or isinstance(files, (list, dict))):
        return '"files" is neither an object of file records nor a list of names'
    if not (saving is None or saving == "*" or isinstance(saving, list)):
        return '"saving" is neither "*" nor a list of names'
    names = [*(files or []), *(saving if isinstance(saving, list) else [])]
    bad = [name for name in names if not _is_relative_name(name)]
    if bad:
        return f"it names {bad[0]!r}, not a path inside the folder"
    if isinstance(files, dict) and not all(record is None or _is_file_record(record) for record in files.values()):
        return "a file record is not of the shape lavit writes"
    return None


def _is_relative_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".") and not Path(name).is_absolute()
            and ".." not in Path(name).parts)


def _is_file_record(record) -> bool:
    """A record of [`file_record`]: a link's target, or size, SHA-256 and times."""
    if not isinstance(record, dict):
        return False
    if "link" in record:
        return isinstance(record["link"], str)
    numbers = [record.get(key) for key in ("size", "mtime_ns", "ctime_ns")]
    return all(isinstance(value, int) and not isinstance(value, bool) for value in numbers) and isinstance(
        record.get("sha256"), str)


def written_by_lavit(target: Path, relative: Path) -> bool:
    """True when the file `target / relative` is lavit's, unchanged: a marker in `target` or in a folder between it
    and the file records it (or vouches for its whole folder: a marker without a file list, of a folder lavit
    made), or names it among the files of a save that did not finish ([`_begin_saving`]: whatever it holds now is
    that save's; `"*"`: a save into an empty folder, all its files). The one rule of ownership: `lavit.atomic`
    decides what it may replace with it too."""
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


def _pending(target: Path, marker: dict) -> list[str]:
    """The names a stopped save left unfinished in `target` (the marker's `"saving"`): a `"*"` (a save into an
    empty folder) is the files present that the marker's file record does not hold."""
    saving = marker.get("saving")
    if saving == "*":
        recorded = marker.get("files") or {}
        return [name for name in folder_entries(target) if Path(name).name != MARKER_FILE and name not in recorded]
    return list(saving) if isinstance(saving, list) else []


def _begin_saving(target: Path, names: list[Path] | None) -> None:
    """Records in `target`'s marker, before a save writes, moves or removes anything there, that it is under way and
    which files it may touch (`names`; None: `"*"`, all, `target` held none). A save that stops before
    [`record_saved_files`] leaves the record: loading refuses the folder, and the next save may replace those files.
    The names an earlier save that stopped left are kept beside this save's: each save clears only its own."""
    if _inside_staging(target):
        return
    marker = read_marker(target) or _new_marker()
    if names is None:
        marker["saving"] = "*"
    else:
        marker["saving"] = sorted(set(_pending(target, marker)) | {str(name) for name in names})
    _write_marker(target, marker)


def record_saved_files(target: Path, written: list[Path], removed: list[Path] = ()) -> None:
    """Records in `target`'s marker the files a save wrote there, and that the save finished: its names leave the
    `"saving"` record (and names no longer in the folder); names a stopped save left that this one did not write
    stay, and the folder stays unfinished. A marker without a file list vouches for its whole folder already and
    stays so."""
    if _inside_staging(target):
        return
    marker = read_marker(target)
    if not written and not removed and not (marker or {}).get("saving"):
        return  # e.g. a process other than the main one of a distributed save
    if marker is None:
        marker = _new_marker()
    done = {str(relative) for relative in [*written, *removed]}
    # a "*" at the end of a save is its own (a save into an empty folder): every file there is this save's
    pending = [] if marker.get("saving") == "*" else [
        name for name in _pending(target, marker) if name not in done and os.path.lexists(target / name)]
    marker.pop("saving", None)
    if pending:
        marker["saving"] = pending
    recorded = marker.get("files")
    if recorded is not None:
        if isinstance(recorded, list):  # a marker of lavit <= 0.x: names only
            recorded = dict.fromkeys(recorded)
        for relative in removed:
            recorded.pop(str(relative), None)
        recorded.update({str(relative): file_record(target / relative) for relative in written})
        marker["files"] = recorded
    _write_marker(target, marker)


def _new_marker() -> dict:
    return {"made_by": "lavit", "kind": "saved", "lavit_version": _version(), "files": {}}


# the staging folders this process made and is filling: a save into one of them (a whole's part) is recorded by the
# whole; decided by construction, never by a folder's name (a user's `.backup.saving-2024/` is a folder like any)
_STAGING_FOLDERS: set[Path] = set()
_STAGING_LOCK = threading.Lock()


def _inside_staging(target: Path) -> bool:
    """True for a part saved into a staging folder this process is filling (a pipeline's component): the whole
    records it."""
    target = Path(target).resolve()
    with _STAGING_LOCK:
        return any(target.is_relative_to(staging) for staging in _STAGING_FOLDERS)


def _new_staging_folder(target: Path) -> Path:
    """A new staging folder `.<target name>.saving-<random>` beside `target`, registered as this process's while it
    fills it, holding a marker that says whose staging folder it is and which process made it (so that the next
    save of `target` may remove it once that process is gone: [`_remove_abandoned_staging`])."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_INFIX}", dir=target.parent)).resolve()
    with _STAGING_LOCK:
        _STAGING_FOLDERS.add(staging)
    _write_marker(staging, {"made_by": "lavit", "kind": STAGING_KIND, "lavit_version": _version(),
                            "staging_of": target.name, "process": _this_process()})
    return staging


def _remove_abandoned_staging(target: Path) -> None:
    """Removes the staging folders of `target` that a save stopped (killed) left beside it: only a real folder named
    `.<target name>.saving-*` whose marker lavit wrote says it is a staging folder of `target` and names a process
    that is gone (same machine: no such process, or another started since), or an empty one without a marker (a save
    killed before it wrote one: an empty folder holds nothing to lose). Anything else is never touched; the caller
    holds the lock of `target`, so no live save of it is between making its staging folder and marking it."""
    prefix = f".{target.name}{STAGING_INFIX}"
    if not target.parent.is_dir():
        return
    for candidate in target.parent.iterdir():
        if not candidate.name.startswith(prefix) or candidate.is_symlink() or not candidate.is_dir():
            continue
        marker = read_marker(candidate) or {}
        with _STAGING_LOCK:
            ours = candidate.resolve() in _STAGING_FOLDERS
        if (marker.get("kind") == STAGING_KIND and marker.get("staging_of") == target.name and not ours
                and _process_gone(marker.get("process"))):
            shutil.rmtree(candidate, ignore_errors=True)
        elif not marker and not ours:  # killed before its marker was written: removed only while empty (rmdir)
            with contextlib.suppress(OSError):
                candidate.rmdir()


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> int | None:
    """When process `pid` started (Linux: clock ticks since boot, from /proc); None where it cannot be told."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_gone(process) -> bool:
    """True when the process a staging marker names has provably ended: same machine, and no process of that id, or
    one that started at another time (the id was reused); a process of another machine is never taken for gone."""
    if os.name != "posix" or not isinstance(process, dict) or process.get("host") != socket.gethostname():
        return False  # elsewhere os.kill(pid, 0) is no probe (Windows terminates the process)
    pid, started = process.get("pid"), process.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process: alive
        pass
    now = _process_start(pid)
    return isinstance(started, int) and now is not None and now != started


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
           "code_files", "file_record", "folder_entries", "loaded_from", "marker_problem", "read_marker",
           "record_saved_files", "refuse_unfinished_save", "remember_source", "require_marker_shape",
           "save_beside_sources", "unchanged", "written_by_lavit"]
