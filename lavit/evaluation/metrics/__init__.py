"""The paper's metrics as `evaluate` modules shipped inside the package, one folder each (`<name>/<name>.py`, the
layout `evaluate.load` reads for a local module): `coco_caption` (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr-D,
SPICE), `caption_accuracy` (exact-label captions), `vqa_accuracy` (the official VQA accuracy, GQA exact match),
`fid` and `clip_score` (torchmetrics). They load offline, from this folder, never from the Hub:

    import evaluate, lavit.evaluation
    cider = evaluate.load(lavit.evaluation.metric_path("coco_caption"))
    both = evaluate.combine([cider, evaluate.load(lavit.evaluation.metric_path("caption_accuracy"))])

`lavit evaluate`, training's evaluation and the demo score through these modules; the functions below keep the
dictionary-in, dictionary-out form of `lavit evaluate` and call the modules. Every score is reported on the
paper's scale: CIDEr 134.0, VQA accuracy 68.2 (percent), FID 7.2; caption accuracy is a share (0 to 1).
"""

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

METRICS_DIR = Path(__file__).parent
METRIC_NAMES = tuple(sorted(folder.name for folder in METRICS_DIR.iterdir()
                            if (folder / f"{folder.name}.py").is_file()))


def metric_path(name: str) -> str:
    """The folder of the packaged `evaluate` module `name` (one of `METRIC_NAMES`), for `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"no packaged metric {name!r}; choose one of {list(METRIC_NAMES)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a packaged module (a local path: nothing is looked up online), kept in memory unless
    `kwargs` say otherwise (each process scores what it is given; callers gather predictions first)."""
    import evaluate

    return evaluate.load(metric_path(name), **{"keep_in_memory": True, **kwargs})


@functools.cache
def metric_module(name: str):
    """The Python module `evaluate` imported for metric `name`: its helpers (e.g. `normalize_vqa_answer`) are the
    ones its `compute` uses."""
    return sys.modules[type(load_metric(name)).__module__]


def _check_ids(predictions: dict, references: dict, what: str) -> list[str]:
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(f"{len(missing)} prediction id(s) have no {what}, e.g. {missing[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    return sorted(predictions)


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]],
                    use_java: bool | None = None) -> dict:
    """
    COCO caption metrics (the `coco_caption` module) of captions keyed by id: `predictions` one caption per id,
    `references` the human captions per id; `use_java`: see the module.

    Returns:
        `{"metrics": {name: value}, "unavailable": {name: reason}, "tokenizer": "ptb-java" | "ptb-python"}`.
    """
    keys = _check_ids(predictions, references, "reference captions")
    empty = [key for key in keys if not references[key]]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have an empty reference list, e.g. {empty[:3]}")
    scores = load_metric("coco_caption").compute(predictions=[predictions[key] for key in keys],
                                                 references=[references[key] for key in keys], use_java=use_java)
    unavailable, tokenizer = scores.pop("unavailable"), scores.pop("tokenizer")
    return {"metrics": scores, "unavailable": unavailable, "tokenizer": tokenizer}


def vqa_metrics(predictions: dict[str, str], answers: dict[str, list[str]], metric: str = "vqa_accuracy") -> dict:
    """Mean VQA accuracy (`metric="vqa_accuracy"`) or exact match (`"exact_match"`, first answer) x100 of answers
    keyed by id (the `vqa_accuracy` module); every prediction id needs answers."""
    keys = _check_ids(predictions, answers, "answers")
    scores = load_metric("vqa_accuracy").compute(predictions=[predictions[key] for key in keys],
                                                 references=[answers[key] for key in keys], metric=metric)
    return {"metrics": scores, "unavailable": {}}


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction (0 to 1; see the `vqa_accuracy` module)."""
    return metric_module("vqa_accuracy").vqa_accuracy(prediction, answers)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the `vqa_accuracy` module)."""
    return metric_module("vqa_accuracy").normalize_vqa_answer(answer)


def fid_score(generated: Sequence, real: Sequence, features=None, image_size: int = 299) -> float:
    """FID between generated and real PIL images (the `fid` module; `features`: see its `fid_feature_extractor`)."""
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 generated and 2 real images, got {len(generated)} and {len(real)}")
    return load_metric("fid").compute(images=[*generated, *real], real=[False] * len(generated) + [True] * len(real),
                                      features=features, image_size=image_size)["fid"]


def clip_score(images: Sequence, texts: Sequence[str], model: str | Callable) -> float:
    """torchmetrics' CLIP score of PIL images against their prompts (the `clip_score` module)."""
    return load_metric("clip_score").compute(predictions=list(images), references=list(texts), model=model)[
        "clip_score"]


def clip_similarities(images: Sequence, texts: Sequence[str], model: str) -> list[float]:
    """Cosine similarity of each image to its text under a CLIP model (the `clip_score` module's helper)."""
    return metric_module("clip_score").clip_similarities(images, texts, model)


__all__ = ["METRIC_NAMES", "caption_metrics", "clip_score", "clip_similarities", "fid_score", "load_metric",
           "metric_module", "metric_path", "normalize_vqa_answer", "vqa_accuracy", "vqa_metrics"]
