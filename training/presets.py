"""Named training presets (`--preset NAME`) and the warning for runs too short to learn anything.

A preset fills in the settings a run leaves at their defaults (learning rates, batch size, row length, crops) and
scales the number of optimizer steps to the data: `epochs` passes over the training rows, at least `min_steps` and
at most `max_steps`. Whatever a run sets itself wins (`--max_steps` included), on the command line or in a config
file even at the flag's default value (the stage parser records the flags given); in Python, a field left at its
default counts as unset.
"""

import contextlib
import dataclasses
import logging
import math
import re

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, has_length

logger = logging.getLogger(__name__)

SHORT_RUN_STEPS = 100  # fewer optimizer steps than this learn little from scratch
FEW_BATCHES = 2  # an epoch of this many batches or fewer: the data is packed into a handful of rows


@dataclasses.dataclass(frozen=True)
class TrainingPreset:
    """
    Args:
        description: one line for `--help`.
        settings: argument name (of the stage's arguments or of `TrainingArguments`) -> value, or a function of the
            model being trained that returns the value (e.g. a row length from the tokenizer's patch count).
        epochs: passes over the training rows the step count aims at.
        min_steps, max_steps: bounds of that step count.
    """

    description: str
    settings: dict
    epochs: float
    min_steps: int
    max_steps: int

    def steps_for(self, num_rows: int, rows_per_step: int) -> int:
        """Optimizer steps for `num_rows` training rows, `rows_per_step` rows per optimizer step."""
        return min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * num_rows / rows_per_step)))


def row_length_for_patches(model) -> int:
    """Room for about three image-caption pairs per row: 4 tokens per patch of an image (256 for 64 patches)."""
    return 4 * model.config.tokenizer_config.num_patches


SMALL_DATA = "small-data"
# a few hundred images teach the LM the exact token strings of each one; crops and mirror images of them make it
# learn what the strings of one subject share (held-out crops of unseen parts of a photo: 0.57 -> see docs/training.md)
SMALL_DATA_AUGMENTATION = {"crop_scale": 0.5, "horizontal_flip": True}
PRESETS = {
    "tokenizer": {SMALL_DATA: TrainingPreset(
        "hundreds to a few thousand images on a CPU: a new tokenizer from the 'small' config, learning rate 1e-3, "
        "batch 16, no crops, 25 passes over the images (300 to 1500 steps), VQ on after a quarter of them",
        {"tokenizer_config": "small", "learning_rate": 1e-3, "per_device_train_batch_size": 16, "crop_scale": 1.0,
         "warmup_steps": 0.05},
        epochs=25, min_steps=300, max_steps=1500)},
    "pretrain": {SMALL_DATA: TrainingPreset(
        "hundreds to a few thousand pairs on a CPU: learning rate 2e-3 for every weight, batch 8, rows of 4 tokens "
        "per patch (256 for 64 patches, about 3 pairs), images cropped to half to all of their area and mirrored "
        "at random, 30 passes over the rows (300 to 1500 steps)",
        {"learning_rate": 2e-3, "visual_learning_rate": None, "per_device_train_batch_size": 8,
         "max_length": row_length_for_patches, "warmup_steps": 0.05, **SMALL_DATA_AUGMENTATION},
        epochs=30, min_steps=300, max_steps=1500)},
    "finetune": {SMALL_DATA: TrainingPreset(
        "hundreds to a few thousand examples on a CPU: learning rate 1e-3, batch 8, images cropped and mirrored as in "
        "'train', a tenth of the examples held out and evaluated every 25 steps (the loss, and the task metric), the "
        "checkpoint of the lowest held-out loss kept, stopped after 4 evaluations without a lower one, at most 8 "
        "passes (200 to 800 steps)",
        {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "warmup_steps": 0.05, "eval_split_size": 0.1,
         "eval_strategy": IntervalStrategy.STEPS, "eval_steps": 25, "save_steps": 25,
         # the lowest loss, not the best task metric: a tenth of a few hundred examples scores captions in steps of
         # 0.025 with a noise of about 0.07, so its best score came early and kept checkpoints trained half as long
         # (held-out crops of unseen parts of the photos: 0.38 kept by caption_accuracy, 0.64 by the loss)
         "metric_for_best_model": "loss",
         "load_best_model_at_end": True, "early_stopping_patience": 4, "per_device_eval_batch_size": 16,
         **SMALL_DATA_AUGMENTATION},
        epochs=8, min_steps=200, max_steps=800)},
}


# the settings of a held-out evaluation, which a preset leaves out when the run turns evaluation off itself
# (`--eval_strategy no`, or `--eval_split_size 0` without `--eval_data`): no records held out of training for an
# evaluation that never runs, and no evaluation announced that never runs
HELD_OUT_EVALUATION = {"eval_split_size", "eval_strategy", "eval_steps", "load_best_model_at_end",
                       "metric_for_best_model", "early_stopping_patience", "per_device_eval_batch_size"}


def preset_field(stage: str):
    """The `preset` field of a stage's arguments: `--preset NAME`, checked by the parser, every preset in `--help`."""
    names = "; ".join(f"'{name}': {preset.description}" for name, preset in PRESETS[stage].items())
    return dataclasses.field(default=None, metadata={
        "help": f"Settings for a kind of run, scaled to the data size; flags you give win. {names}. "
                f"See docs/training.md, 'Small data'.", "choices": sorted(PRESETS[stage])})


