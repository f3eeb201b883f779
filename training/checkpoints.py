"""Crash-safe checkpoints: a checkpoint counts only once `checkpoint_complete.json` (its files and sizes) is written,
after every other file; resuming picks the newest complete one.

A run killed at any instant (SIGKILL, OOM, node loss) therefore leaves a checkpoint to resume from, and a resumed run
continues the uninterrupted one (tests/distributed/test_crash.py). The output folder records what made its
checkpoints (`resumable_run`: models, data, settings) and has one writer at a time; a checkpoint without optimizer,
schedule or random state (`save_only_model`) is resumed only with `--resume weights_only`. Also here: the check
for a stale DeepSpeed build lock, the other way a killed run can stop the next one.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from lavit.modeling.saving_lavit import loads_json
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lavit.atomic import write_atomically
from lavit.resumable import (
    FINGERPRINT_FILE,
    ResumableOutput,
    ResumeMismatchError,
    differences,
    files_fingerprint,
    folder_fingerprint,
    fresh_start_ns,
    register_resumable_output,
)

from .callbacks import LOGS_FILE

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"  # written last: lists every file of the checkpoint with its size
STALE_LOCK_SECONDS = 600
NO_RESUME = (None, False, "", "no", "false", "False")  # --resume values that start over
WEIGHTS_ONLY = "weights_only"  # --resume value that accepts a checkpoint without optimizer/schedule/random state
LATEST = (True, "auto", "true", "True", WEIGHTS_ONLY)  # --resume values that continue the newest complete checkpoint


def resume_problem(resume) -> str | None:
    """Why the `--resume` value `resume` can mean nothing (not one of the words, no such checkpoint path), or None:
    said when the arguments are parsed, before any model is loaded."""
    if resume in NO_RESUME or resume in LATEST or Path(str(resume)).expanduser().is_dir():
        return None
    return (f"--resume {resume}: not auto, no, weights_only nor a checkpoint folder (no such folder): give one of the "
            f"three words or a checkpoint-N folder")
RESUMABLE_KIND = register_resumable_output(
    "training", "every training stage's --output_dir: checkpoint-N/ folders that --resume auto continues",
    files=(LOGS_FILE,))
FRESH_HINT = "give another --output_dir to start fresh (or remove this folder yourself)"


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
    # the marker (and a temporary one a crash left) never lists itself; each file's size says the checkpoint is
    # whole, its modification and change times that nobody edited it since (the change time cannot be set back)
    files = {str(path.relative_to(folder)): _file_state(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and not path.name.startswith(COMPLETE_MARKER)}
    marker = json.dumps({"files": files})
    write_atomically(folder / COMPLETE_MARKER, lambda temporary: Path(temporary).write_text(marker))


def _file_state(path: Path) -> dict:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns}


def _listed_files(folder: Path) -> dict:
    """The completion marker's files: name -> state (a marker of lavit <= 0.x recorded sizes only)."""
    files = loads_json((folder / COMPLETE_MARKER).read_text())["files"]
    return {name: state if isinstance(state, dict) else {"size": state} for name, state in files.items()}


def checkpoint_problem(folder) -> str | None:
    """Why `folder` is not a complete checkpoint (no completion marker, a listed file missing or of another size, an
    unreadable `trainer_state.json`), or None."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the run stopped while writing it)"
    try:
        files = _listed_files(folder)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        return f"{marker} is unreadable ({error})"
    for name, state in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != state.get("size"):
            return f"{path} is missing or not {state.get('size')} bytes"
    return None


def changed_since_complete(folder) -> list[str]:
    """The files of the complete checkpoint `folder` added, or written to, after lavit completed it (a marker of
    lavit <= 0.x, without times, counts only added files)."""
    folder = Path(folder)
    listed = _listed_files(folder)
    present = {str(path.relative_to(folder)) for path in folder.rglob("*")
               if (path.is_file() or path.is_symlink()) and not path.name.startswith(COMPLETE_MARKER)}
    return sorted(name for name in present if name not in listed or (
        "ctime_ns" in listed[name] and _file_state(folder / name) != listed[name]))


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
    included). The newest complete checkpoint and `best_checkpoint` are kept; incomplete folders are left alone, and
    so is a checkpoint with a file added or edited since it was completed ([`changed_since_complete`])."""
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
        if folder.resolve() in protected:
            continue
        changed = changed_since_complete(folder)
        if changed:  # the user's files, or a checkpoint edited by hand: kept, and counted against the limit
            logger.warning(f"{folder} is not rotated out: {', '.join(changed[:5])} changed or appeared after lavit "
                           f"completed it; move it out or delete it yourself")
        else:
            shutil.rmtree(folder)
        excess -= 1


