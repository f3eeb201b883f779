"""`lavit.training.checkpoints`: what counts as a complete checkpoint (its completion marker, the files and sizes it
lists), which one `--resume` picks and refuses, what a run's fingerprint holds, and the stale DeepSpeed build lock."""

import dataclasses
import json
import logging
import os
import time
from types import SimpleNamespace

import pytest
from lavit.training.checkpoints import (
    COMPLETE_MARKER,
    WEIGHTS_ONLY,
    changed_since_complete,
    check_extension_locks,
    check_foreign_checkpoint,
    checkpoint_problem,
    latest_checkpoint,
    numbered_checkpoints,
    reproducibility_problem,
    resolve_resume,
    resume_problem,
    run_fingerprint,
    write_completion_marker,
)

from lavit.resumable import FINGERPRINT_FILE, ResumeMismatchError

RESUMABLE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoint(output_dir, step, files=("model.safetensors",), complete=True):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * 8)
    if complete:
        write_completion_marker(folder)
    return folder


@pytest.mark.parametrize("value", [None, "no", "auto", True, WEIGHTS_ONLY])
def test_resume_words_are_accepted(value):
    assert resume_problem(value) is None


def test_resume_accepts_an_existing_folder_and_names_a_value_that_is_neither_word_nor_folder(tmp_path):
    assert resume_problem(str(tmp_path)) is None
    problem = resume_problem(str(tmp_path / "checkpoint-9"))
    assert f"--resume {tmp_path / 'checkpoint-9'}" in problem and "no such folder" in problem


def test_a_checkpoint_with_its_marker_and_files_is_complete(tmp_path):
    folder = checkpoint(tmp_path, 1, ("model.safetensors", "optimizer.pt"))
    listed = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    assert set(listed) == {"model.safetensors", "optimizer.pt"}  # never the marker itself
    assert checkpoint_problem(folder) is None


def test_a_checkpoint_without_marker_is_incomplete(tmp_path):
    assert "no checkpoint_complete.json" in checkpoint_problem(checkpoint(tmp_path, 1, complete=False))


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_listed_file_missing_or_of_another_size_makes_it_incomplete(tmp_path, damage):
    folder = checkpoint(tmp_path, 1)
    weights = folder / "model.safetensors"
    weights.unlink() if damage == "removed" else weights.write_bytes(b"x" * 3)
    assert checkpoint_problem(folder) == f"{weights} is missing or not 8 bytes"


def test_an_unreadable_marker_is_named(tmp_path):
    folder = checkpoint(tmp_path, 1)
    (folder / COMPLETE_MARKER).write_text("{not json")
    assert "is unreadable" in checkpoint_problem(folder)


def test_files_added_or_rewritten_after_completion_are_found(tmp_path):
    folder = checkpoint(tmp_path, 1, ("a.bin", "b.bin"))
    assert changed_since_complete(folder) == []
    (folder / "notes.txt").write_text("mine")
    time.sleep(0.01)
    (folder / "b.bin").write_bytes(b"y" * 8)
    assert changed_since_complete(folder) == ["b.bin", "notes.txt"]


def test_a_marker_of_sizes_only_counts_added_files_alone(tmp_path):
    folder = checkpoint(tmp_path, 1, ("a.bin",), complete=False)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": {"a.bin": 8}}))  # lavit <= 0.x
    (folder / "a.bin").write_bytes(b"z" * 8)
    assert checkpoint_problem(folder) is None and changed_since_complete(folder) == []
    (folder / "extra.txt").write_text("x")
    assert changed_since_complete(folder) == ["extra.txt"]


def test_numbered_checkpoints_are_ordered_by_step_and_skip_other_entries(tmp_path):
    for step in (10, 9, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-7").write_text("a file")
    os.symlink(tmp_path / "checkpoint-9", tmp_path / "checkpoint-200")
    assert [folder.name for folder in numbered_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10",
                                                                          "checkpoint-100"]
    assert numbered_checkpoints(tmp_path / "missing") == []


def test_latest_checkpoint_skips_a_newer_incomplete_one_and_says_so(tmp_path, caplog):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 3, complete=False)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-3 is incomplete" in caplog.text and "checkpoint-2" in caplog.text


