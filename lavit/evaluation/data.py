"""Readers of the benchmark annotation formats the paper evaluates on, from local files, and of any `datasets`
dataset whose columns are mapped to roles. Every reader returns a list of [`EvalSample`] in file order.

- `coco`: COCO caption JSON (`images` + `annotations`): COCO captions, NoCaps (`nocaps_val_4500_captions.json`).
- `karpathy`: Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`) or the LAVIS/LaVIT list form
  (`[{"image", "caption"}]`: `coco_karpathy_test.json`, `coco_t2i_eval.json`): COCO Karpathy test, Flickr30k, COCO
  text-to-image.
- `vqav2`: VQA questions JSON + annotations JSON: VQAv2, OK-VQA.
- `gqa`: GQA balanced questions JSON (`testdev_balanced_questions.json`).
- `vizwiz`: VizWiz VQA JSON (`val.json`).
- `datasets`: a Hub id, a folder for `load_dataset` or a `save_to_disk` folder, with `columns` mapped to roles.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavit.modeling.saving_lavit import loads_json

logger = logging.getLogger(__name__)


@dataclass
class EvalSample:
    """
    One evaluation item. `id` is unique within a benchmark (the key of predictions); `image` is a path or a PIL
    image (the input image, or the real image of a text-to-image prompt); `question` is set for VQA; `references`
    holds the human captions (captioning) or the human answers (VQA; empty when the split has no answers); `text` is
    the prompt of text-to-image. `problem` says why a bad record cannot be evaluated (a caption that is not text,
    ...): the sample is then reported as failed with it, and the others are still evaluated ([`check_sample`]).
    """

    id: str
    image: Any = None
    question: str | None = None
    references: list[str] = field(default_factory=list)
    text: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class DatasetImage:
    """The image of row `index` of a `datasets` dataset whose image column is not decoded (`Image(decode=False)`):
    `load()` gives its `{"bytes", "path"}`, which lavit's one image reader decodes."""

    dataset: Any
    column: str
    index: int

    def load(self):
        return self.dataset[self.index][self.column]

    def __str__(self) -> str:
        return f"row {self.index} of column {self.column!r}"


def load_image(image):
    """A sample's image (path, PIL image or [`DatasetImage`]) -> an RGB PIL image; unreadable files raise a
    `ValueError` naming them."""
    from lavit.processing.image_processing_lavit import to_rgb_image

    if isinstance(image, DatasetImage):
        stored = image.load()
        image = stored.get("bytes") or stored.get("path") if isinstance(stored, dict) else stored
    return to_rgb_image(image, name=str(image) if isinstance(image, str | os.PathLike) else "image")


