"""Zero-shot evaluation of a LaVIT model on a benchmark: batched generation with the official prompts and settings,
predictions appended to JSONL as they are made (resumable), data-parallel across `accelerate launch` processes, then
the metrics into `results.json` and model-card rows.

Protocol (official LaVIT `evaluate.py`, see docs/evaluation.md):
- caption: prompt = the image alone; beam search 2, 8..36 new tokens; the caption is cut at its first `.`.
- vqa: `"Question: {q} Answer:"` after the image; beam search 5, 2..10 new tokens, no length normalisation; the answer
  is the first line cut at `question:`, `Long answer:`, `,` and `.`, then LaVIT's answer rules
  (`answer_postprocess`). VizWiz first asks `'Is the question: "{q}" answerable?'` and answers `unanswerable` when
  the reply contains "no".
- text-to-image: the caption as the prompt, LM guidance 1.5, top-k 300, decoder guidance 1.5, 50 steps; officially
  the best of 4 images by CLIP similarity to the caption (`num_candidates=4` with a `clip_model`).

Sharding: the samples not yet in the predictions are cut into batches in data order and batch k runs on process
k mod N. Every prediction depends on its sample, the model and the settings only (text rows are independent of their
neighbours; text-to-image draws every caption's images from `seed` alone), so it is the same whatever the batching,
the number of processes or an interruption.

One bad sample costs only itself: a sample that cannot run (a missing, truncated or non-image file, a bad record, a
question past the model's context, ...) gets a failure line (`{"id", "error", "input"}`) instead of a prediction; a
batch that fails is run again one sample at a time, so only the culprit fails. The others are scored; `results.json`
lists the failed samples with their reasons (`"failed"`), and every later run into the same output tries them again.

Resuming: the output folder is a `lavit.resumable.ResumableOutput` of kind "evaluation": it records the model's
identity and the settings, and each prediction records its sample's input digest (`"input"`), so a rerun with another
model, other settings or other data is refused instead of mixed; one run writes to it at a time.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lavit.atomic import NotLavitFileError, write_json_recorded
from lavit.modeling.saving_lavit import loads_json
from lavit.modeling.validation_lavit import SEED, Choice, Range, check_fields
from lavit.resumable import (
    OutputLockedError,
    ResumableOutput,
    ResumeMismatchError,
    digest,
    model_fingerprint,
    register_resumable_output,
)

from .data import DatasetImage, EvalSample, check_sample, check_samples, load_image
from .metrics import caption_metrics, clip_score, clip_similarities, fid_score, vqa_metrics

RESULTS_FILE = "results.json"
PREDICTIONS_GLOB = "predictions-*.jsonl"
IMAGES_DIR = "images"

CAPTION_GENERATION = dict(num_beams=2, max_new_tokens=36, min_new_tokens=8, length_penalty=1.0,
                          repetition_penalty=1.0, do_sample=False)
VQA_GENERATION = dict(num_beams=5, max_new_tokens=10, min_new_tokens=2, length_penalty=0.0, early_stopping=True,
                      do_sample=False)
TEXT_TO_IMAGE_GENERATION = dict(guidance_scale=1.5, top_k=300, top_p=1.0, temperature=1.0,
                                decoder_guidance_scale=1.5, num_inference_steps=50)
VQA_PROMPT = "Question: {question} Answer:"
VIZWIZ_JUDGE_QUESTION = 'Is the question: "{question}" answerable?'

RESUMABLE_KIND = register_resumable_output(
    "evaluation", "lavit evaluate --output: predictions-*.jsonl (and images/), one line per sample, appended",
    files=(RESULTS_FILE,))
FRESH_HINT = "give another --output to start fresh (or remove this folder yourself)"

TASK_TYPES = {"caption": "image-to-text", "vqa": "visual-question-answering", "text-to-image": "text-to-image"}


@dataclass
class EvalConfig:
    """
    What to run: `task` (`caption`, `vqa`, `text-to-image`), `generation` (overrides of the official settings),
    `prompt` (caption: text after the image, official empty), `vqa_metric` (`vqa_accuracy`; `exact_match` for GQA),
    `vizwiz_two_stage`, `batch_size`, `seed` (text-to-image sampling, and the visual token selection of a tokenizer
    that samples it), `num_candidates` (text-to-image: images drawn per caption, the one closest to the caption
    under `clip_model` kept; official 4), and for text-to-image metrics `fid_features` (None: torchmetrics'
    Inception; a `.pth` of its weights; or a vision model path/Hub id) and `clip_model` (a CLIP path/Hub id; None
    skips CLIP score). `name`, `dataset_type`, `split` label the results and model-card rows.
    """

    task: str
    generation: dict = field(default_factory=dict)
    prompt: str = ""
    vqa_metric: str = "vqa_accuracy"
    vizwiz_two_stage: bool = False
    batch_size: int = 8
    seed: int = 0
    num_candidates: int = 1
    fid_features: str | None = None
    clip_model: str | None = None
    use_java: bool | None = None
    name: str = "custom"
    dataset_type: str = "custom"
    split: str | None = None

    # the declared range of every numeric or choice field (the `lavit evaluate` flags declare the same)
    field_ranges = {"task": Choice(tuple(TASK_TYPES)), "vqa_metric": Choice(("vqa_accuracy", "exact_match")),
                    "batch_size": Range(1, 2**20, integer=True), "seed": SEED,
                    "num_candidates": Range(1, 1024, integer=True)}

    def __post_init__(self):
        check_fields(self, self.field_ranges)
        if self.num_candidates < 1 or (self.num_candidates > 1 and not self.clip_model):
            raise ValueError(f"num_candidates must be 1, or more with a clip_model to pick among them; got "
                             f"{self.num_candidates} with clip_model={self.clip_model!r}")

    def generation_settings(self) -> dict:
        defaults = {"caption": CAPTION_GENERATION, "vqa": VQA_GENERATION,
                    "text-to-image": TEXT_TO_IMAGE_GENERATION}[self.task]
        settings = {**defaults, **self.generation}
        if "min_new_tokens" in settings and "max_new_tokens" in settings:  # a lower maximum lowers the minimum
            settings["min_new_tokens"] = min(settings["min_new_tokens"], settings["max_new_tokens"])
        return settings


# ------------------------------------------------------------------------------------------------ predictions file


def read_predictions(output_dir) -> dict[str, dict]:
    """Every prediction in `output_dir/predictions-*.jsonl`, keyed by id; a sample that failed has a record with an
    `"error"` instead (a prediction made by a later run wins over it, whichever file holds which). A last line cut
    short by a crash is ignored (its sample runs again); a broken line elsewhere raises a `ValueError` naming it."""
    records = {}
    for path in sorted(Path(output_dir).glob(PREDICTIONS_GLOB)):
        lines = path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = loads_json(line)
            except json.JSONDecodeError as error:
                if number == len(lines):  # the unterminated tail of an interrupted write
                    continue
                raise ValueError(f"{path}:{number} is not a JSON line: {error}") from error
            key = str(record["id"])
            if "error" not in record or "error" in records.get(key, {"error": None}):
                records[key] = record
    return records


class PredictionWriter:
    """Appends one JSON line per prediction, flushed and fsync'ed, so a crash loses at most the line being written
    (an unterminated tail left by an earlier crash is cut off first)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            content = self.path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(self.path, "r+b") as handle:
                    handle.truncate(content.rfind(b"\n") + 1)
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def sample_digest(sample: EvalSample) -> str:
    """What a prediction is made from: the id, the image (its content, the SHA-256 of its bytes: an image swapped in
    with its size and modification time set back is another image, the same bytes reached through a symlink or a
    moved folder the same image; a dataset row's image by its stored bytes (or its file's), column and index; an
    in-memory image by its pixels), the question and the prompt text."""
    image = sample.image
    if isinstance(image, str | os.PathLike):
        image = file_sha256(image) or str(Path(image).resolve())  # a missing file: its sample fails, named by path
    elif isinstance(image, DatasetImage):
        stored = image.load()
        stored = stored.get("bytes") or stored.get("path") if isinstance(stored, dict) else stored
        content = hashlib.sha256(stored).hexdigest() if isinstance(stored, bytes) else file_sha256(stored)
        image = [content, image.column, image.index]
    elif hasattr(image, "tobytes"):
        image = hashlib.sha256(image.tobytes()).hexdigest()
    return digest([sample.id, image, sample.question, sample.text])


