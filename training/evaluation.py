"""Evaluation while training: the held-out records of every stage, the Trainer's evaluation settings, and the
task metrics of fine-tuning from generated answers.

Every stage takes `--eval_data` (any source `--data` takes) or `--eval_split_size` (a seeded held-out share of
`--data`) with the Trainer's own `--eval_strategy`, `--eval_steps`, `--per_device_eval_batch_size`,
`--metric_for_best_model`, `--greater_is_better`, `--load_best_model_at_end`, plus `--early_stopping_patience`
(transformers' `EarlyStoppingCallback`). What each stage adds to `eval_loss` comes from its trainer
(`LaVITTrainer.evaluation_statistics`); fine-tuning also generates answers for the held-out records
([`GenerationEvaluator`]) and scores them with the packaged `evaluate` modules (`lavit.evaluation.metric_path`).
"""

import logging
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
from transformers import EarlyStoppingCallback
from transformers.trainer_utils import IntervalStrategy, has_length

from .data import BadRecordCounter, BadRecordError, decode_image, load_records, training_records

logger = logging.getLogger(__name__)

# the generation settings of `lavit caption` and `lavit vqa` (their flags' defaults; a test keeps them equal)
CAPTION_GENERATION = {"num_beams": 2, "max_new_tokens": 36, "do_sample": False}
VQA_GENERATION = {"num_beams": 5, "max_new_tokens": 10, "length_penalty": 0.0, "do_sample": False}
# fine-tuning task -> the metric the best checkpoint is chosen by when a preset picks it
TASK_METRICS = {"caption": "caption_accuracy", "vqa": "vqa_accuracy", "chat": "loss"}


@dataclass
class StageRecords:
    """A stage's data ([`stage_records`]): the training records and their [`BadRecordCounter`], which the trainer
    fills from its batches, and the held-out records (None without `--eval_data` / `--eval_split_size`) and theirs."""

    records: object
    counter: BadRecordCounter
    held_out: object | None
    eval_counter: BadRecordCounter


def stage_records(script_args, seed: int, require_text: bool = True) -> StageRecords:
    """The one place a training stage reads its data: `--data` (at most `--max_samples` records, bad ones skipped and
    counted) and its held-out part ([`split_eval_records`]), each with its own counter."""
    counter = BadRecordCounter()
    records, held_out, eval_counter = split_eval_records(training_records(script_args, counter, require_text),
                                                         script_args, seed, require_text=require_text)
    return StageRecords(records, counter, held_out, eval_counter)


def split_eval_records(records, script_args, seed: int, require_text: bool = True):
    """
    The training records and the held-out ones: `--eval_data` loaded like `--data` (its bad records skipped and
    counted), or a seeded `--eval_split_size` share of `records`, or none.

    Returns:
        `(training records, held-out records or None, the held-out data's BadRecordCounter)`.
    """
    counter = BadRecordCounter()
    if script_args.eval_data and "eval_split_size" in (getattr(script_args, "preset_settings", None) or {}):
        script_args.eval_split_size = 0.0  # the preset's split gives way to the held-out data the run gave
    if script_args.eval_data and script_args.eval_split_size:
        raise ValueError("give --eval_data or --eval_split_size, not both")
    if script_args.eval_data:
        data = getattr(script_args, "data", None)
        if data and same_source(script_args.eval_data, data) and (script_args.eval_split or script_args.split) \
                == script_args.split:
            logger.warning(f"--eval_data {script_args.eval_data} is --data: the run evaluates on the records it trains "
                           f"on, so its held-out metrics do not measure generalisation (give other records, or "
                           f"--eval_split_size to hold out a share of --data)")
        held_out = load_records(script_args.eval_data, script_args.eval_split or script_args.split,
                                script_args.streaming, script_args.image_column, script_args.text_column,
                                require_text=require_text, counter=counter)
        if not has_length(held_out):
            # a streamed held-out set is read once, undecoded, into memory: every evaluation sees the same records,
            # and the Trainer shards it across processes like any map-style set
            held_out = datasets.Dataset.from_list(list(held_out))
        return records, held_out, counter
    if not script_args.eval_split_size:
        return records, None, counter
    if not has_length(records):
        raise ValueError("--eval_split_size holds out a share of --data, which a streamed dataset cannot do: give "
                         "--eval_data instead")
    size = script_args.eval_split_size
    size = int(size) if size >= 1 else size  # a share (0.2) or a count (100)
    held_out = size if size >= 1 else math.ceil(size * len(records))
    if not 1 <= held_out < len(records):  # both parts must hold a record
        raise ValueError(eval_split_problem(script_args, held_out, len(records)))
    parts = records.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"], counter


def same_source(first: str, second: str) -> bool:
    """Whether two `--data`-style sources name the same data: the same local path (however spelled: relative,
    absolute, through a link) or the same Hub name."""
    paths = [Path(source).expanduser() for source in (first, second)]
    if all(path.exists() for path in paths):
        return paths[0].resolve() == paths[1].resolve()
    return first.casefold() == second.casefold()  # Hub names are not case-sensitive


