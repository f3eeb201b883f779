"""Crash-safe writes. Folder replacement: a folder written beside its target is swapped in so that, at every instant,
the target path holds either the whole old folder or the whole new one (a `kill -9` in between never leaves it empty
or half written). Files: written to a temporary sibling, flushed and renamed (`write_atomically`).

On Linux the swap is one `renameat2(RENAME_EXCHANGE)` system call. Elsewhere the old folder is first renamed to a
backup sibling and the new one renamed into place; `recover_folder` (called before every replacement and by readers
that want it) moves the backup back if a crash fell between the two renames.
"""

import ctypes
import ctypes.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

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


def backup_path(target) -> Path:
    target = Path(target)
    return target.with_name(target.name + ".old")


def recover_folder(target) -> None:
    """Puts the backup of an interrupted two-rename replacement back in place; removes a leftover backup when the
    target is whole."""
    target, backup = Path(target), backup_path(target)
    if backup.exists() and not target.exists():
        os.replace(backup, target)
        logger.warning(f"{target}: restored the previous folder (an earlier replacement was interrupted)")
    elif backup.exists():
        shutil.rmtree(backup)


def replace_folder(staging, target) -> Path:
    """Moves the complete folder `staging` to `target`, replacing any folder there; `staging` must be a sibling of
    `target` (same file system). Returns `target`."""
    staging, target = Path(staging), Path(target)
    recover_folder(target)
    if not target.exists():
        os.replace(staging, target)
        return target
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now the old folder
        return target
    backup = backup_path(target)
    os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup)
    return target


def fresh_staging_folder(target) -> Path:
    """The (emptied) sibling folder `<target>.tmp` to write a replacement of `target` into."""
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def write_atomically(path, write, suffix: str = ".tmp") -> None:
    """
    Calls `write(temporary)` with the path of a new temporary file beside `path` (parent folders are created),
    flushes it to disk, then renames it onto `path`: a crash never leaves half a file at `path`, and a failed write
    removes the temporary file. The temporary name starts with `path`'s name and ends with `suffix`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def save_png_atomically(image, path) -> None:
    """Writes the PIL `image` as a PNG at `path` through [`write_atomically`]."""
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"), suffix=".png")
