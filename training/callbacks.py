"""Trainer callbacks shared by the stages: the JSON Lines log, the epoch of seeded datasets, the EMA of the
detokenizer's weights, the stop of a run resumed at its last step."""

import contextlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import has_length

LOGS_FILE = "logs.jsonl"  # in the run's output_dir

EMA_FILE = "ema.safetensors"


class JsonlLoggerCallback(TrainerCallback):
    """Appends every log entry (with its step) as one JSON line to `<output_dir>/logs.jsonl`, flushed at once."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / LOGS_FILE, "a") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            handle.flush()


class DataEpochCallback(TrainerCallback):
    """Tells a training dataset with `set_epoch` (e.g. [`RandomOrderRows`]) which epoch starts: the Trainer's count,
    steps done // steps per epoch, so a resumed run continues the epoch it stopped in (accelerate forwards
    `set_epoch` to the dataset only for some samplers). A dataset without a length counts its passes."""

    def __init__(self, dataset):
        self.dataset, self.passes = dataset, 0

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not hasattr(self.dataset, "set_epoch"):
            return
        if has_length(train_dataloader):
            steps_per_epoch = max(-(-len(train_dataloader) // args.gradient_accumulation_steps), 1)
            self.dataset.set_epoch(state.global_step // steps_per_epoch)
        else:
            self.dataset.set_epoch(self.passes)
        self.passes += 1


class EMACallback(TrainerCallback):
    """An exponential moving average of the trained parameters (diffusers' `EMAModel`), saved as `ema.safetensors`
    in every checkpoint, restored on resume, and copied into the model at the end of training."""

    def __init__(self, model, decay: float, resume_from_checkpoint: str | None = None):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.parameters = [param for param in model.parameters() if param.requires_grad]
        self.ema = EMAModel(self.parameters, decay=decay)
        if resume_from_checkpoint is not None:
            self.load(Path(resume_from_checkpoint) / EMA_FILE)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.parameters)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tensors = {name: shadow.detach().cpu().contiguous()
                       for name, shadow in zip(self.names, self.ema.shadow_params, strict=True)}
            save_file(tensors, checkpoint / EMA_FILE, metadata={"optimization_step": str(self.ema.optimization_step)})

    def on_train_end(self, args, state, control, **kwargs):
        # under ZeRO-3 each rank holds a shard of every parameter: gather them whole, write the averages, re-shard
        gathered = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(self.parameters, modifier_rank=0)
        with gathered:
            self.ema.copy_to(self.parameters)

    def load(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written without its EMA weights")
        from safetensors import safe_open

        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            self.ema.optimization_step = int(handle.metadata()["optimization_step"])
        for name, shadow in zip(self.names, self.ema.shadow_params, strict=True):
            shadow.copy_(tensors[name])


class TrainingComplete(Exception):
    """A run resumed from the checkpoint of its last step: nothing is left to train (see [`StopAtMaxStepsCallback`])."""


class StopAtMaxStepsCallback(TrainerCallback):
    """
    Stops a run resumed from a checkpoint of step `max_steps` before it takes a step: the `Trainer` tests the step
    count only after a step, so resuming from the last checkpoint in the middle of an epoch (a run killed between
    its last checkpoint and its final save) trains one step more than asked and saves other weights (transformers
    5.25). Raises [`TrainingComplete`], which `LaVITTrainer.train` turns into the end of the run.
    """

    def on_step_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise TrainingComplete
