"""The LaVIT `Trainer` subclasses (one per kind of stage), the toy VAE fit, and the final save every stage shares.

`LaVITTrainer` adds to `transformers.Trainer`:
- exact loss normalisation under gradient accumulation for compact image placeholders (whose targets the model
  adds after the Trainer counted the labels): the frozen visual tokenizer's selector runs before the count, the
  model's own expansion fills the spans, and the encoder's output goes on to the model (one encoder pass per image);
- parameter groups with their own learning rate for the visual modules and the visual rows of the embedding and
  head (paper: about 1e-4 for the visual part, 1e-5 for the LM);
- extra metrics from the model outputs (per-modality losses, visual tokenizer statistics), averaged between logs;
- the bad records met in the batches of all processes, logged as `skipped_records` and kept in checkpoints;
- evaluation on held-out data: the loss through the same `compute_loss`, the stage's own statistics summed over
  all processes (`evaluation_statistics`), and the metrics of an `evaluator` (fine-tuning: generated answers);
  the step of the best checkpoint logged when `load_best_model_at_end` restores it.
`LaVITTokenizerTrainer` (stage 1) switches VQ on at a step; `LaVITDetokenizerTrainer` tokenizes each batch with the
frozen visual tokenizer before the detokenizer's loss. Checkpoint completion and resume live in `training.checkpoints`.
"""

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lavit.modeling import LaVITTokenizerModel
from lavit.modeling.image_placeholders_lavit import (
    compact_image_targets,
    expand_image_placeholders,
    find_image_spans,
)
from lavit.modeling.kernels_lavit import register_liger_kernel
from lavit.modeling.modeling_lavit_tokenizer import kept_token_fields
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from transformers.training_args import OptimizerNames

from lavit.atomic import fresh_staging_folder, replace_folder

from .callbacks import DataEpochCallback, JsonlLoggerCallback, StopAtMaxStepsCallback, TrainingComplete
from .checkpoints import CheckpointCompletionCallback, check_extension_locks, resumable_run
from .data import BATCH_REASON, SKIPPED_FIELD, BadRecordCounter, BatchRecordCounts, WorkerBatches, epoch_seeded
from .evaluation import write_evaluation_rows

logger = logging.getLogger(__name__)

VISUAL_MODULES = ("visual_merger", "visual_projection")
# AdamW without compensation: with bf16 weights it becomes `kahan_adamw`
PLAIN_ADAMW = (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED)
# the private `Trainer` methods LaVIT overrides, each because no public hook reaches that point of the loop;
# `tests/training/test_training.py` checks that the list is complete and that the installed transformers calls them
PRIVATE_TRAINER_HOOKS = {
    "_get_num_items_in_batch": "the only point between fetching an accumulation step's batches and counting their "
                               "targets: compact images get their targets here (`compute_loss` comes after the count)",
    "_save_checkpoint": "transformers rotates old checkpoints inside it, before any `on_save` callback can mark the "
                        "new one complete; rotation is deferred to `CheckpointCompletionCallback`",
}
TOKENIZER_METRICS = ("reconstruction_loss", "keep_ratio_loss", "commitment_loss", "reconstruction_cosine",
                     "mean_keep_ratio", "codebook_usage", "perplexity")


