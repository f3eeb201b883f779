"""What every LaVIT stage shares: the `Trainer` subclass, checkpoint discovery, logging and the final save.

`LaVITTrainer` adds to `transformers.Trainer`:
- exact loss normalisation under gradient accumulation for compact image placeholders (whose targets the model
  adds after the Trainer counted the labels): the frozen tokenizer expands them before the count;
- parameter groups with their own learning rate for the visual modules and the visual rows of the embedding and
  head (paper: about 1e-4 for the visual part, 1e-5 for the LM);
- extra metrics from the model outputs (per-modality losses, tokenizer statistics), averaged between logs.
"""

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from lavit.modeling.modeling_lavit import find_image_spans
from transformers import Trainer, TrainerCallback
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from .collators import expand_compact_images

logger = logging.getLogger(__name__)

VISUAL_MODULES = ("visual_merger", "visual_projection")


class LaVITTrainer(Trainer):
    """
    Args (besides those of `transformers.Trainer`):
        visual_learning_rate (`float`, *optional*): learning rate of the visual modules (`visual_merger`,
            `visual_projection`) and of the `[IMG]`/`[/IMG]`/visual rows of the embedding and head; the LM keeps
            `args.learning_rate`. `None`: one learning rate for everything.
        logged_outputs (`tuple[str]`): scalar fields of the model output to log (averaged over the logging window).
    """

    def __init__(self, *args, visual_learning_rate: float | None = None, logged_outputs=("text_loss", "image_loss"),
                 **kwargs):
        self.visual_learning_rate = visual_learning_rate
        self.logged_outputs = tuple(logged_outputs)
        self._metric_sums: dict[str, float] = {}
        self._metric_counts: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ loss normalisation

    def _get_num_items_in_batch(self, batch_samples, device):
        compact = [self._has_compact_image_targets(batch) for batch in batch_samples]
        if any(compact) and (self.args.gradient_accumulation_steps > 1 or self.args.world_size > 1):
            # the targets of compact images are only known once the frozen selector has run: run it here and expand
            # the batches in place (an extra no-grad pass of the encoder), so the count, the loss and the gradient
            # are exact across micro-batches and devices. With one micro-batch on one device the model's own mean is
            # already exact.
            for index, batch in enumerate(batch_samples):
                if compact[index]:
                    batch.update(self._expand_compact_images(batch))
        elif any(compact):
            return None
        return super()._get_num_items_in_batch(batch_samples, device)

    def _expand_compact_images(self, batch) -> dict:
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = model.visual_tokenizer
        parameter = next(tokenizer.parameters())
        with torch.no_grad():
            tokens = tokenizer.tokenize(batch["pixel_values"].to(parameter.device, parameter.dtype),
                                        batch.get("image_keep_mask"))
        pad_token_id = getattr(model.config.text_config, "pad_token_id", None) or 0
        return expand_compact_images(batch, [ids.tolist() for ids in tokens.per_image()],
                                     tokens.keep_mask.to(batch["input_ids"].device), model.config, pad_token_id)

    def _has_compact_image_targets(self, batch) -> bool:
        """The model's own rule: a compact span whose `[IMG]` label is kept gets targets added in the forward."""
        config = getattr(self.model, "config", None)
        if "labels" not in batch or not hasattr(config, "image_start_token_id"):
            return False
        spans = find_image_spans(batch["input_ids"], batch.get("attention_mask"), config)
        compact = spans.lengths == 0
        return bool((compact & (batch["labels"][spans.rows, spans.starts] != -100)).any())

    # ------------------------------------------------------------------------------------------ optimizer

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.visual_learning_rate is None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            visual = any(f"{module}." in name for module in VISUAL_MODULES)
            key = (visual, name in decay_names)
            groups.setdefault(key, []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if decay else 0.0,
             "lr": self.visual_learning_rate if visual else self.args.learning_rate}
            for (visual, decay), params in sorted(groups.items())
        ]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        self._scale_visual_rows(model)
        return self.optimizer

    def _scale_visual_rows(self, model):
        """The visual rows live inside the LM's embedding and head matrices, so one parameter mixes both learning
        rates; Adam's update does not scale with the gradient, so the rows' update is stretched after every step."""
        if self.is_deepspeed_enabled:
            logger.warning("DeepSpeed flattens parameters: the visual rows of the embedding and head train with the "
                           "LM learning rate (the visual modules keep visual_learning_rate)")
            return
        config = model.config
        ratio = self.visual_learning_rate / self.args.learning_rate
        first, last = config.text_vocab_size, config.visual_token_end
        weights = [module.weight for module in (model.get_input_embeddings(), model.get_output_embeddings())
                   if module is not None and module.weight.requires_grad]
        weights = list({id(weight): weight for weight in weights}.values())  # tied: once
        before: dict[int, torch.Tensor] = {}

        def save_rows(optimizer, args, kwargs):
            for weight in weights:
                before[id(weight)] = weight.detach()[first:last].clone()

        def stretch_rows(optimizer, args, kwargs):
            with torch.no_grad():
                for weight in weights:
                    rows = weight[first:last]
                    rows.copy_(before[id(weight)].lerp_(rows, ratio))

        self.optimizer.register_step_pre_hook(save_rows)
        self.optimizer.register_step_post_hook(stretch_rows)

    # ------------------------------------------------------------------------------------------ metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in self.logged_outputs:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    value = float(value.detach()) if torch.is_tensor(value) else float(value)
                    self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
                    self._metric_counts[name] = self._metric_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None):
        if "loss" in logs:  # training logs: add the window's averages
            for name, total in self._metric_sums.items():
                logs[name] = round(total / self._metric_counts[name], 6)
            self._metric_sums, self._metric_counts = {}, {}
        # figures that callbacks contribute are added before any callback runs `on_log`, so that every sink (the
        # console, logs.jsonl, TensorBoard, W&B...) sees them whatever the order of the callbacks
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "add_to_logs"):
                callback.add_to_logs(logs)
        super().log(logs, start_time)