def file_sha256(path) -> str | None:
    """The SHA-256 of the file at `path`; None when there is no such file (or `path` is not a path)."""
    if not isinstance(path, str | os.PathLike) or not Path(path).is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def pending_batches(samples: list[EvalSample], output_dir, batch_size: int) -> list[list[EvalSample]]:
    """The samples without a prediction in `output_dir` (failed ones are tried again), in data order, cut into
    batches. A prediction made from other input under the same id (another image, question or prompt) raises a
    `ResumeMismatchError`."""
    done = {key: record for key, record in read_predictions(output_dir).items() if "error" not in record}
    changed = [sample.id for sample in samples
               if sample.id in done and done[sample.id].get("input") != sample_digest(sample)]
    if changed:
        raise ResumeMismatchError(
            f"{len(changed)} prediction(s) in {output_dir} were made from other data under the same id (another "
            f"image, question or prompt), e.g. {changed[:3]}; {FRESH_HINT}")
    pending = [sample for sample in samples if sample.id not in done]
    return [pending[start:start + batch_size] for start in range(0, len(pending), batch_size)]


def output_fingerprint(model, processor, config: EvalConfig) -> dict:
    """What every prediction of an evaluation output depends on besides its sample: the model (weights and dtype),
    the processor and the settings that change predictions (not the batch size, nor the scoring options)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    return {
        "model": model_fingerprint(model),
        "processor": digest([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                             image_processor.to_dict() if image_processor is not None else None]),
        "settings": {"task": config.task, "generation": config.generation_settings(), "prompt": config.prompt,
                     "vizwiz_two_stage": config.vizwiz_two_stage, "seed": config.seed,
                     "num_candidates": config.num_candidates, "clip_model": config.clip_model},
    }


def has_predictions(output_dir: Path) -> bool:
    return any(path.stat().st_size > 0 for path in Path(output_dir).glob(PREDICTIONS_GLOB))


# ------------------------------------------------------------------------------------------------ generation


def caption_postprocess(text: str) -> str:
    """Official: stripped, cut at the first `.`."""
    return text.strip().split(".")[0].strip()


# LaVIT's VQA evaluation also drops these leading words from predictions and reads "I don't know" as unanswerable
ANSWER_PREFIXES = ("it's", "it is", "this is", "that is", "she's", "he is", "they are", "very", "for", "to", "in",
                   "on", "at", "a", "an", "the")


def answer_postprocess(text: str) -> str:
    """
    Official: the first line, cut at `question:`, `Long answer:`, `,` and `.`; then LaVIT's answer rules: leading
    `ANSWER_PREFIXES` words stripped, "i don't know..." and empty answers -> `unanswerable`, "nope" -> "no" (the
    official spaCy lemmatisation is not applied).
    """
    text = text.strip().split("\n")[0]
    for stop in ("question:", "Long answer:", ",", "."):
        text = text.split(stop)[0]
    text = text.strip()
    stripped = True
    while stripped:
        stripped = False
        for prefix in ANSWER_PREFIXES:
            if text.lower().startswith(prefix + " "):
                text, stripped = text[len(prefix) + 1:].lstrip(), True
    if not text or text.lower().startswith(("i don't know", "i do not know")):
        return "unanswerable"
    return "no" if text.lower() == "nope" else text


def generate_texts(model, processor, images: list, prompts: list[str], generation: dict, seed: int) -> list[str]:
    """One batch of image+text prompts (variable visual token counts, left-padded by the model) -> new text. A
    tokenizer that samples its selection draws each image's from `seed` alone: a sample scores the same in any batch,
    run and resume."""
    from lavit.command_inputs import per_image_selection

    images = [load_image(image) for image in images]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, **per_image_selection(model, inputs["pixel_values"], seed), **generation)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def predict_caption(model, processor, batch: list[EvalSample], config: EvalConfig, index: int) -> list[dict]:
    texts = generate_texts(model, processor, [sample.image for sample in batch],
                           [processor.image_token + config.prompt] * len(batch), config.generation_settings(),
                           config.seed)
    return [{"id": sample.id, "prediction": caption_postprocess(text), "raw": text}
            for sample, text in zip(batch, texts, strict=True)]


def predict_vqa(model, processor, batch: list[EvalSample], config: EvalConfig, index: int) -> list[dict]:
    images, settings = [sample.image for sample in batch], config.generation_settings()

    def ask(questions):
        prompts = [processor.image_token + VQA_PROMPT.format(question=question) for question in questions]
        return generate_texts(model, processor, images, prompts, settings, config.seed)

    answers = ask([sample.question for sample in batch])
    records = [{"id": sample.id, "question": sample.question, "prediction": answer_postprocess(answer), "raw": answer}
               for sample, answer in zip(batch, answers, strict=True)]
    if config.vizwiz_two_stage:
        judges = ask([VIZWIZ_JUDGE_QUESTION.format(question=sample.question) for sample in batch])
        for record, judge in zip(records, judges, strict=True):
            record["answerable_reply"] = judge
            if "no" in judge.lower():
                record["prediction"] = "unanswerable"
    return records


def image_file_name(sample_id: str) -> str:
    """A file name per id, one-to-one: an id that is not a plain file name (`/`, spaces, ...) gets a hash of itself
    after its cleaned form, so `a/b` and `a_b` never share a file."""
    name = re.sub(r"^\.|[^A-Za-z0-9._-]", "_", sample_id)  # no hidden files, no folders
    if name != sample_id:
        name = f"{name}-{hashlib.sha256(sample_id.encode()).hexdigest()[:12]}"
    return name + ".png"


def predict_image(model, processor, batch: list[EvalSample], config: EvalConfig, index: int,
                  output_dir=None) -> list[dict]:
    """Text-to-image through a `LaVITPipeline` (`model`): one image per caption, each drawn from `config.seed` alone
    (the same whatever the batch, the number of processes or a resume), saved as `images/<id>.png`
    (`image_file_name`)."""
    from lavit.atomic import save_png_atomically

    settings, candidates = config.generation_settings(), config.num_candidates
    texts = [sample.text or sample.references[0] for sample in batch]
    generator = torch.Generator(model.device).manual_seed(config.seed)  # one stream per image from it
    images = model(texts, generator=generator, num_images_per_prompt=candidates,
                   token_guidance_scale=settings.pop("guidance_scale", None),
                   guidance_scale=settings.pop("decoder_guidance_scale", None), **settings).images
    records = []
    for row, (sample, text) in enumerate(zip(batch, texts, strict=True)):
        options = images[row * candidates:(row + 1) * candidates]
        record = {"id": sample.id, "text": text, "image": f"{IMAGES_DIR}/{image_file_name(sample.id)}"}
        if candidates > 1:  # the official protocol: the candidate closest to its caption in CLIP space
            record["candidate_similarities"] = clip_similarities(options, [text] * candidates, config.clip_model)
            options = [options[max(range(candidates), key=record["candidate_similarities"].__getitem__)]]
        save_png_atomically(options[0], Path(output_dir) / record["image"])
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ running


def run_batches(model, processor, batches: list[tuple[int, list[EvalSample]]], config: EvalConfig, output_dir,
                process_index: int = 0, show_progress: bool = True) -> int:
    """Runs `(batch index, batch)` pairs, appending each prediction, or each sample's failure
    ([`predict_isolated`]), to `predictions-<process>.jsonl`; returns the number of samples run."""
    from tqdm.auto import tqdm

    total = sum(len(batch) for _, batch in batches)
    path = Path(output_dir) / f"predictions-{process_index:05d}.jsonl"
    with PredictionWriter(path) as writer, tqdm(total=total, desc=f"{config.name} {config.task}",
                                                disable=not show_progress) as progress:
        for index, batch in batches:
            inputs = {sample.id: sample_digest(sample) for sample in batch}
            for record in predict_isolated(model, processor, batch, config, index, output_dir):
                writer.write({**record, "input": inputs[record["id"]]})
            progress.update(len(batch))
    return total


def failure(sample: EvalSample, error: Exception) -> dict:
    """The record of a sample that could not run: its id and the one-line reason."""
    from lavit.command_inputs import debugging, one_line

    if debugging():  # LAVIT_DEBUG: the traceback instead
        raise error
    return {"id": sample.id, "error": one_line(error)}


def predict_isolated(model, processor, batch: list[EvalSample], config: EvalConfig, index: int,
                     output_dir) -> list[dict]:
    """
    The one way every task runs a batch so that a bad sample costs only itself: each sample is checked first
    ([`check_sample`]: its record, its image file, its question or caption); the rest run as one batch, and when
    that batch fails, again one sample at a time (a prediction does not depend on its batch), so only the sample
    the model cannot take (e.g. a question past its context) fails. Returns one record per sample, in batch order:
    a prediction or a `failure`.
    """
    predict = {"caption": predict_caption, "vqa": predict_vqa, "text-to-image": predict_image}[config.task]
    extra = {"output_dir": output_dir} if config.task == "text-to-image" else {}
    records, runnable = {}, []
    for sample in batch:
        try:
            check_sample(sample, config.task)
            runnable.append(sample)
        except Exception as error:
            records[sample.id] = failure(sample, error)
    groups = [runnable] if runnable else []
    while groups:
        group = groups.pop(0)
        try:
            records.update((record["id"], record) for record in predict(model, processor, group, config, index,
                                                                        **extra))
        except Exception as error:
            if len(group) == 1:
                records[group[0].id] = failure(group[0], error)
            else:
                groups = [[sample] for sample in group] + groups
    return [records[sample.id] for sample in batch]


def shard(batches: list, process_index: int, num_processes: int) -> list[tuple[int, list]]:
    """Batch k goes to process k mod `num_processes`; pairs keep the batch index."""
    return [(index, batch) for index, batch in enumerate(batches) if index % num_processes == process_index]


def distributed_state():
    """accelerate's `PartialState`; without CUDA, processes started by `accelerate launch --multi_gpu` (or torchrun)
    join over gloo on the CPU instead of each running alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def evaluate(model, processor, samples: list[EvalSample], config: EvalConfig, output_dir,
             show_progress: bool = True) -> dict | None:
    """
    Runs `config` on `samples` and scores them: predictions go to `output_dir/predictions-*.jsonl` (samples already
    there are skipped, so a crashed run resumes), metrics to `output_dir/results.json`. A sample that cannot run
    fails alone: it is listed with its reason in the results' `"failed"` and the others are scored
    ([`predict_isolated`]). Under `accelerate launch` each process runs its share of the batches; the main process
    merges and scores. Returns the results on the main process, None on the others.
    """
    state = distributed_state()
    check_samples(samples, config.task)
    output_dir = Path(output_dir)
    guard = ResumableOutput(output_dir, RESUMABLE_KIND, output_fingerprint(model, processor, config), FRESH_HINT,
                            has_content=has_predictions)
    # the main process locks the folder and checks what made it; every process learns the outcome (no rank waits
    # at a barrier for a rank that stopped)
    problem = None
    if state.is_main_process:
        try:
            guard.__enter__()
        except (ResumeMismatchError, OutputLockedError, NotLavitFileError) as error:
            problem = (type(error).__name__, str(error))
    problem = broadcast_from_main(problem, state)
    if problem is not None:
        raise {error.__name__: error for error in (ResumeMismatchError, OutputLockedError, NotLavitFileError)}[
            problem[0]](problem[1])
    try:
        batches = pending_batches(samples, output_dir, config.batch_size)
        state.wait_for_everyone()  # every process plans from the same predictions before any writes
        mine = shard(batches, state.process_index, state.num_processes)
        run_batches(model, processor, mine, config, output_dir, state.process_index,
                    show_progress and state.is_local_main_process)
        state.wait_for_everyone()
        results = score(samples, config, output_dir) if state.is_main_process else None
        state.wait_for_everyone()
    finally:
        guard.release()
    return results