def eval_split_problem(script_args, held_out: int, count: int) -> str:
    """Why `--eval_split_size` cannot split `count` records into `held_out` and the rest, and the fix: one line that
    says who asked for the split (the run, or its `--preset`)."""
    size = script_args.eval_split_size
    by_preset = (getattr(script_args, "preset", None) is not None
                 and "eval_split_size" not in getattr(script_args, "given_flags", ()))
    asker = f"--preset {script_args.preset} holds out" if by_preset else "--eval_split_size holds out"
    if count < 2:
        return (f"--data has {count} record(s), and {asker} a share of them for evaluation (--eval_split_size "
                f"{size}), which needs at least 2 (one to train on, one held out): give more records, or "
                f"--eval_split_size 0 (no held-out evaluation), or --eval_data PATH (held-out records of their own)")
    # a share rounds up (math.ceil): one close to 1 holds out every record; the largest that works, rounded down
    largest = math.floor((count - 1) / count * 10**4) / 10**4
    share = (f"a share of at most {largest:g} (a larger one rounds up to all {count})" if 0 < size < 1
             else "a share in (0, 1)")
    return (f"--eval_split_size {size} holds out {held_out} of the {count} records of --data"
            f"{' (set by --preset ' + script_args.preset + ')' if by_preset else ''}: give {share} or a "
            f"count in [1, {count - 1}] that leaves both parts a record, --eval_split_size 0 (no held-out "
            f"evaluation) or --eval_data PATH")


# what a run evaluates with held-out data; a preset's values of them go when the run has none (`--eval_split_size 0`)
EVALUATION_SETTINGS = {"eval_strategy": IntervalStrategy.NO, "load_best_model_at_end": False,
                       "early_stopping_patience": None, "metric_for_best_model": None}


def configure_evaluation(training_args, script_args, has_eval_data: bool) -> list:
    """
    Fills in the Trainer's evaluation settings for a run with held-out data (evaluate at every checkpoint unless
    `--eval_strategy` says otherwise; the best checkpoint by `--metric_for_best_model`, default the loss) and returns
    the callbacks it needs (early stopping).

    Raises:
        ValueError: evaluation settings without held-out data.
    """
    if not has_eval_data and getattr(script_args, "preset", None) is not None:
        given = getattr(script_args, "given_flags", frozenset())
        for setting, off in EVALUATION_SETTINGS.items():
            if setting not in given:  # filled in by the preset for the held-out data the run turned off
                setattr(script_args if hasattr(script_args, setting) else training_args, setting, off)
    asks = (training_args.eval_strategy != IntervalStrategy.NO or training_args.load_best_model_at_end
            or script_args.early_stopping_patience)
    if not has_eval_data:
        if asks:
            raise ValueError("--eval_strategy, --load_best_model_at_end and --early_stopping_patience need held-out "
                             "data: give --eval_data PATH or --eval_split_size 0.1")
        return []
    if training_args.eval_strategy == IntervalStrategy.NO:
        if "eval_strategy" in getattr(script_args, "given_flags", ()):
            raise ValueError("--eval_strategy no turns evaluation off, but the run holds out data for it "
                             "(--eval_data or --eval_split_size): leave out --eval_strategy no to evaluate, or the "
                             "held-out data to train on all of it")
        training_args.eval_strategy = IntervalStrategy(training_args.save_strategy.value)
        training_args.eval_steps = training_args.eval_steps or training_args.save_steps
    if training_args.metric_for_best_model is None and (training_args.load_best_model_at_end
                                                        or script_args.early_stopping_patience):
        training_args.metric_for_best_model = "loss"
    if training_args.metric_for_best_model is not None and training_args.greater_is_better is None:
        training_args.greater_is_better = not training_args.metric_for_best_model.endswith("loss")
    if not script_args.early_stopping_patience:
        return []
    return [EarlyStoppingCallback(script_args.early_stopping_patience)]