class LaVITTrainer(Trainer):
    """
    Args (besides those of `transformers.Trainer`):
        visual_learning_rate (`float`, *optional*): learning rate of the visual modules (`visual_merger`,
            `visual_projection`) and of the `[IMG]`/`[/IMG]`/visual rows of the embedding and head; the LM keeps
            `args.learning_rate`. `None`: one learning rate for everything.
        logged_outputs (`tuple[str]`): scalar fields of the model output to log (averaged over the logging window).
        skip_counter ([`BadRecordCounter`], *optional*): receives, at every log, the bad records met so far in the
            batches of all processes (each batch carries its `skipped_records`, taken out before the model sees it).
        evaluator (`Callable`, *optional*): `(model, accelerator) -> {name: value}` metrics added to every
            evaluation (prefixed `eval_`), e.g. [`GenerationEvaluator`]; every process calls it.
        eval_skip_counter ([`BadRecordCounter`], *optional*): the held-out records skipped while loading; the
            evaluation adds those of its batches and logs the sum as `eval_skipped_records`.

    Checkpoints are crash-safe: a checkpoint gets `checkpoint_complete.json` (its files and sizes) after everything
    else, callbacks' files included, and older checkpoints are rotated out only after that, so a run killed at any
    instant keeps a complete checkpoint to resume from (see [`latest_checkpoint`]).
    """

    def __init__(self, *args, visual_learning_rate: float | None = None, logged_outputs=("text_loss", "image_loss"),
                 skip_counter: BadRecordCounter | None = None, evaluator=None,
                 eval_skip_counter: BadRecordCounter | None = None, eval_data_name: str = "held-out", **kwargs):
        self.visual_learning_rate = visual_learning_rate
        self.evaluator = evaluator  # (model, accelerator) -> {name: value}, called on every process
        self.eval_data_name = eval_data_name  # names the held-out data in the model card
        self.eval_skip_counter = eval_skip_counter if eval_skip_counter is not None else BadRecordCounter()
        self._eval_sums: dict[str, torch.Tensor] = {}
        self.logged_outputs = tuple(logged_outputs)
        self._metric_sums: dict[str, float] = {}
        self._metric_counts: dict[str, int] = {}
        self.skip_counter = skip_counter if skip_counter is not None else BadRecordCounter()
        # bad and used records of this process's batches (plus, on rank 0, those of the checkpoint resumed from)
        self.batch_records, self.eval_batch_records = BatchRecordCounts(), BatchRecordCounts()
        streamed = isinstance(kwargs.get("train_dataset"), torch.utils.data.IterableDataset)
        if streamed and kwargs.get("args") is not None and kwargs["args"].accelerator_config.dispatch_batches is None:
            # every process reads the stream itself: accelerate's dispatcher concatenates the batches of all
            # processes, which rows of different lengths (and the 0-d `skipped_records`) cannot be
            kwargs["args"].accelerator_config.dispatch_batches = False
        if kwargs.get("args") is not None and kwargs["args"].use_liger_kernel:
            check_liger_device(kwargs["args"].device)
            register_liger_kernel()  # the Trainer applies Liger by model type in `train()`: LaVIT's must be known
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None and (getattr(self.data_collator, "crop_scale", None) is not None
                                               or getattr(self.data_collator, "horizontal_flip", False)):
            # crops and mirrors drawn from each item's (seed, epoch, index), not from a worker's RNG
            self.train_dataset = epoch_seeded(self.train_dataset, self.args.seed)
        if streamed:  # whole batches per dataloader worker: the batches of the run without workers. A batch is
            # that of all processes: accelerate's IterableDatasetShard then hands each process its part of it
            processes = 1 if self.args.accelerator_config.split_batches else self.args.world_size
            self.train_dataset = WorkerBatches(self.train_dataset, self.args.train_batch_size * processes)
        if self.is_deepspeed_enabled:
            check_extension_locks()
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(DataEpochCallback(self.train_dataset))
        self.add_callback(StopAtMaxStepsCallback())  # a run resumed at its last step takes no step more
        self.add_callback(BatchRecordsCheckpointCallback(self))  # before the completion marker lists the files
        self.add_callback(CheckpointCompletionCallback())  # last: after every callback that writes into checkpoints

    def get_eval_dataloader(self, eval_dataset=None):
        # held-out batches show whole images: the collator's training augmentation (crops, flips) is left out
        collator = self.data_collator
        if hasattr(collator, "without_augmentation"):
            self.data_collator = collator.without_augmentation()
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    # ------------------------------------------------------------------------------------------ bad records

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            self.batch_records.take(batch)
        return batch_samples, num_items_in_batch

    def record_counts(self) -> tuple[int, int]:
        """(bad, used) records met so far by all processes (a collective call: every rank must make it)."""
        return self.batch_records.totals(self.accelerator)

    def check_records(self):
        """Stops the run (every rank) before anything final is saved when its batches held no usable record, or more
        bad records than the counter's share (`training.data.MAX_SKIPPED_SHARE`). The share is of what the batches
        met (both counts grow with every epoch read); records dropped while loading were checked against their
        table then (a short run reads a fraction of the data, so they are not compared with its batches)."""
        BatchRecordCounts.check(self.record_counts(), self.skip_counter.max_skipped_share, "training")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resumed = isinstance(resume_from_checkpoint, str) and self.is_world_process_zero()
        self.batch_records = BatchRecordCounts.load(resume_from_checkpoint) if resumed else BatchRecordCounts()
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        except TrainingComplete:
            result = self.end_completed_run()
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint:
            step = int(Path(self.state.best_model_checkpoint).name.rsplit("-", 1)[-1])
            # every sink (console, logs.jsonl, TensorBoard) says which checkpoint the final weights are
            self.log({"best_model_step": step, f"best_{self.args.metric_for_best_model}": self.state.best_metric})
        elif self.args.load_best_model_at_end and self.is_world_process_zero():
            # e.g. early stopping before the first checkpoint when checkpoints are rarer than evaluations: the
            # Trainer then keeps the last step's weights without a word
            logger.warning(f"--load_best_model_at_end: no checkpoint was saved at an evaluation before the run ended "
                           f"(step {self.state.global_step}; --save_steps {self.args.save_steps:g}, --eval_steps "
                           f"{self.args.eval_steps:g}), so the final weights are the last step's, not the best "
                           f"evaluation's; give --save_steps equal to --eval_steps to keep the best")
        return result

    def end_completed_run(self) -> TrainOutput:
        """The end of a run resumed from the checkpoint of its last step, whose model, optimizer and callbacks' state
        the `Trainer` has restored: what the `Trainer` does after its last step (the best checkpoint's weights when
        `load_best_model_at_end` asks for them, the callbacks' end of training: e.g. the EMA weights copied in), and
        no step more."""
        logger.info(f"the checkpoint of step {self.state.global_step} ends this run (max_steps "
                    f"{self.state.max_steps}): nothing left to train")
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()  # the Trainer's own end of training calls this private method too
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, 0.0, {})

    # ------------------------------------------------------------------------------------------ loss normalisation

    def _get_num_items_in_batch(self, batch_samples, device):
        # private (PRIVATE_TRAINER_HOOKS): the count of an accumulation step's targets, made before any forward
        compact = [self._has_compact_image_targets(batch) for batch in batch_samples]
        if any(compact) and (self.args.gradient_accumulation_steps > 1 or self.args.world_size > 1):
            # the targets of compact images are only known once the frozen selector has run: run the frozen encoder
            # and selector here and expand the batches in place with the model's own expansion, so the count, the
            # loss and the gradient are exact across micro-batches and devices. The batch carries the encoder's
            # output to the model, which does not run the encoder again. With one micro-batch on one device the
            # model's own mean is already exact.
            for index, batch in enumerate(batch_samples):
                if compact[index]:
                    batch.update(self._expand_compact_images(batch))
        elif any(compact):
            return None
        return super()._get_num_items_in_batch(batch_samples, device)

    def _expand_compact_images(self, batch) -> dict:
        """The batch with every image span expanded by the model's expansion (`expand_image_placeholders`: ids,
        targets, positions), `image_keep_mask`, and `image_patch_features`, the frozen encoder's output that the
        model then uses instead of running the encoder again."""
        model = self.accelerator.unwrap_model(self.model)
        visual_tokenizer, config = model.visual_tokenizer, model.config
        parameter = next(visual_tokenizer.parameters())
        with torch.no_grad():
            patch_features = visual_tokenizer.encode_image(batch["pixel_values"].to(parameter.device, parameter.dtype))
            patch_features = patch_features.last_hidden_state
            keep_log_probs, keep_weights = visual_tokenizer.select(patch_features, batch.get("image_keep_mask"))
            code_ids = visual_tokenizer.quantize(visual_tokenizer.merge(patch_features, keep_weights))
        kept = kept_token_fields(keep_log_probs, keep_weights)
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask", torch.ones_like(input_ids))
        expanded = expand_image_placeholders(
            input_ids, attention_mask, find_image_spans(input_ids, attention_mask, config),
            kept["token_counts"].to(input_ids.device), code_ids.to(input_ids.device),
            visual_token_offset=config.visual_token_offset, labels=batch["labels"],
            pad_token_id=getattr(config.text_config, "pad_token_id", None) or 0,
            position_ids=batch.get("position_ids"), padding_side="right",
        )
        fields = {"input_ids": expanded.input_ids, "labels": expanded.labels, "attention_mask": expanded.attention_mask,
                  "image_keep_mask": kept["keep_mask"], "image_patch_features": patch_features}
        if "position_ids" in batch:  # packed rows: their segments, restarting inside rows
            fields["position_ids"] = expanded.position_ids
        return fields

    def _has_compact_image_targets(self, batch) -> bool:
        """Whether the model will add targets to `batch` in its forward (the model's rule: `compact_image_targets`)."""
        config = getattr(self.model, "config", None)
        if "labels" not in batch or not hasattr(config, "image_start_token_id"):
            return False
        spans = find_image_spans(batch["input_ids"], batch.get("attention_mask"), config)
        return bool(compact_image_targets(spans, batch["labels"]).any())

    # ------------------------------------------------------------------------------------------ optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """transformers' optimizer for `args.optim`, except that bf16 trainable weights (`--dtype bfloat16`) with a
        plain AdamW (`adamw_torch`, `adamw_torch_fused`: the default) get [`kahan_adamw`]."""
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if model is None or args.optim not in PLAIN_ADAMW:
            return optimizer_cls, optimizer_kwargs
        if any(parameter.requires_grad and parameter.dtype == torch.bfloat16 for parameter in model.parameters()):
            return kahan_adamw(optimizer_kwargs)
        return optimizer_cls, optimizer_kwargs

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
        if not model.training:
            self._add_evaluation_statistics(loss, outputs, inputs)
        else:
            for name in self.logged_outputs:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    value = float(value.detach()) if torch.is_tensor(value) else float(value)
                    self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
                    self._metric_counts[name] = self._metric_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluation_statistics(self, loss, outputs, inputs) -> dict[str, tuple[float, float]]:
        """A held-out batch's statistics as `{name: (sum, count)}`, summed over batches and processes and reported
        as `sum / count`: here the loss and the logged outputs, weighted by the batch's rows."""
        rows = float(next(value for value in inputs.values() if torch.is_tensor(value)).shape[0])
        statistics = {"loss": (float(loss) * rows, rows)}
        for name in self.logged_outputs:
            value = outputs.get(name) if hasattr(outputs, "get") else None
            if value is not None:
                statistics[name] = (float(value) * rows, rows)
        return statistics

    def _add_evaluation_statistics(self, loss, outputs, inputs):
        for name, values in self.evaluation_statistics(loss, outputs, inputs).items():
            values = torch.tensor(values, dtype=torch.float64)
            self._eval_sums[name] = self._eval_sums[name] + values if name in self._eval_sums else values

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of a held-out batch through `compute_loss` (the stage's own inputs: VQ switch, frozen
        tokenizer); no logits are kept. The batch's bad records are counted."""
        self.eval_batch_records.take(inputs)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach().mean(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums, self.eval_batch_records = {}, BatchRecordCounts()
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        # 1. The statistics of all processes' batches: sums first, one division at the end.
        names = sorted(self._eval_sums)
        totals = torch.stack([self._eval_sums[name] for name in names]) if names else torch.zeros(0, 2)
        skipped_here = torch.tensor([float(self.eval_batch_records.skipped)], dtype=torch.float64)
        totals = torch.cat([totals.flatten(), skipped_here])
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
        for index, name in enumerate(names):
            output.metrics[f"{metric_key_prefix}_{name}"] = float(totals[2 * index] / totals[2 * index + 1])
        # 2. The evaluator's metrics (generated answers), and the bad held-out records.
        skipped = self.eval_skip_counter.total + int(totals[-1])
        if self.evaluator is not None:
            model = self.accelerator.unwrap_model(self.model)
            metrics = self.evaluator(model, self.accelerator)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        output.metrics[f"{metric_key_prefix}_skipped_records"] = skipped
        return output

    def log(self, logs: dict, start_time=None):
        if "loss" in logs:  # training logs: add the window's averages
            for name, total in self._metric_sums.items():
                logs[name] = round(total / self._metric_counts[name], 6)
            self._metric_sums, self._metric_counts = {}, {}
            self.skip_counter.set_count(BATCH_REASON, self.record_counts()[0])
            # set here, before any callback runs: every sink (logs.jsonl, TensorBoard, W&B, log_history) gets it
            logs[SKIPPED_FIELD] = self.skip_counter.total
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        # private (PRIVATE_TRAINER_HOOKS): old checkpoints are rotated out by CheckpointCompletionCallback, once the
        # new one is complete
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit


class BatchRecordsCheckpointCallback(TrainerCallback):
    """Keeps the record counts of the training batches in every checkpoint (`BatchRecordCounts.FILE`): every process
    takes part in the sum, the main one writes. A resumed run starts from them (`LaVITTrainer.train`)."""

    def __init__(self, trainer: LaVITTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        totals = self.trainer.record_counts()
        if args.should_save:
            BatchRecordCounts.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", totals)


class LaVITTokenizerTrainer(LaVITTrainer):
    """Stage-1 trainer: the loss of eq. 4, VQ switched on at `quantizer_start_step`, visual tokenizer statistics
    logged."""

    task_type = "image-feature-extraction"

    def __init__(self, *args, quantizer_start_step: int = 0, **kwargs):
        self.quantizer_start_step = quantizer_start_step
        super().__init__(*args, logged_outputs=TOKENIZER_METRICS, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_quantizer": self.state.global_step >= self.quantizer_start_step}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluation_statistics(self, loss, outputs, inputs) -> dict[str, tuple[float, float]]:
        """Reconstruction cosine and keep ratio per image; the codebook's usage and perplexity come from the codes
        of the whole held-out set (a batch's own would depend on how the set is cut into batches)."""
        statistics = super().evaluation_statistics(loss, outputs, inputs)
        statistics.pop("codebook_usage", None), statistics.pop("perplexity", None)
        if outputs.code_ids is not None:
            size = self.accelerator.unwrap_model(self.model).config.codebook_size
            counts = torch.bincount(outputs.code_ids.detach().flatten().cpu(), minlength=size).double()
            self._code_counts = counts if self._code_counts is None else self._code_counts + counts
        return statistics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._code_counts = None
        config = self.accelerator.unwrap_model(self.model).config
        # held-out statistics with the deterministic selection (p_keep > threshold): a sampling selection would
        # draw other patches at every evaluation and in every process layout
        mode, config.selection_mode = config.selection_mode, "deterministic"
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            config.selection_mode = mode
        size = config.codebook_size
        counts = self._code_counts if self._code_counts is not None else torch.zeros(size, dtype=torch.float64)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum").cpu()
        if counts.sum() > 0:
            probs = counts / counts.sum()
            entropy = -(probs * torch.log(probs.clamp(min=1e-10))).sum()
            output.metrics[f"{metric_key_prefix}_codebook_usage"] = float((counts > 0).double().mean())
            output.metrics[f"{metric_key_prefix}_perplexity"] = float(torch.exp(entropy))
        return output


class LaVITDetokenizerTrainer(LaVITTrainer):
    """Tokenizes each batch with the frozen visual tokenizer (outside the trained model, so DDP/DeepSpeed never wrap
    it), then trains the detokenizer on the codes."""

    task_type = "text-to-image"

    def __init__(self, *args, visual_tokenizer: LaVITTokenizerModel, **kwargs):
        super().__init__(*args, logged_outputs=(), **kwargs)
        self.visual_tokenizer = visual_tokenizer.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs.pop("tokenizer_pixel_values")
        if self.visual_tokenizer.device != pixel_values.device:
            self.visual_tokenizer.to(pixel_values.device)
        with torch.no_grad():
            tokens = self.visual_tokenizer.tokenize(pixel_values.to(self.visual_tokenizer.dtype))
        inputs = {**inputs, "code_ids": tokens.code_ids, "token_counts": tokens.token_counts}
        if not model.training:
            inputs.update(self._held_out_draw(tokens, pixel_values, inputs["pixel_values"].shape))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _held_out_draw(self, tokens, pixel_values, target_shape) -> dict:
        """Evaluation: noise and timesteps drawn from the seed and the batch's place (the same held-out loss run to
        run), and the cosine of the features the detokenizer reconstructs from the codes to the encoder's."""
        detokenizer = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            target = self.visual_tokenizer.encode_patches(pixel_values.to(self.visual_tokenizer.dtype))
            reconstructed = detokenizer.reconstruct_features(tokens.code_ids, tokens.token_counts)
        cosine = F.cosine_similarity(reconstructed.float(), target.float(), dim=-1).mean(dim=1)  # (B,)
        self._feature_cosine = float(cosine.sum())
        generator = torch.Generator().manual_seed(self.args.seed + self._eval_batches)
        self._eval_batches += 1
        factor = detokenizer.vae_scale_factor
        shape = (target_shape[0], detokenizer.vae.config.latent_channels, target_shape[2] // factor,
                 target_shape[3] // factor)
        steps = detokenizer.scheduler.config.num_train_timesteps
        device = tokens.code_ids.device
        return {"noise": torch.randn(shape, generator=generator).to(device),
                "timesteps": torch.randint(0, steps, (shape[0],), generator=generator).to(device)}

    def evaluation_statistics(self, loss, outputs, inputs) -> dict[str, tuple[float, float]]:
        statistics = super().evaluation_statistics(loss, outputs, inputs)
        statistics["reconstruction_cosine"] = (self._feature_cosine, float(len(inputs["token_counts"])))
        return statistics

    def evaluation_loop(self, *args, **kwargs):
        self._eval_batches = 0
        return super().evaluation_loop(*args, **kwargs)


def check_liger_device(device: torch.device) -> None:
    """Liger's kernels are Triton kernels: a CUDA (or ROCm, XPU, NPU) device, or Triton's interpreter
    (`TRITON_INTERPRET=1`, slow, for tests) on the CPU. Raises `ValueError` with the fix otherwise."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--use_liger_kernel needs a GPU: Liger's kernels are Triton kernels, which do not run on the "
                         "CPU; drop --use_liger_kernel there")


def kahan_adamw(optimizer_kwargs: dict) -> tuple[type, dict]:
    """AdamW for bf16 weights: torch-optimi's, whose updates are summed with Kahan compensation (a bf16 buffer per
    weight keeps what rounding dropped), as pure-bf16 training needs: bf16 keeps 8 bits of mantissa, so a plain
    AdamW rounds away every update below about 1/256 of its weight. `optimizer_kwargs`: transformers' AdamW
    settings (lr, betas, eps); weight decay comes with the parameter groups, decoupled as in `torch.optim.AdamW`.

    Raises:
        ImportError: torch-optimi is not installed (`pip install "lavit[bf16]"`).
    """
    try:
        from optimi import AdamW
    except ImportError as error:
        raise ImportError("--dtype bfloat16 trains with torch-optimi's Kahan-summed AdamW: pip install "
                          "'lavit[bf16]' (or choose another --optim)") from error
    settings = {name: optimizer_kwargs[name] for name in ("lr", "betas", "eps") if name in optimizer_kwargs}
    return AdamW, {**settings, "kahan_sum": True}


def fit_vae(vae, dataset, collate_fn, steps: int, batch_size: int, learning_rate: float = 1e-3,
            kl_weight: float = 1e-6) -> list[float]:
    """Trains `vae` as an autoencoder of the dataset's images (`collate_fn` turns a list of them into the VAE's
    input) with reconstruction MSE + a small KL term, and freezes it again; returns the losses. A plain loop: a few
    hundred steps on small images."""
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    losses = []
    progress = tqdm(total=steps, desc="fitting the VAE", unit="step")  # minutes on a CPU: never silent
    while len(losses) < steps:
        for batch in loader:
            pixel_values = batch.to(vae.device, vae.dtype)
            posterior = vae.encode(pixel_values).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(reconstruction, pixel_values) + kl_weight * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            progress.update()
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if len(losses) == steps:
                break
    progress.close()
    vae.requires_grad_(False).eval()
    return losses


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


def save_final(trainer: Trainer, output_dir, processor=None, merge_adapters: bool = False, convert=None) -> Path:
    """Saves the trained model (and processor) as a Hub-ready folder `output_dir/final`, written to a temporary folder
    first and swapped in (`lavit.atomic.replace_folder`), so `final` always holds a whole model, old or new.
    `merge_adapters` merges LoRA adapters (`merge_and_unload`) so that the folder is a plain checkpoint;
    `convert(saved, folder)` (main process) writes `folder` in another layout (stage 3: a pipeline's) from the model
    saved in `saved` (gathered whole, ZeRO-3 included), a staging sibling of `final` deleted afterwards."""
    if isinstance(trainer, LaVITTrainer):
        trainer.check_records()  # a run that trained on nothing, or on too little of its data, saves no model
    final_dir = Path(output_dir) / "final"
    staging_dir = fresh_staging_folder(final_dir) if trainer.is_world_process_zero() else final_dir.with_name(
        "final.tmp")
    trainer.accelerator.wait_for_everyone()
    if merge_adapters:
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(staging_dir)
    elif convert is not None:
        # the trained model goes to a sibling staging folder: a folder is never saved into one holding its source
        trained_dir = fresh_staging_folder(final_dir.with_name("final-trained")) if trainer.is_world_process_zero() \
            else final_dir.with_name("final-trained.tmp")
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(trained_dir))  # gathers ZeRO-3 shards; only the main process writes
        if trainer.is_world_process_zero():
            with whole_weights(trainer.args):  # loaded on this rank alone: never partitioned by ZeRO-3
                convert(trained_dir, staging_dir)
            shutil.rmtree(trained_dir)  # lavit's own staging folder, made just above
    else:
        trainer.save_model(str(staging_dir))  # gathers ZeRO-3 shards; only the main process writes
    if trainer.is_world_process_zero():
        if processor is not None:
            processor.save_pretrained(staging_dir)
        write_evaluation_rows(trainer, staging_dir, Path(str(getattr(trainer, "eval_data_name", "held-out"))).name)
        (staging_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a Hub folder
        replace_folder(staging_dir, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def train_and_save(model, processor, training_args, dataset, collator, counter, script_args,
                   visual_learning_rate=None, callbacks=(), merge_adapters=False, evaluation=None) -> Path:
    """The common end of the LM stages: a `LaVITTrainer` with JSONL and skipped-record logging (`counter`: the
    records skipped while loading; those of the batches are added to it), training resumed as `script_args.resume`
    asks (in an output folder tied to this run, see [`resumable_run`]), and the final Hub-ready folder.
    `evaluation`: the trainer's held-out arguments (`eval_dataset`, `evaluator`, `eval_skip_counter`), when the run
    has held-out data."""
    trainer = LaVITTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        visual_learning_rate=visual_learning_rate,
        skip_counter=counter,
        callbacks=[JsonlLoggerCallback(), *callbacks],
        **(evaluation or {}),
    )
    with resumable_run(script_args, training_args) as resume:
        trainer.train(resume_from_checkpoint=resume)
        return save_final(trainer, training_args.output_dir, processor, merge_adapters=merge_adapters)
