"""A training stage that kills itself with SIGKILL at a chosen point, for the crash-consistency tests:
`python crash_stage.py SETTINGS.json`. SETTINGS holds `stage` ("tokenizer", "pretrain" or "detokenizer"), the stage's
`script` and `training` arguments, and `kill`: `{"step": N, "at": POINT}` with POINT one of
- "step_end": after optimizer step N (no file being written);
- "trainer_state": halfway through writing checkpoint-N's trainer_state.json;
- "weights": halfway through writing checkpoint-N's model.safetensors;
- "before_marker": checkpoint-N fully written (callbacks' files too) but not yet marked complete.
SIGKILL ends the process at once: no handler, `finally` or atexit runs, exactly like `kill -9`.
"""

import json
import os
import signal
import sys
from pathlib import Path

import safetensors.torch
import transformers.modeling_utils
import transformers.trainer_callback
from distributed_stage import STAGES
from lavit.training import checkpoints
from lavit.training.arguments import LaVITTrainingArguments
from transformers import TrainerCallback


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_then_die(path, data: bytes):
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
    die()


class KillAtStepEnd(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


def install_kill(point: str, step: int) -> list:
    """Patches the writer of `point` (or returns the callback) that kills the process at `step`."""
    if point == "step_end":
        return [KillAtStepEnd(step)]
    if point == "trainer_state":
        save_to_json = transformers.trainer_callback.TrainerState.save_to_json

        def half_state(self, json_path):
            if self.global_step != step:
                return save_to_json(self, json_path)
            save_to_json(self, json_path)
            write_half_then_die(json_path, Path(json_path).read_bytes())

        transformers.trainer_callback.TrainerState.save_to_json = half_state
    elif point == "weights":
        save_file = safetensors.torch.save_file

        def half_weights(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if f"checkpoint-{step}" in str(filename) and Path(filename).name == "model.safetensors":
                write_half_then_die(filename, Path(filename).read_bytes())

        safetensors.torch.save_file = half_weights
        transformers.modeling_utils.safe_save_file = half_weights
    elif point == "before_marker":
        write_marker = checkpoints.write_completion_marker

        def no_marker(folder):
            if Path(folder).name == f"checkpoint-{step}":
                die()
            write_marker(folder)

        checkpoints.write_completion_marker = no_marker
    else:
        raise ValueError(f"unknown kill point {point!r}")
    return []


if __name__ == "__main__":
    settings = json.loads(Path(sys.argv[1]).read_text())
    arguments_class, train = STAGES[settings["stage"]]
    callbacks = install_kill(settings["kill"]["at"], settings["kill"]["step"]) if settings.get("kill") else []
    script, training = arguments_class(**settings["script"]), LaVITTrainingArguments(**settings["training"])
    train(script, training, callbacks=callbacks)