def sample_key(value, where: str = "an id") -> str:
    """The one form of an id: ids are matched between files (a caption's `image_id` to an image's `id`) and to
    predictions as text, so `1`, `1.0` and `"1"` are the same id whichever file writes which. Any other value (a
    fraction, a float past 2**53, where JSON numbers stop holding every integer, a bool, a list, null) is refused
    with a `ValueError` naming `where` (e.g. `file: annotations[3]`)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)  # beyond 2**53 a float is not the integer the file wrote: refused below
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise ValueError(f"{where}: an id must be an integer or a string, got {value!r:.80}: fix the file")


class UnmatchedRecordsError(ValueError):
    """Records of one file that match no record of the other (a caption of no image, an answer of no question)."""


def check_matched(unmatched: dict[str, list], where: str, allow_unmatched: bool = False) -> None:
    """The rule of every join of annotation files (captions to images, answers to questions): `unmatched` maps a
    description of each side's unmatched records to their ids. Any unmatched record stops the load with one line
    counting each side ([`UnmatchedRecordsError`]): a metric on the matched rest would silently be computed on
    fewer samples. With `allow_unmatched` (`lavit evaluate --allow-unmatched`) they are dropped, with a warning
    giving the counts."""
    found = {what: keys for what, keys in unmatched.items() if keys}
    if not found:
        return
    summary = "; ".join(f"{len(keys)} {what} (e.g. {keys[:3]})" for what, keys in found.items())
    if not allow_unmatched:
        raise UnmatchedRecordsError(f"{where}: {summary}; a metric on the rest would silently count fewer "
                                    f"samples: fix the file, or pass --allow-unmatched to drop them")
    logger.warning(f"{where}: dropped {summary} (--allow-unmatched)")


def _load_json(path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return loads_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
                         f"save it as UTF-8") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing} (has {sorted(record)})")


def _image_path(images_dir, relative: str) -> str:
    return os.path.join(images_dir, relative) if images_dir is not None else relative


def read_coco_captions(annotations, images_dir=None, allow_unmatched: bool = False) -> list[EvalSample]:
    """COCO caption JSON (`{"images": [{id, file_name}], "annotations": [{image_id, caption}]}`): one sample per
    image with its captions, id = the image id. A caption of no image, or an image without captions, stops the load
    ([`check_matched`])."""
    data = _load_json(annotations)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations} is not a COCO caption file ('images' and 'annotations' expected)")
    captions: dict[Any, list[str]] = {}
    problems: dict[str, str] = {}  # a bad caption fails its image's sample only
    for index, annotation in enumerate(data["annotations"]):
        _require(annotation, ("image_id", "caption"), f"{annotations}: annotations[{index}]")
        key = sample_key(annotation["image_id"], f"{annotations}: annotations[{index}].image_id")
        captions.setdefault(key, []).append(annotation["caption"])
        if not isinstance(annotation["caption"], str):
            problems.setdefault(key, f"{annotations}: annotations[{index}]: the caption must be a string, got "
                                     f"{annotation['caption']!r:.80}: fix the file")
    samples = []
    for index, image in enumerate(data["images"]):
        _require(image, ("id", "file_name"), f"{annotations}: images[{index}]")
        key = sample_key(image["id"], f"{annotations}: images[{index}].id")
        samples.append(EvalSample(key, _image_path(images_dir, image["file_name"]),
                                  references=[] if key in problems else captions.get(key, []),
                                  problem=problems.get(key)))
    image_ids = {sample.id for sample in samples}
    check_matched({"caption(s) whose image_id matches no image": [key for key in captions if key not in image_ids],
                   "image(s) without any caption": [sample.id for sample in samples
                                                    if not sample.references and not sample.problem]},
                  str(annotations), allow_unmatched)
    return [sample for sample in samples if sample.references or sample.problem]


def read_karpathy(annotations, images_dir=None, split: str | None = "test") -> list[EvalSample]:
    """
    Karpathy split JSON (`{"images": [{filepath?, filename, split, sentences: [{raw}], cocoid|imgid}]}`, the `split`
    images; id = `cocoid`, else `imgid`) or the LAVIS/LaVIT list form (`[{"image": path, "caption": str | [str]}]`
    or `"text"` instead of `"caption"`; id = `image_id`, else the image file name without extension).
    """
    data = _load_json(annotations)
    if isinstance(data, dict) and "images" in data:
        samples = []
        for index, image in enumerate(data["images"]):
            _require(image, ("filename", "sentences", "split"), f"{annotations}: images[{index}]")
            if split is not None and image["split"] != split and not (split == "train" and image["split"] == "restval"):
                continue
            key = image.get("cocoid", image.get("imgid", Path(image["filename"]).stem))
            relative = os.path.join(image.get("filepath", ""), image["filename"])
            samples.append(EvalSample(str(key), _image_path(images_dir, relative),
                                      references=[sentence["raw"] for sentence in image["sentences"]]))
        if not samples:
            splits = sorted({image.get("split") for image in data["images"]})
            raise ValueError(f"{annotations} has no images in split {split!r} (splits: {splits})")
        return samples
    if not isinstance(data, list):
        raise ValueError(f"{annotations} is neither a Karpathy split file ('images') nor a list of records")
    samples = []
    for index, record in enumerate(data):
        _require(record, ("image",), f"{annotations}[{index}]")
        captions = record.get("caption", record.get("text"))
        captions = [captions] if isinstance(captions, str) else captions
        problem = None  # a bad record fails its own sample only
        if captions is None:
            problem = f"{annotations}[{index}] has neither 'caption' nor 'text': fix the file"
        elif not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
            problem = (f"{annotations}[{index}]: the caption must be a string or a list of strings, got "
                       f"{captions!r:.80}: fix the file")
        key = record.get("image_id", Path(str(record["image"])).stem)
        samples.append(EvalSample(str(key), _image_path(images_dir, record["image"]),
                                  references=[] if problem else captions, problem=problem))
    return samples


def read_vqav2(questions, annotations=None, images_dir=None, image_pattern: str | None = None,
               allow_unmatched: bool = False) -> list[EvalSample]:
    """
    VQAv2 / OK-VQA: the questions JSON (`{"questions": [{question_id, image_id, question}], "data_subtype"}`) and,
    when given, the annotations JSON (`{"annotations": [{question_id, answers: [{answer}]}]}`). Image files are
    `image_pattern.format(image_id=...)`, by default `COCO_{data_subtype}_{image_id:012d}.jpg`.
    """
    data = _load_json(questions)
    if not isinstance(data, dict) or "questions" not in data:
        raise ValueError(f"{questions} is not a VQA questions file ('questions' expected)")
    if image_pattern is None:
        if "data_subtype" not in data:
            raise ValueError(f"{questions} has no 'data_subtype': give image_pattern, e.g. "
                             f"'COCO_val2014_{{image_id:012d}}.jpg'")
        image_pattern = f"COCO_{data['data_subtype']}_{{image_id:012d}}.jpg"
    answers: dict[Any, list[str]] = {}
    if annotations is not None:
        for index, annotation in enumerate(_load_json(annotations).get("annotations", [])):
            _require(annotation, ("question_id", "answers"), f"{annotations}: annotations[{index}]")
            answers[sample_key(annotation["question_id"], f"{annotations}: annotations[{index}].question_id")] = [
                answer["answer"] for answer in annotation["answers"]]
    samples = []
    for index, question in enumerate(data["questions"]):
        _require(question, ("question_id", "image_id", "question"), f"{questions}: questions[{index}]")
        sample_key(question["question_id"], f"{questions}: questions[{index}].question_id")
        samples.append(EvalSample(
            sample_key(question["question_id"]),
            _image_path(images_dir, image_pattern.format(image_id=question["image_id"])),
            question=question["question"], references=answers.get(sample_key(question["question_id"]), []),
        ))
    if annotations is not None:
        question_ids = {sample.id for sample in samples}
        check_matched({f"question(s) without an annotation in {annotations}": [
                           sample.id for sample in samples if sample.id not in answers],
                       f"annotation(s) of no question in {questions}": [
                           key for key in answers if key not in question_ids]}, str(questions), allow_unmatched)
        samples = [sample for sample in samples if sample.id in answers]
    return samples


def read_gqa(questions, images_dir=None) -> list[EvalSample]:
    """GQA balanced questions (`{question_id: {imageId, question, answer}}`); images are `{imageId}.jpg`."""
    data = _load_json(questions)
    if not isinstance(data, dict):
        raise ValueError(f"{questions} is not a GQA questions file (a dict keyed by question id expected)")
    samples = []
    for key, record in data.items():
        _require(record, ("imageId", "question"), f"{questions}: question {key}")
        answers = [record["answer"]] if "answer" in record else []
        samples.append(EvalSample(str(key), _image_path(images_dir, f"{record['imageId']}.jpg"),
                                  question=record["question"], references=answers))
    return samples


def read_vizwiz(annotations, images_dir=None) -> list[EvalSample]:
    """VizWiz VQA (`[{image, question, answers: [{answer}]}]`; test files have no answers); id = the image name."""
    data = _load_json(annotations)
    if not isinstance(data, list):
        raise ValueError(f"{annotations} is not a VizWiz file (a list of records expected)")
    samples = []
    for index, record in enumerate(data):
        _require(record, ("image", "question"), f"{annotations}[{index}]")
        samples.append(EvalSample(Path(record["image"]).stem, _image_path(images_dir, record["image"]),
                                  question=record["question"],
                                  references=[answer["answer"] for answer in record.get("answers", [])]))
    return samples


ROLES = ("id", "image", "question", "answers", "captions", "text")


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`"image=img,question=q"` (or a dict) -> `{role: column}`; roles: id, image, question, answers, captions,
    text."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"columns must look like 'role=column,role=column', got {spec!r}")
        spec = {role.strip(): column.strip() for role, column in pairs}
    unknown = sorted(set(spec) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown column role(s) {unknown}; roles are {list(ROLES)}")
    return dict(spec)


def _texts(value) -> list[str]:
    """A column value -> a list of strings (a string, a list of strings, or VQAv2-style `[{answer: ...}]`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [item["answer"] if isinstance(item, dict) else str(item) for item in value]


def read_hf_dataset(name_or_path, split: str = "test", columns=None, images_dir=None) -> list[EvalSample]:
    """
    Any `datasets` dataset: a `save_to_disk` folder, or a Hub id / data folder for `load_dataset` (cached when
    offline). `columns` maps roles to column names (default: a column named like the role); the `image` column holds
    images or paths (relative to `images_dir`); the id defaults to the row index.
    """
    import datasets

    path = Path(name_or_path)
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} has no split {split!r} (splits: {list(dataset)})")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(str(name_or_path), split=split)
    mapping = {role: role for role in ROLES if role in dataset.column_names}
    mapping.update(parse_columns(columns))
    absent = sorted({column for column in mapping.values() if column not in dataset.column_names})
    if absent:
        raise ValueError(f"column(s) {absent} not in the dataset (columns: {dataset.column_names})")
    image_column = mapping.get("image")
    # images are decoded when a batch needs them, not all at once here
    lazy = image_column is not None and isinstance(dataset.features[image_column], datasets.Image)
    rows = dataset.remove_columns(image_column) if lazy else dataset
    # decoded by lavit's reader (`to_rgb_image`), as every other image: strict about truncated files, EXIF applied
    undecoded = dataset.cast_column(image_column, datasets.Image(decode=False)) if lazy else None
    samples = []
    for index, row in enumerate(rows):
        image = DatasetImage(undecoded, image_column, index) if lazy else row.get(image_column)
        if isinstance(image, str):
            image = _image_path(images_dir, image)
        references = _texts(row[mapping["answers"]]) if "answers" in mapping else []
        if "captions" in mapping:
            references = _texts(row[mapping["captions"]])
        samples.append(EvalSample(
            str(row[mapping["id"]]) if "id" in mapping else str(index), image,
            question=row[mapping["question"]] if "question" in mapping else None, references=references,
            text=row[mapping["text"]] if "text" in mapping else None,
        ))
    return samples