def latest_checkpoint(output_dir) -> str | None:
    """The newest *complete* checkpoint in `output_dir` (see [`checkpoint_problem`]). A newer incomplete one (a crash
    while it was written) is skipped with a warning that names it and says which checkpoint is used instead."""
    skipped, started_over = [], fresh_start_ns(output_dir)
    for folder in reversed(numbered_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None and (folder / COMPLETE_MARKER).stat().st_mtime_ns < started_over:
            problem = "written by an earlier run, before this folder was started over with --resume no"
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
    """`"auto"`/`True`: the latest complete checkpoint (or a fresh start); `"weights_only"`: the same, also when it
    cannot reproduce the run (see [`reproducibility_problem`]); a path: that checkpoint, which must be complete; else
    None. A checkpoint without its optimizer, schedule and random state raises unless `"weights_only"` says so."""
    if resume_from_checkpoint in NO_RESUME:
        return None
    if resume_from_checkpoint in LATEST:
        checkpoint = latest_checkpoint(output_dir)
    else:
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem is not None:
            raise FileNotFoundError(f"{resume_from_checkpoint} is not a complete checkpoint: {problem}")
        checkpoint = str(resume_from_checkpoint)
    problem = reproducibility_problem(checkpoint) if checkpoint is not None else None
    if problem is not None and resume_from_checkpoint != WEIGHTS_ONLY:
        raise ValueError(
            f"{checkpoint} {problem}: resuming it would restart the optimizer and the learning-rate schedule, so "
            f"the run would not continue the interrupted one. Resume its weights anyway with --resume {WEIGHTS_ONLY}, "
            f"or start fresh with --resume no")
    if problem is not None:
        logger.warning(f"--resume {WEIGHTS_ONLY}: {checkpoint} {problem}; continuing from its weights and step with a "
                       f"new optimizer and schedule")
    return checkpoint


def reproducibility_problem(folder) -> str | None:
    """Why the checkpoint `folder` cannot continue its run exactly (`save_only_model` keeps only the weights and the
    trainer state), or None: it needs the optimizer (`optimizer.pt`, or DeepSpeed's `global_step*`), the schedule
    (`scheduler.pt`) and the random state (`rng_state*.pth`)."""
    folder = Path(folder)
    missing = [what for what, present in (
        ("optimizer", (folder / "optimizer.pt").is_file() or any(folder.glob("global_step*"))),
        ("learning-rate schedule", (folder / "scheduler.pt").is_file() or any(folder.glob("global_step*"))),
        ("random state", any(folder.glob("rng_state*.pth"))),
    ) if not present]
    return f"has no {', '.join(missing)} state (saved with save_only_model)" if missing else None


# ------------------------------------------------------------------------------------------------ what made a run

# the arguments that change what a step computes; the length of training, logging and saving may change on resume
FINGERPRINT_TRAINING_ARGS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "optim", "per_device_train_batch_size",
    "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing", "deepspeed",
)
# script arguments that are models (identified by content) or data (identified by files)
MODEL_ARGS = ("model", "visual_tokenizer", "language_model", "text_tokenizer", "vision_model", "detokenizer",
              "diffusers_model", "tokenizer_config", "detokenizer_config")
DATA_ARGS = ("data", "text_data")
# what may change between an interrupted run and its resume (how to resume, how the data is read)
RUN_ONLY_ARGS = ("resume", "streaming")


def run_fingerprint(script_args, training_args) -> dict:
    """What a stage's checkpoints depend on: the models it starts from, the data and every other setting."""
    arguments = {item.name: getattr(script_args, item.name) for item in dataclasses.fields(script_args)}
    return {
        "models": {name: folder_fingerprint(arguments.pop(name)) for name in MODEL_ARGS if name in arguments},
        "data": {name: files_fingerprint(arguments.pop(name)) for name in DATA_ARGS if name in arguments},
        "settings": {name: value for name, value in arguments.items() if name not in RUN_ONLY_ARGS},
        "training": {name: getattr(training_args, name, None) for name in FINGERPRINT_TRAINING_ARGS},
    }


def has_checkpoints(output_dir: Path) -> bool:
    return any(folder.is_dir() for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


@contextmanager
def resumable_run(script_args, training_args):
    """
    The checkpoint to resume from (or None), for the duration of a stage's training. On the main process the
    `output_dir` is a [`lavit.resumable.ResumableOutput`] of kind "training": locked against a second run, and
    refused when its checkpoints were made from other models, data or settings (`--output_dir` of its own starts
    fresh). `--resume no` starts over in the folder: checkpoints older than that are never resumed. The other
    processes only resolve the checkpoint (a launcher stops them when the main process fails).
    """
    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0:
        guard = ResumableOutput(output_dir, RESUMABLE_KIND, run_fingerprint(script_args, training_args), FRESH_HINT,
                                has_content=has_checkpoints, fresh=script_args.resume in NO_RESUME)
    else:
        guard = nullcontext()
    with guard:
        resume = resolve_resume(script_args.resume, output_dir)
        if resume is not None and Path(resume).parent.resolve() != output_dir.resolve() and isinstance(
                guard, ResumableOutput):
            check_foreign_checkpoint(Path(resume), guard)
        yield resume


def check_foreign_checkpoint(checkpoint: Path, guard: ResumableOutput) -> None:
    """A checkpoint given by path from another run folder must come from a run with this fingerprint."""
    recorded = checkpoint.parent / FINGERPRINT_FILE
    if not recorded.is_file():
        logger.warning(f"{checkpoint.parent} has no {FINGERPRINT_FILE}: lavit cannot check that {checkpoint} was "
                       f"made from this run's models, data and settings")
        return
    changed = differences(loads_json(recorded.read_text()), guard.fingerprint)
    if changed:
        raise ResumeMismatchError(f"{checkpoint} was made by another run ({'; '.join(changed)}); {FRESH_HINT}")


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

