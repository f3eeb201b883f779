"""Outputs that resume are tied to what produced them, and have one writer at a time.

A resumable output (evaluation predictions, training checkpoints) is a folder a later run continues instead of
redoing. Continuing is right only when the later run would have produced the same thing: the same model, the same
settings, the same data. [`ResumableOutput`] guards such a folder:

- it records a fingerprint of what makes the output (`lavit_resume.json`: the model's identity, the settings, the
  data) when the folder is first written, and refuses, with one line naming what differs and how to start fresh
  (another output folder), any later run whose fingerprint differs;
- it holds a lock (`.lavit.lock`, an OS file lock through `filelock`, with the owner's pid and host written beside
  it) while the run writes; a second writer is refused at once with the owner named. The OS releases the lock when
  its process dies, so a lock left by a killed run is never stale;
- a folder that holds resumable content but no fingerprint (written before fingerprints existed, or by hand) is
  refused too: lavit cannot tell what made it.

Every writer registers its kind in [`RESUMABLE_OUTPUTS`] (`register_resumable_output`), so tests enumerate them.
Model identities (`model_fingerprint`, `folder_fingerprint`) hash content, not names: a model retrained into the
same folder is another model.
"""

import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from lavit.atomic import NotLavitFileError, write_atomically
from lavit.modeling.saving_lavit import loads_json

FINGERPRINT_FILE = "lavit_resume.json"
FRESH_START_KEY = "fresh_start_ns"  # when a run last started over in the folder (not part of the fingerprint)
LOCK_FILE = ".lavit.lock"
OWNER_FILE = ".lavit.lock.owner"
SAMPLED_VALUES = 4096  # values hashed per tensor: enough to see any training step, cheap for 7B models
SAMPLED_CHUNKS = 16  # chunks of each weights file hashed by `folder_fingerprint`
CHUNK_BYTES = 1 << 16

RESUMABLE_OUTPUTS: dict[str, str] = {}
OUTPUT_FILES: dict[str, tuple[str, ...]] = {}  # kind -> the files of fixed names its writer puts in the folder


def register_resumable_output(kind: str, description: str, files: tuple[str, ...] = ()) -> str:
    """Declares a kind of resumable output (one per writer) and the `files` of fixed names its writer writes or
    appends to in the folder (`results.json`, `logs.jsonl`); returns `kind`."""
    RESUMABLE_OUTPUTS[kind] = description
    OUTPUT_FILES[kind] = tuple(files)
    return kind


class ResumeMismatchError(ValueError):
    """The output folder was made by another model, other settings or other data."""


class OutputLockedError(RuntimeError):
    """Another process is writing to the output folder."""


# ------------------------------------------------------------------------------------------------ fingerprints