def test_latest_checkpoint_without_a_complete_one_is_none(tmp_path, caplog):
    checkpoint(tmp_path, 1, complete=False)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) is None
    assert "starting from scratch" in caplog.text
    assert latest_checkpoint(tmp_path / "empty") is None


def test_latest_checkpoint_never_resumes_one_older_than_a_fresh_start(tmp_path):
    checkpoint(tmp_path, 1)
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({"fresh_start_ns": time.time_ns() + 10**9}))
    assert latest_checkpoint(tmp_path) is None


def test_resolving_no_gives_none_and_auto_the_newest_resumable_checkpoint(tmp_path):
    checkpoint(tmp_path, 1, RESUMABLE_FILES)
    checkpoint(tmp_path, 2, RESUMABLE_FILES)
    assert resolve_resume("no", tmp_path) is None
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-2")


def test_resolving_an_incomplete_checkpoint_path_is_refused(tmp_path):
    folder = checkpoint(tmp_path, 1, RESUMABLE_FILES, complete=False)
    with pytest.raises(FileNotFoundError, match="checkpoint-1 is not a complete checkpoint: no checkpoint_complete"):
        resolve_resume(str(folder), tmp_path)


def test_a_weights_only_checkpoint_is_refused_unless_resumed_weights_only(tmp_path):
    folder = checkpoint(tmp_path, 1, ("model.safetensors", "trainer_state.json"))
    with pytest.raises(ValueError, match="would restart the optimizer") as error:
        resolve_resume("auto", tmp_path)
    assert f"--resume {WEIGHTS_ONLY}" in str(error.value)
    assert resolve_resume(WEIGHTS_ONLY, tmp_path) == str(folder)


def test_reproducibility_names_each_missing_state(tmp_path):
    assert reproducibility_problem(tmp_path) == ("has no optimizer, learning-rate schedule, random state state "
                                                 "(saved with save_only_model)")
    (tmp_path / "rng_state_0.pth").write_bytes(b"")
    (tmp_path / "global_step7").mkdir()  # DeepSpeed keeps optimizer and schedule there
    assert reproducibility_problem(tmp_path) is None


@dataclasses.dataclass
class Script:
    model: str
    data: str
    max_length: int = 64
    resume: str = "auto"
    streaming: bool = False


def test_a_run_fingerprint_identifies_models_by_content_data_by_files_and_keeps_other_settings(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    training = SimpleNamespace(seed=3, learning_rate=0.1)
    fingerprint = run_fingerprint(Script(str(tmp_path / "model"), str(tmp_path / "data.jsonl")), training)
    assert set(fingerprint["models"]["model"]) == {"path", "content"}
    assert fingerprint["data"]["data"]["files"] == 1
    assert fingerprint["settings"] == {"max_length": 64}  # how to resume and how data is read may change
    assert fingerprint["training"]["seed"] == 3 and fingerprint["training"]["bf16"] is None
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 8}')
    changed = run_fingerprint(Script(str(tmp_path / "model"), str(tmp_path / "data.jsonl")), training)
    assert changed["models"] != fingerprint["models"]


def test_a_foreign_checkpoint_from_a_run_with_another_fingerprint_is_refused(tmp_path):
    other = checkpoint(tmp_path / "other", 5)
    (tmp_path / "other" / FINGERPRINT_FILE).write_text(json.dumps({"settings": {"max_length": 64}}))
    check_foreign_checkpoint(other, SimpleNamespace(fingerprint={"settings": {"max_length": 64}}))
    with pytest.raises(ResumeMismatchError, match=r"checkpoint-5 was made by another run \(settings.max_length"):
        check_foreign_checkpoint(other, SimpleNamespace(fingerprint={"settings": {"max_length": 128}}))


def test_a_foreign_checkpoint_without_a_record_is_let_through_with_a_warning(tmp_path, caplog):
    other = checkpoint(tmp_path / "other", 5)
    with caplog.at_level(logging.WARNING):
        check_foreign_checkpoint(other, SimpleNamespace(fingerprint={"settings": {}}))
    assert "cannot check" in caplog.text


def test_a_stale_extension_build_lock_is_named_and_a_fresh_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    check_extension_locks(max_idle_seconds=600)  # a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    os.utime(lock.parent, (old, old))
    with pytest.raises(RuntimeError, match=rf"{lock} is a stale build lock .*'cpu_adam' extension.*rm {lock}"):
        check_extension_locks(max_idle_seconds=600)