FORMATS = ("coco", "karpathy", "vqav2", "gqa", "vizwiz", "datasets")


def load_samples(format: str, annotations=None, questions=None, images=None, split: str | None = None,
                 dataset=None, columns=None, image_pattern: str | None = None,
                 allow_unmatched: bool = False) -> list[EvalSample]:
    """
    One entry point for every format: `annotations` (the JSON file of `coco`, `karpathy`, `gqa`, `vizwiz`, and the
    answers of `vqav2`), `questions` (`vqav2`; also accepted for `gqa`), `images` (the image folder), `split`
    (`karpathy`: which images; `datasets`: which split), `dataset` and `columns` (`datasets`). Formats that join two
    lists (`coco`: captions to images; `vqav2`: answers to questions) refuse unmatched records unless
    `allow_unmatched` ([`check_matched`]).
    """
    def need(value, flag):
        if value is None:
            raise ValueError(f"the {format!r} format needs {flag}")
        return value

    if format == "coco":
        source, samples = annotations, read_coco_captions(need(annotations, "annotations"), images, allow_unmatched)
    elif format == "karpathy":
        source, samples = annotations, read_karpathy(need(annotations, "annotations"), images, split or "test")
    elif format == "vqav2":
        source = questions
        samples = read_vqav2(need(questions, "questions"), annotations, images, image_pattern, allow_unmatched)
    elif format == "gqa":
        source = questions or annotations
        samples = read_gqa(need(source, "questions (or annotations)"), images)
    elif format == "vizwiz":
        source, samples = annotations, read_vizwiz(need(annotations, "annotations"), images)
    elif format == "datasets":
        source, samples = dataset, read_hf_dataset(need(dataset, "dataset"), split or "test", columns, images)
    else:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    check_unique_ids(samples, str(source))
    return samples