def get_preset(stage: str, name: str | None) -> TrainingPreset | None:
    if name is None:
        return None
    if name not in PRESETS[stage]:
        raise ValueError(f"--preset {name!r} is not a preset of this stage; choose one of {sorted(PRESETS[stage])}")
    return PRESETS[stage][name]


def _default_of(arguments, name: str):
    spec = {spec.name: spec for spec in dataclasses.fields(arguments)}[name]
    return spec.default


def apply_preset(stage: str, name: str | None, script_args, training_args, model=None):
    """Writes the settings of preset `name` of `stage` into the arguments that are still at their defaults
    (settings that depend on the model read `model`); returns the preset (`None` without a name) and what was set.

    Raises:
        ValueError: `name` is not a preset of `stage`.
    """
    preset, applied = get_preset(stage, name), {}
    given = getattr(script_args, "given_flags", ())
    evaluation_off = ("eval_strategy" in given and training_args.eval_strategy == IntervalStrategy.NO) or (
        "eval_split_size" in given and not script_args.eval_split_size and not getattr(script_args, "eval_data", None))
    for setting, value in (preset.settings.items() if preset else ()):
        arguments = script_args if hasattr(script_args, setting) else training_args
        value = value(model) if callable(value) else value
        if setting in given or (evaluation_off and setting in HELD_OUT_EVALUATION):  # the run's own choice wins
            continue
        if getattr(arguments, setting) == _default_of(arguments, setting):
            setattr(arguments, setting, value)
            applied[setting] = value
    script_args.preset_settings = dict(applied)  # what the run did not set itself: `explained_by_preset` names it
    return preset, applied


def preset_origin(message: str, script_args) -> str:
    """`message` with, for each flag it names (`--NAME`) whose value the run's preset set, where that value came
    from: an error must not read as if the user had typed a flag the preset filled in."""
    preset, settings = getattr(script_args, "preset", None), getattr(script_args, "preset_settings", None) or {}
    if preset is None or f"--preset {preset}" in message:  # no preset, or the message already says what it set
        return message
    named = [name for name in settings if re.search(rf"--{re.escape(name)}\b", message)]
    if not named:
        return message
    values = ", ".join(f"--{name} {settings[name]}" for name in named)
    return (f"{message} ({values}: set by --preset {preset}, not given on the command line; give "
            f"{' / '.join('--' + name for name in named)} yourself to change it)")


@contextlib.contextmanager
def explained_by_preset(script_args):
    """Errors of a stage run inside get [`preset_origin`]: the flags its preset set are named as the preset's."""
    try:
        yield
    except Exception as error:
        if len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (preset_origin(error.args[0], script_args),)
        raise


def apply_preset_steps(preset: TrainingPreset | None, training_args, num_rows: int | None) -> dict:
    """Sets `max_steps` from the number of training rows unless the run gave `--max_steps`; returns what was set."""
    if preset is None or training_args.max_steps > 0:
        return {}
    if num_rows is None:
        raise ValueError("a preset scales the steps to the data size, which a streamed dataset does not have: "
                         "give --max_steps")
    rows_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                     * training_args.world_size)
    training_args.max_steps = preset.steps_for(num_rows, rows_per_step)
    return {"max_steps": training_args.max_steps}


def report_preset(preset: TrainingPreset | None, applied: dict, num_rows: int | None, training_args):
    """One line on the main process: the settings the preset chose."""
    if preset is not None and training_args.process_index == 0:
        settings = ", ".join(f"{name}={value}" for name, value in applied.items()) or "nothing (all set by the run)"
        print(f"preset: {settings} ({num_rows} training rows)")


class ShortRunWarningCallback(TrainerCallback):
    """
    Warns when training starts if the run takes fewer than `SHORT_RUN_STEPS` optimizer steps, or if an epoch is
    `FEW_BATCHES` batches or fewer (the data packed into a handful of rows), with the numbers and what to change.

    Args:
        num_records: records read from the data (before packing), when known.
        row_length: the most tokens per packed row (stage 2), or `None`.
        preset: the run's preset (then the warning does not suggest one).
    """

    def __init__(self, num_records: int | None = None, row_length: int | None = None, preset: str | None = None):
        self.num_records, self.row_length, self.preset = num_records, row_length, preset

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        batches = len(train_dataloader) if has_length(train_dataloader) else None
        if not state.is_world_process_zero or (state.max_steps >= SHORT_RUN_STEPS and
                                               (batches is None or batches > FEW_BATCHES)):
            return
        data = f"{self.num_records} records" if self.num_records is not None else "the data"
        if has_length(getattr(train_dataloader, "dataset", None)):
            data += f" -> {len(train_dataloader.dataset)} rows"
            data += f" of up to {self.row_length} tokens" if self.row_length else ""
        epochs = f"{state.num_train_epochs} epoch" + ("s" if state.num_train_epochs != 1 else "")
        if batches is None:  # streamed: the Trainer counts sys.maxsize epochs over a stream of unknown length
            epochs = "streamed data of unknown length"
        per_epoch = f", {batches} batches of {args.per_device_train_batch_size} per epoch" if batches else ""
        changes = [] if self.preset else [
            f"--preset {SMALL_DATA} (steps, learning rate and row length scaled to the data)"]
        changes.append("more --max_steps / --num_train_epochs")
        changes += ["a smaller --max_length (fewer records per row)"] if self.row_length else []
        changes.append("a smaller --per_device_train_batch_size")
        logger.warning(f"this run will learn little: {state.max_steps} optimizer steps in total ({epochs}{per_epoch}; "
                       f"{data}). To change: {', or '.join(changes)}.")