class JsonlLoggerCallback(TrainerCallback):
    """Appends every log entry (with its step) as one JSON line to `<output_dir>/logs.jsonl`, flushed at once."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / "logs.jsonl", "a") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            handle.flush()


class BadRecordLoggerCallback(TrainerCallback):
    """Logs how many records were skipped next to the loss (`LaVITTrainer.log` calls `add_to_logs` before the log
    callbacks run, so the count reaches every sink)."""

    def __init__(self, *counters):
        self.counters = counters

    def add_to_logs(self, logs: dict):
        if "loss" in logs:
            logs["skipped_records"] = sum(counter.total for counter in self.counters)


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


@contextmanager
def whole_weights(training_args):
    """
    Models loaded inside keep all their weights on every rank, even under ZeRO-3. Under ZeRO-3 `from_pretrained`
    partitions parameters as it creates them (`deepspeed.zero.Init`); assembling LaVIT from a visual tokenizer and a
    text LM copies weights between models, which partitioned parameters do not hold. The `Trainer` partitions the
    assembled model. The process group is started first, as `deepspeed.zero.Init` does when it is in use.
    """
    training_args.device  # noqa: B018 (sets up the process group: torchrun/accelerate/deepspeed launchers)
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def latest_checkpoint(output_dir) -> str | None:
    """The newest *complete* checkpoint in `output_dir` (a crash while saving leaves a folder without
    `trainer_state.json`, written last; such folders are skipped, so the previous checkpoint is not lost)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = []
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and (folder / "trainer_state.json").exists():
            complete.append((int(step), folder))
        elif step.isdigit():
            logger.warning(f"ignoring the incomplete checkpoint {folder} (no trainer_state.json)")
    return str(max(complete)[1]) if complete else None


def resolve_resume(resume_from_checkpoint, output_dir) -> str | None:
    """`"auto"`/`True`: the latest complete checkpoint (or a fresh start); a path: that checkpoint; else None."""
    if resume_from_checkpoint in (None, False, "", "no", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "auto", "true", "True"):
        return latest_checkpoint(output_dir)
    if not (Path(resume_from_checkpoint) / "trainer_state.json").exists():
        raise FileNotFoundError(f"{resume_from_checkpoint} is not a complete checkpoint (no trainer_state.json)")
    return str(resume_from_checkpoint)


def save_final(trainer: Trainer, output_dir, processor=None, merge_adapters: bool = False) -> Path:
    """Saves the trained model (and processor) as a Hub-ready folder `output_dir/final`, written to a temporary folder
    first and renamed in one step, so a crash never leaves a half-written model. `merge_adapters` merges LoRA adapters
    (`merge_and_unload`) so that the folder is a plain checkpoint."""
    final_dir = Path(output_dir) / "final"
    staging_dir = Path(output_dir) / "final.tmp"
    if trainer.is_world_process_zero() and staging_dir.exists():
        shutil.rmtree(staging_dir)
    trainer.accelerator.wait_for_everyone()
    if merge_adapters:
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(staging_dir)
    else:
        trainer.save_model(str(staging_dir))  # gathers ZeRO-3 shards; only the main process writes
    if trainer.is_world_process_zero():
        if processor is not None:
            processor.save_pretrained(staging_dir)
        (staging_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a Hub folder
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging_dir, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def train_and_save(model, processor, training_args, dataset, collator, counters=(), resume="auto",
                   visual_learning_rate=None, callbacks=(), merge_adapters=False) -> Path:
    """The common end of the LM stages: a `LaVITTrainer` with JSONL and skipped-record logging, training resumed
    from the latest complete checkpoint when asked, and the final Hub-ready folder."""
    trainer = LaVITTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        visual_learning_rate=visual_learning_rate,
        callbacks=[JsonlLoggerCallback(), BadRecordLoggerCallback(*counters), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resolve_resume(resume, training_args.output_dir))
    return save_final(trainer, training_args.output_dir, processor, merge_adapters=merge_adapters)
