"""Crash-safe writes. Folder replacement: a folder written beside its target is swapped in so that, at every instant,
the target path holds either the whole old folder or the whole new one (a `kill -9` in between never leaves it empty
or half written). Files: written to a temporary sibling, flushed and renamed (`write_atomically`).

On Linux the swap is one `renameat2(RENAME_EXCHANGE)` system call. Elsewhere the old folder is first renamed to a
backup sibling and the new one renamed into place; `recover_folder` (called before every replacement and by readers
that want it) moves the backup back if a crash fell between the two renames.

lavit replaces, swaps or deletes only folders it made itself: every folder it makes to swap in carries its marker
file `.lavit_folder.json` (`mark_folder`), and a folder without it (a user's `hub.old/`, `final/`, `out.tmp/`) is
never deleted or renamed: the operation stops with [`NotLavitFolderError`], which says what to do instead. Names
such as `*.old` or `*.tmp` are never taken as proof. The marker of a folder swapped in records each file lavit wrote
with its size and SHA-256, so a file the user added later, or one of lavit's files the user edited since, also stops
the replacement (the error names the files and the fix).

Files written by `write_atomically` get the permissions a plain `open(path, "w")` would give: a new file
`0o666` less the process umask, a replaced file keeps its own mode.
"""

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path

# the marker, its file records and the rule of what is lavit's have one owner, the saving module of the models (every
# save records its files)
from lavit.modeling.saving_lavit import MARKER_FILE, file_record, folder_entries, marker_problem  # noqa: F401
from lavit.modeling.saving_lavit import _begin_saving as _begin_recorded_write
from lavit.modeling.saving_lavit import read_marker as _read_marker
from lavit.modeling.saving_lavit import record_saved_files as _record_written
from lavit.modeling.saving_lavit import written_by_lavit as _written_by_lavit

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two existing paths (Linux `renameat2`); False where the platform cannot."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result != 0:
        errno = ctypes.get_errno()
        logger.debug(f"renameat2 failed ({os.strerror(errno)}): falling back to two renames")
        return False
    return True


class NotLavitFolderError(FileExistsError):
    """A folder lavit would have to replace, rename or delete, but did not make (it has no marker)."""