def broadcast_from_main(value, state):
    """`value` of the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def score(samples: list[EvalSample], config: EvalConfig, output_dir) -> dict:
    """Merges the predictions of `output_dir`, computes the task's metrics over the samples that ran and writes
    `results.json`; `"count"` is the number scored, `"failed"` lists the others (`{"id", "error"}`, in data
    order)."""
    output_dir = Path(output_dir)
    records = read_predictions(output_dir)
    missing = [sample.id for sample in samples if sample.id not in records]
    if missing:
        raise ValueError(f"{len(missing)} sample(s) have no prediction in {output_dir}, e.g. {missing[:3]}")
    failed = [{"id": sample.id, "error": records[sample.id]["error"]} for sample in samples
              if "error" in records[sample.id]]
    samples = [sample for sample in samples if "error" not in records[sample.id]]
    samples_by_id = {sample.id: sample for sample in samples}
    if not samples:
        scores = {"metrics": {}, "unavailable": {"all": "every sample failed"}}
    elif config.task == "text-to-image":
        scores = image_metrics(samples, records, config, output_dir)
    elif not any(sample.references for sample in samples):
        scores = {"metrics": {}, "unavailable": {"all": "the data has no references (e.g. a test split)"}}
    else:
        predictions = {key: records[key]["prediction"] for key in samples_by_id}
        references = {key: sample.references for key, sample in samples_by_id.items()}
        scores = (caption_metrics(predictions, references, config.use_java) if config.task == "caption"
                  else vqa_metrics(predictions, references, config.vqa_metric))
    results = {
        "benchmark": config.name, "task": config.task, "dataset_type": config.dataset_type, "split": config.split,
        "count": len(samples), "failed": failed, **scores, "generation": config.generation_settings(),
        "evaluation": card_rows(scores["metrics"], config, len(samples)),
    }
    write_json_recorded(output_dir / RESULTS_FILE, results)
    return results


def image_metrics(samples: list[EvalSample], records: dict, config: EvalConfig, output_dir) -> dict:
    generated = [load_image(Path(output_dir) / records[sample.id]["image"]) for sample in samples]
    real = [load_image(sample.image) for sample in samples]
    metrics, unavailable = {"FID": fid_score(generated, real, config.fid_features)}, {}
    if config.clip_model:
        metrics["CLIP score"] = clip_score(generated, [records[sample.id]["text"] for sample in samples],
                                           config.clip_model)
    else:
        unavailable["CLIP score"] = "no CLIP model given (clip_model / --clip-model)"
    return {"metrics": metrics, "unavailable": unavailable}


def card_rows(metrics: dict[str, float], config: EvalConfig, count: int) -> list[dict]:
    """Model-card rows (`lavit_run.json` "evaluation"); the task/dataset fields become the card's `model-index`."""
    return [{"metric": name, "value": round(value, 2), "data": f"{config.name} ({count} samples, zero-shot)",
             "task_type": TASK_TYPES[config.task], "dataset_type": config.dataset_type, "dataset_name": config.name,
             "dataset_split": config.split, "metric_type": name.lower().replace(" ", "_")}
            for name, value in metrics.items()]


def record_results(model_folder, results: dict) -> Path:
    """Adds the results' card rows to `model_folder/lavit_run.json` (replacing rows of the same metric and data
    name), so `lavit export` renders them into the model card and its `model-index`."""
    from lavit.hub_cards.export import METADATA_FILE, read_metadata

    metadata = read_metadata(model_folder)
    new_rows = results["evaluation"]
    replaced = {(row["metric"], row.get("dataset_name")) for row in new_rows}
    kept = [row for row in metadata.get("evaluation", [])
            if (row.get("metric"), row.get("dataset_name")) not in replaced]
    metadata["evaluation"] = kept + new_rows
    path = Path(model_folder) / METADATA_FILE
    write_json_recorded(path, metadata)  # a crash or a full disk never leaves invalid JSON; lavit's marker records it
    return path


__all__ = ["EvalConfig", "answer_postprocess", "caption_postprocess", "evaluate", "pending_batches",
           "predict_isolated", "read_predictions", "record_results", "run_batches", "score", "shard"]