class GenerationEvaluator:
    """
    The task metric of fine-tuning from generated answers: the held-out records are cut into batches in data order,
    batch k answered by process k mod N with the generation settings of `lavit caption` / `lavit vqa`, the answers
    gathered, and every process scores them alike (so 2 processes give the values of 1). Caption: `caption_accuracy`
    (exact label, for captions that are class names) and `CIDEr` (pycocoevalcap with the Python PTB tokenizer);
    VQA: the official `vqa_accuracy`. Records without an image or an answer are skipped and counted
    (`generation_skipped_records`).

    Args:
        records: the held-out records (`image`, and `text` or `question`/`answer`); a streamed dataset is read anew
            at every evaluation.
        processor: the model's `LaVITProcessor`.
        task: `caption` or `vqa` (chat has no generated metric: its eval loss is the metric).
        batch_size: records per generation batch.
        max_samples: score only the first N held-out records.
    """

    def __init__(self, records, processor, task: str, batch_size: int = 8, max_samples: int | None = None):
        if task not in ("caption", "vqa"):
            raise ValueError(f"generated metrics exist for 'caption' and 'vqa', not {task!r}")
        self.records, self.processor, self.task = records, processor, task
        self.batch_size, self.max_samples = batch_size, max_samples
        self.counter = BadRecordCounter()  # the rows' counter already has these records: reported apart

    def usable(self) -> list[tuple[object, str, list[str]]]:
        """(image, prompt, references) of every held-out record that has them; the others counted."""
        from .sequences import VQA_TEMPLATE

        usable, self.counter = [], BadRecordCounter()
        for index, record in enumerate(islice(self.records, self.max_samples)):
            answer = record.get("text") if self.task == "caption" else record.get("answer")
            try:
                image = decode_image(record.get("image"), f"held-out record {index}")
            except BadRecordError as error:  # unreadable image: the record is skipped, as in training
                self.counter.skip("held-out records without image or answer", str(error))
                continue
            if not isinstance(answer, str) or not answer.strip():
                self.counter.skip("held-out records without image or answer", f"record {index}: no answer")
                continue
            prompt = self.processor.image_token + ("" if self.task == "caption" else
                                                   VQA_TEMPLATE.format(question=record.get("question", "")))
            # VQA: the human answers when the record has them, else its one answer counted as ten humans' (exact match)
            answers = record.get("answers") if self.task == "vqa" else None
            references = list(answers) if answers else [answer.strip()] * (10 if self.task == "vqa" else 1)
            usable.append((image, prompt, references))
        return usable

    def generate(self, model, batch) -> list[str]:
        settings = CAPTION_GENERATION if self.task == "caption" else VQA_GENERATION
        inputs = self.processor(images=[image for image, _, _ in batch], text=[prompt for _, prompt, _ in batch],
                                return_tensors="pt", padding=True).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, **settings)
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def __call__(self, model, accelerator) -> dict[str, float]:
        """Metrics (without prefix) of `model` on the held-out records; every process must call it."""
        import torch
        from accelerate.utils import gather_object

        from lavit.evaluation.metrics import load_metric

        # 1. This process's batches (batch k on process k mod N), answered without gradients.
        samples = self.usable()
        batches = [samples[start:start + self.batch_size] for start in range(0, len(samples), self.batch_size)]
        answered = []
        with torch.no_grad():
            for index in range(accelerator.process_index, len(batches), accelerator.num_processes):
                answered.append((index, self.generate(model, batches[index])))
        # 2. Every process gets every answer, in data order.
        if accelerator.num_processes > 1:
            answered = gather_object(answered)
        predictions = [text for _, texts in sorted(answered, key=lambda pair: pair[0]) for text in texts]
        references = [references for _, _, references in samples]
        if not predictions:
            return {"generation_skipped_records": self.counter.total}
        # 3. The packaged evaluate modules.
        if self.task == "vqa":
            metrics = load_metric("vqa_accuracy").compute(predictions=predictions, references=references)
        else:
            metrics = load_metric("caption_accuracy").compute(predictions=predictions, references=references)
            metrics["CIDEr"] = load_metric("coco_caption").compute(predictions=predictions, references=references,
                                                                   use_java=False)["CIDEr"]
        return {**metrics, "generation_skipped_records": self.counter.total}


def evaluation_card_rows(log_history: list[dict], best_checkpoint: str | None, task_type: str,
                         data_name: str) -> list[dict]:
    """Model-card rows (`lavit_run.json` "evaluation", rendered into the card's table and `model-index`) of the
    evaluation the final weights had: the best checkpoint's when one was restored, else the last."""
    evaluations = [entry for entry in log_history if any(key.startswith("eval_") for key in entry)]
    if not evaluations:
        return []
    entry = evaluations[-1]
    if best_checkpoint:
        best_step = int(best_checkpoint.rstrip("/").rsplit("-", 1)[-1])
        entry = next((row for row in evaluations if row.get("step") == best_step), entry)
    skipped = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_skipped_records"}
    return [{"metric": key.removeprefix("eval_"), "value": round(float(value), 4),
             "data": f"{data_name} (held out, step {entry.get('step')})", "task_type": task_type,
             "dataset_type": "custom", "dataset_name": data_name, "dataset_split": "held-out",
             "metric_type": key.removeprefix("eval_").lower()}
            for key, value in entry.items() if key.startswith("eval_") and key not in skipped]


def write_evaluation_rows(trainer, folder, data_name: str) -> None:
    """Adds the rows of [`evaluation_card_rows`] to `folder/lavit_run.json` (main process; nothing without an
    evaluation)."""
    from lavit.evaluation.runner import record_results

    rows = evaluation_card_rows(trainer.state.log_history, trainer.state.best_model_checkpoint,
                                getattr(trainer, "task_type", "image-to-text"), data_name)
    if rows and trainer.is_world_process_zero():
        record_results(folder, {"evaluation": rows})