def check_unique_ids(samples: list[EvalSample], where: str) -> None:
    """Ids key predictions: two samples of one id would share one. Raises a `ValueError` naming `where` (the
    file) and the duplicated ids."""
    seen, duplicates = set(), []
    for sample in samples:
        if sample.id in seen and sample.id not in duplicates:
            duplicates.append(sample.id)
        seen.add(sample.id)
    if duplicates:
        raise ValueError(f"{where}: {len(duplicates)} id(s) appear more than once, e.g. {duplicates[:3]}: each sample "
                         f"needs its own id (fix the file, or map another column to the id)")


def image_missing(sample: EvalSample) -> bool:
    return sample.image is None or (isinstance(sample.image, str | os.PathLike) and not os.path.isfile(sample.image))


def check_samples(samples: list[EvalSample], task: str) -> None:
    """What makes the whole data unusable, before any sample runs: no samples, duplicate ids, references for only
    some samples (a metric over part of them), or no image found at all (a wrong images folder). Raises naming the
    first offenders. A problem of one sample is its own ([`check_sample`])."""
    if not samples:
        raise ValueError("the data has no samples")
    check_unique_ids(samples, "the samples")
    missing = [str(sample.image) for sample in samples if image_missing(sample)]
    if len(missing) == len(samples):
        raise FileNotFoundError(f"{len(missing)} image(s) not found, none of the data's, e.g. {missing[:3]} (check "
                                f"the images folder)")
    usable = [sample for sample in samples if sample.problem is None]
    with_references = [sample.id for sample in usable if sample.references]
    if with_references and len(with_references) < len(usable):  # a metric over part of the samples: refused
        without = [sample.id for sample in usable if not sample.references]
        raise UnmatchedRecordsError(f"{len(without)} of {len(samples)} samples have no references, e.g. "
                                    f"{without[:3]}: scores would count only the others; give references for "
                                    f"every sample, or none (a test split)")