def digest(value) -> str:
    """A short stable hash of a JSON-able value (keys sorted; other objects by `str`)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model) -> dict:
    """A loaded model's identity: where it came from (`name_or_path`, the Hub commit) and a hash of every parameter
    and buffer (name, shape, dtype and `SAMPLED_VALUES` evenly strided values), so two models with the same name but
    other weights differ. A diffusers pipeline (a `LaVITPipeline`) is hashed over its components: the modules'
    weights and the others' configs (a swapped scheduler is another pipeline)."""
    import torch

    if hasattr(model, "named_parameters"):
        modules, others = {"": model}, {}
    else:
        components = getattr(model, "components", {})
        modules = {f"{name}.": part for name, part in components.items() if hasattr(part, "named_parameters")}
        others = {name: part for name, part in components.items() if name not in {key[:-1] for key in modules}}
    hasher = hashlib.sha256()
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                flat = tensor.detach().reshape(-1)
                sampled = flat[:: max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES].float().cpu()
                hasher.update(f"{prefix}{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                hasher.update(sampled.numpy().tobytes())
    for name, part in sorted(others.items()):
        hasher.update(f"{name}:{type(part).__name__}:{dict(getattr(part, 'config', {}) or {})}".encode())
    config = getattr(model, "config", None)
    return {"name_or_path": str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
            "commit": getattr(config, "_commit_hash", None), "weights": hasher.hexdigest()[:16]}


def folder_fingerprint(path) -> dict | str | None:
    """A model folder's identity without loading it: its resolved path, the hash of its JSON files and, for each
    `*.safetensors`, its size, header (names, shapes, dtypes) and `SAMPLED_CHUNKS` chunks of its data. A path that
    is not a folder (a Hub id) is returned as given; None stays None."""
    if path is None or not Path(path).is_dir():
        return None if path is None else str(path)
    folder = Path(path).resolve()
    hasher = hashlib.sha256()
    for file in sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.safetensors")):
        if file.name == FINGERPRINT_FILE or not file.is_file():
            continue
        hasher.update(str(file.relative_to(folder)).encode())
        hasher.update(_file_sample(file))
    return {"path": str(folder), "content": hasher.hexdigest()[:16]}


def files_fingerprint(path) -> dict | str | None:
    """Data's identity without reading it: a file's or a folder's resolved path, file count, total size and newest
    modification time (any file added, removed or rewritten changes it). A name that is no local path (a `datasets`
    Hub id) is returned as given."""
    if path is None or not Path(path).exists():
        return None if path is None else str(path)
    root = Path(path).resolve()
    files = [root] if root.is_file() else [file for file in root.rglob("*") if file.is_file()]
    stats = [file.stat() for file in files]
    return {"path": str(root), "files": len(stats), "bytes": sum(stat.st_size for stat in stats),
            "modified": max((stat.st_mtime_ns for stat in stats), default=0)}


def _file_sample(file: Path) -> bytes:
    """Small files whole; a weights file by its size, header and evenly spaced chunks."""
    size = file.stat().st_size
    if size <= SAMPLED_CHUNKS * CHUNK_BYTES:
        return file.read_bytes()
    with open(file, "rb") as handle:
        parts = [struct.pack("<Q", size)]
        if file.suffix == ".safetensors":
            header_length = struct.unpack("<Q", handle.read(8))[0]
            parts.append(handle.read(min(header_length, 1 << 24)))
        for index in range(SAMPLED_CHUNKS):
            handle.seek(index * (size - CHUNK_BYTES) // (SAMPLED_CHUNKS - 1))
            parts.append(handle.read(CHUNK_BYTES))
    return b"".join(parts)


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ between two fingerprints."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found.extend(differences(old, new, f"{prefix}{key}."))
        elif json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
            found.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return found


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------------ the guard


class ResumableOutput:
    """
    Guards `folder`, an output of kind `kind` (registered), for one run made of `fingerprint` (JSON-able: the model,
    the settings, the data). Use as a context manager around the writing:

        with ResumableOutput(output_dir, "evaluation", fingerprint, has_content=lambda f: any(f.glob("*.jsonl"))):
            ...  # resume from what the folder holds, append to it

    Entering takes the lock (or raises [`OutputLockedError`] naming its owner), then reads the recorded fingerprint:
    none yet and no content (`has_content(folder)` false): records this one; the same: resumes; another, or content
    without a fingerprint: raises [`ResumeMismatchError`] naming the differences and `fresh_hint` (how to start
    fresh, e.g. "give another --output"). `fresh=True` (the user asked to start over in this folder) records this
    fingerprint with the time (`fresh_start_ns`): a reader resumes nothing older (see `fresh_start_ns`).
    """

    def __init__(self, folder, kind: str, fingerprint: dict, fresh_hint: str = "give another output folder",
                 has_content: Callable[[Path], bool] | None = None, fresh: bool = False):
        if kind not in RESUMABLE_OUTPUTS:
            raise KeyError(f"{kind!r} is not a registered resumable output ({sorted(RESUMABLE_OUTPUTS)})")
        self.folder, self.kind, self.fresh_hint = Path(folder), kind, fresh_hint
        self.fingerprint = json.loads(json.dumps({"kind": kind, **fingerprint}, sort_keys=True, default=str))
        self.has_content = has_content or (lambda folder: False)
        self.fresh = fresh
        self.lock = None

    def __enter__(self):
        self.acquire()
        try:
            self.check_or_record()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.folder / LOCK_FILE))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            self.lock = None
            owner = self._owner()
            raise OutputLockedError(
                f"{self.folder} is being written by another lavit process ({owner}); wait for it to finish, or "
                f"{self.fresh_hint}") from None
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        write_atomically(self.folder / OWNER_FILE, lambda temporary: Path(temporary).write_text(owner))

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _owner(self) -> str:
        try:
            owner = loads_json((self.folder / OWNER_FILE).read_text())
            return f"pid {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "owner unknown"

    def record(self, **extra) -> None:
        text = json.dumps({**self.fingerprint, **extra}, indent=2, sort_keys=True)
        write_atomically(self.folder / FINGERPRINT_FILE, lambda temporary: Path(temporary).write_text(text))

    def check_or_record(self) -> None:
        path = self.folder / FINGERPRINT_FILE
        recorded_kind = _recorded_kind(path)
        if recorded_kind != self.kind:  # no run of this kind wrote here: a file of the kind's names is the user's,
            # unless the run that did (another kind: an evaluation's folder given to training) writes it too
            theirs = [name for name in OUTPUT_FILES[self.kind] if os.path.lexists(self.folder / name)
                      and name not in OUTPUT_FILES.get(recorded_kind, ())]
            if theirs:
                made = f"it has no {FINGERPRINT_FILE}" if recorded_kind is None else f"a {recorded_kind} run wrote it"
                raise NotLavitFileError(
                    f"{self.folder} holds {', '.join(theirs)}, which no lavit {self.kind} run wrote there ({made}), "
                    f"so lavit will not overwrite or append to it: {self.fresh_hint}")
        if self.fresh:  # the run starts over: it owns the folder from now (`fresh_start_ns` tells what came before)
            self.record(**{FRESH_START_KEY: time.time_ns()})
            return
        if not path.is_file():
            if self.has_content(self.folder):
                raise ResumeMismatchError(
                    f"{self.folder} holds a {self.kind} output without {FINGERPRINT_FILE} (written by an older lavit "
                    f"or by hand): lavit cannot tell which model, settings and data made it, so it does not resume "
                    f"it; {self.fresh_hint}")
            self.record()
            return
        try:
            recorded = loads_json(path.read_text())
            recorded.pop(FRESH_START_KEY, None)
        except (OSError, ValueError, AttributeError) as error:
            raise ResumeMismatchError(f"{path} is unreadable ({error}); {self.fresh_hint}") from error
        changed = differences(recorded, self.fingerprint)
        if changed:
            raise ResumeMismatchError(
                f"{self.folder} was made by another run, so it cannot be resumed with this one ({'; '.join(changed)});"
                f" {self.fresh_hint}")


__all__ = ["FINGERPRINT_FILE", "RESUMABLE_OUTPUTS", "OutputLockedError", "ResumableOutput", "ResumeMismatchError",
           "differences", "digest", "files_fingerprint", "folder_fingerprint", "fresh_start_ns", "model_fingerprint",
           "register_resumable_output"]


def _recorded_kind(path: Path) -> str | None:
    """The kind of output the fingerprint at `path` records; None where there is none (or it cannot be read)."""
    try:
        kind = loads_json(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def fresh_start_ns(folder) -> int:
    """When a run last started over in `folder` (`ResumableOutput(fresh=True)`), in ns since the epoch; 0 if never:
    output written before then belongs to an earlier run and is never resumed."""
    try:
        return int(loads_json((Path(folder) / FINGERPRINT_FILE).read_text()).get(FRESH_START_KEY, 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0