def mark_folder(folder, kind: str = "folder", files: list[str] | None = None) -> Path:
    """Creates `folder` (and parents) if needed and records in it that lavit made it (`kind`: what it holds;
    `files`: the files lavit wrote in it, recorded with their content ([`file_record`]) so that a file added or
    edited later is not deleted with the folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"made_by": "lavit", "kind": kind, "lavit_version": _version()}
    if files is not None:
        marker["files"] = {name: file_record(folder / name) for name in files}
    write_json_atomically(folder / MARKER_FILE, marker)
    return folder


def changed_files(folder) -> list[str]:
    """The files of the lavit folder `folder` that lavit did not write there, or that changed since it wrote them:
    the one rule of the saves ([`lavit.modeling.saving_lavit.written_by_lavit`]; a folder whose marker lists no
    files vouches for all of them, a stopped save's `"saving"` record for the files it names)."""
    folder = Path(folder)
    return [name for name in _files_in(folder) if not _written_by_lavit(folder, Path(name))]


def _files_in(folder: Path) -> list[str]:
    return [name for name in folder_entries(folder) if Path(name).name != MARKER_FILE]


def _version() -> str:
    try:
        return importlib.metadata.version("lavit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def is_lavit_folder(folder) -> bool:
    """True when `folder` is a real folder (not a link) holding lavit's marker: lavit made it and may replace it."""
    return _read_marker(Path(folder)) is not None


def require_lavit_folder(path, action: str) -> None:
    """Raises [`NotLavitFolderError`] when `path` exists but is not a folder lavit made (`action`: what lavit was
    about to do with it)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    marker = _read_marker(path)
    if marker is None:
        problem = marker_problem(path)
        why = f"its {MARKER_FILE} is not lavit's: {problem}" if problem else f"no {MARKER_FILE} in it"
        raise NotLavitFolderError(
            f"{path} exists and was not made by lavit ({why}), so lavit will not {action} it: "
            f"choose another destination, or move or delete {path} yourself"
        )
    changed = changed_files(path)
    if changed:
        raise NotLavitFolderError(
            f"{path} holds files lavit did not write or that changed since lavit wrote them "
            f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}), so lavit will not {action} it: "
            f"move them out of {path} (or copy the folder elsewhere), or choose another destination"
        )


def backup_path(target) -> Path:
    target = Path(target)
    return target.with_name(target.name + ".old")


def recover_folder(target) -> None:
    """Puts the backup of an interrupted two-rename replacement back in place; removes a leftover backup when the
    target is whole."""
    target, backup = Path(target), backup_path(target)
    if not os.path.lexists(backup) or not is_lavit_folder(backup):
        return  # no backup, or a folder of the user's that happens to have the name: not ours to touch
    if not os.path.lexists(target):
        os.replace(backup, target)
        logger.warning(f"{target}: restored the previous folder (an earlier replacement was interrupted)")
    elif not changed_files(backup):  # a file written or edited there since is the user's: the backup stays
        shutil.rmtree(backup)


def replace_folder(staging, target) -> Path:
    """Moves the complete folder `staging` to `target`, replacing a folder lavit made there (a folder of the user's is
    refused: [`NotLavitFolderError`]); `staging` must be a sibling of `target` (same file system) and gets lavit's
    marker if it has none, so that the next replacement may replace it. Returns `target`."""
    staging, target = Path(staging), Path(target)
    recover_folder(target)
    require_lavit_folder(target, "replace")
    mark_folder(staging, _read_marker(staging).get("kind", "folder") if is_lavit_folder(staging) else "folder",
                files=_files_in(staging))  # what lavit wrote: a file added later keeps the folder from deletion
    if not os.path.lexists(target):
        os.replace(staging, target)
        return target
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now the old folder
        return target
    backup = backup_path(target)
    require_lavit_folder(backup, f"use as the backup of {target} and delete")
    os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup)
    return target


def require_replaceable(target) -> Path:
    """Raises [`NotLavitFolderError`] unless [`replace_folder`] may replace `target` through its staging sibling
    `<target>.tmp` (each absent, or made by lavit); returns the staging path. For commands to call before long work."""
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    require_lavit_folder(target, "replace")
    require_lavit_folder(staging, "empty and reuse")
    return staging


def fresh_staging_folder(target) -> Path:
    """The new, empty sibling folder `<target>.tmp` (marked as lavit's) to write a replacement of `target` into.
    A leftover `<target>.tmp` of an earlier lavit run is removed first; one lavit did not make is refused
    ([`NotLavitFolderError`]), as is a `target` lavit did not make (checked now, before anything is written)."""
    staging = require_replaceable(target)
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    return mark_folder(staging)


def write_atomically(path, write, suffix: str = ".tmp") -> None:
    """
    Calls `write(temporary)` with the path of a new temporary file beside `path` (parent folders are created),
    flushes it to disk, then renames it onto `path`: a crash never leaves half a file at `path`, and a failed write
    removes the temporary file. The temporary name starts with `path`'s name and ends with `suffix`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_file_beside(path, suffix)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _new_file_beside(path: Path, suffix: str) -> str:
    """Creates an empty, new temporary file beside `path` with the mode `open(path, "w")` would give: `0o666` less
    the umask (the kernel applies it, as for any new file), or the mode of the file `path` it will replace."""
    while True:
        temporary = path.with_name(f"{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    if path.is_file():
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
    return str(temporary)


def write_text_atomically(path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through [`write_atomically`]."""
    write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_atomically(path, document, indent: int | None = 2) -> None:
    """Writes `document` as JSON (UTF-8, non-ASCII kept) to `path` through [`write_atomically`]: a crash or a full
    disk leaves the previous file or none, never invalid JSON."""
    write_text_atomically(path, json.dumps(document, indent=indent, ensure_ascii=False) + "\n")


def write_json_recorded(path, document) -> None:
    """[`write_json_atomically`], and where `path` lies in a folder lavit saved or made (the nearest folder above it
    with lavit's marker: a model folder's `lavit_run.json`), records the file in that marker as a save records its
    files (named as under way first, then with its content), so that lavit's later saves and replacements know it
    for lavit's. Every file lavit writes into a lavit folder after its save goes through here."""
    path = Path(path)
    owner = next((folder for folder in (path.parent, *path.parent.parents) if _read_marker(folder) is not None), None)
    if owner is None or path.name == MARKER_FILE:
        write_json_atomically(path, document)
        return
    relative = path.relative_to(owner)
    _begin_recorded_write(owner, [relative])
    write_json_atomically(path, document)
    _record_written(owner, [relative])


PNG_SOFTWARE = "lavit"  # the PNG `Software` text of every image lavit writes: what lets a rerun replace it
PNG_PIXELS_HASH = "lavit:pixels-sha256"  # beside it, the hash of the pixels lavit wrote: an edit loses the licence


class NotLavitFileError(NotLavitFolderError):
    """A file lavit would have to overwrite, but did not write (or one the user changed since)."""


def _pixels_sha256(image) -> str:
    """SHA-256 of a PIL image's mode, size and pixels: what an edit changes, whatever text chunks an editor keeps."""
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def is_lavit_file(path) -> bool:
    """True when `path` is a regular file (not a link) that lavit wrote and nobody changed since: a PNG whose
    `Software` text is lavit's and whose pixels still match the hash lavit wrote into it (an editor that keeps
    the text chunks of a PNG would otherwise pass the user's edit off as lavit's)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or str(image.text.get("Software", "")).split(" ")[0] != PNG_SOFTWARE:
                return False
            return image.text.get(PNG_PIXELS_HASH) == _pixels_sha256(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def require_lavit_file(path, name: str = "the output") -> None:
    """Raises [`NotLavitFileError`] when `path` exists and is not a file lavit wrote (`name`: the argument it
    comes from, for the message)."""
    path = Path(path)
    if os.path.lexists(path) and not is_lavit_file(path):
        raise NotLavitFileError(
            f"{path} ({name}) exists and was not written by lavit (or was changed since), so lavit will not "
            f"overwrite it: choose another {name}, or move or delete {path} yourself"
        )


def save_png_atomically(image, path) -> None:
    """Writes the PIL `image` as a PNG at `path` through [`write_atomically`], with lavit's `Software` text; a file
    at `path` that lavit did not write is refused ([`NotLavitFileError`])."""
    from PIL.PngImagePlugin import PngInfo

    require_lavit_file(path)
    info = PngInfo()
    info.add_text("Software", f"{PNG_SOFTWARE} {_version()}")
    info.add_text(PNG_PIXELS_HASH, _pixels_sha256(image))
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info), suffix=".png")