def check_sample(sample: EvalSample, task: str):
    """
    What one sample needs to run `task`: a record without a problem, an image that exists and reads as an image
    (not truncated, not another kind of file), a question (VQA) or a caption (text-to-image), as text, and
    references that are text. Raises a
    `ValueError` (`FileNotFoundError`) naming the problem; returns the decoded RGB image.
    """
    if sample.problem:
        raise ValueError(sample.problem)
    if image_missing(sample):
        raise FileNotFoundError(f"image not found: {sample.image} (check the images folder)")
    if task == "vqa" and not (isinstance(sample.question, str) and sample.question.strip()):
        raise ValueError(f"the question must be non-empty text, got {sample.question!r:.80}")
    if task == "text-to-image" and not (isinstance(sample.text or (sample.references or [None])[0], str)):
        raise ValueError(f"a text-to-image sample needs a caption as text, got {sample.text!r:.80}")
    not_text = [reference for reference in sample.references if not isinstance(reference, str)]
    if not_text:  # a list or number would be scored as its str(): 0 against any prediction
        raise ValueError(f"every reference (answer or caption) must be text, got {not_text[0]!r:.80}")
    return load_image(sample.image)


__all__ = ["FORMATS", "DatasetImage", "EvalSample", "UnmatchedRecordsError", "check_matched", "check_sample",
           "check_samples", "check_unique_ids",
           "load_image", "load_samples", "parse_columns",
           "read_coco_captions", "read_gqa", "read_hf_dataset", "read_karpathy", "read_vizwiz", "read_vqav2"]
