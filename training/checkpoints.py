"""Crash-safe checkpoints: a checkpoint counts only once `checkpoint_complete.json` (its files and sizes) is written,
after every other file; resuming picks the newest complete one.

A run killed at any instant (SIGKILL, OOM, node loss) therefore leaves a checkpoint to resume from, and a resumed run
continues the uninterrupted one (tests/distributed/test_crash.py). Also here: the check for a stale DeepSpeed build
lock, the other way a killed run can stop the next one.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lavit.atomic import write_atomically

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"  # written last: lists every file of the checkpoint with its size
STALE_LOCK_SECONDS = 600


class CheckpointCompletionCallback(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part (and every earlier `on_save` callback its
    files): `checkpoint_complete.json` lists each file with its size, written to a temporary file and renamed. Then
    rotates old checkpoints out (`save_total_limit`), never the last complete one ([`rotate_complete_checkpoints`])."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_completion_marker(folder)
            rotate_complete_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint)


def write_completion_marker(folder: Path) -> None:
    # the marker (and a temporary one a crash left) never lists itself
    files = {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
             if path.is_file() and not path.name.startswith(COMPLETE_MARKER)}
    marker = json.dumps({"files": files})
    write_atomically(folder / COMPLETE_MARKER, lambda temporary: Path(temporary).write_text(marker))


def checkpoint_problem(folder) -> str | None:
    """Why `folder` is not a complete checkpoint (no completion marker, a listed file missing or of another size, an
    unreadable `trainer_state.json`), or None."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the run stopped while writing it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"{marker} is unreadable ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or not {size} bytes"
    return None


def numbered_checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-<step>` folders (not links) of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [folder for _, folder in sorted(
        (int(folder.name.rsplit("-", 1)[-1]), folder) for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if folder.is_dir() and not folder.is_symlink() and folder.name.rsplit("-", 1)[-1].isdigit())]


def rotate_complete_checkpoints(output_dir, limit: int | None, best_checkpoint: str | None = None) -> None:
    """Deletes the oldest checkpoints beyond `limit`, counting and deleting only complete ones: their completion
    marker says lavit wrote them (transformers' rotation deletes any folder named `checkpoint-*`, a user's own
    included). The newest complete checkpoint and `best_checkpoint` are kept; incomplete folders are left alone."""
    if not limit or limit <= 0:
        return
    complete = [folder for folder in numbered_checkpoints(output_dir) if checkpoint_problem(folder) is None]
    protected = {complete[-1].resolve()} if complete else set()
    if best_checkpoint is not None:
        protected.add(Path(best_checkpoint).resolve())
    excess = len(complete) - max(limit, len(protected))
    for folder in complete:
        if excess <= 0:
            break
        if folder.resolve() not in protected:
            shutil.rmtree(folder)
            excess -= 1


def latest_checkpoint(output_dir) -> str | None:
    """The newest *complete* checkpoint in `output_dir` (see [`checkpoint_problem`]). A newer incomplete one (a crash
    while it was written) is skipped with a warning that names it and says which checkpoint is used instead."""
    skipped = []
    for folder in reversed(numbered_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning(f"resuming from {folder}, the newest complete checkpoint; ignored: "
                               + "; ".join(skipped))
            return str(folder)
        skipped.append(f"{folder.name} is incomplete: {problem}")
    if skipped:
        logger.warning("no complete checkpoint, starting from scratch; ignored: " + "; ".join(skipped))
    return None


def resolve_resume(resume_from_checkpoint, output_dir) -> str | None:
    """`"auto"`/`True`: the latest complete checkpoint (or a fresh start); a path: that checkpoint, which must be
    complete; else None."""
    if resume_from_checkpoint in (None, False, "", "no", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "auto", "true", "True"):
        return latest_checkpoint(output_dir)
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem is not None:
        raise FileNotFoundError(f"{resume_from_checkpoint} is not a complete checkpoint: {problem}")
    return str(resume_from_checkpoint)


def check_extension_locks(max_idle_seconds: float = STALE_LOCK_SECONDS) -> None:
    """Raises naming the file when the torch extensions cache (where DeepSpeed compiles its CPU ops on first use)
    holds a `lock` that no build has touched for `max_idle_seconds`: a run killed while compiling leaves it, and every
    later run then waits on it forever without a message."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        idle = time.time() - max(path.stat().st_mtime for path in lock.parent.iterdir())
        if idle > max_idle_seconds:
            raise RuntimeError(
                f"{lock} is a stale build lock (nothing in {lock.parent} changed for {idle / 60:.0f} minutes): a run "
                f"was killed while compiling the '{lock.parent.name}' extension, and every later run would wait on "
                f"this lock forever. Remove it (rm {lock}) and start again; the extension is then rebuilt."
            )

