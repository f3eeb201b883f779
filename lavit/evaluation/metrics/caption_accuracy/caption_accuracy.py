"""Exact-label caption accuracy as an `evaluate` module: the share of captions that equal one of their references
once both are lower-cased, stripped of punctuation and of extra spaces. For data whose captions are class names
("a photo of a cat"), where CIDEr rewards the shared template as much as the label.

    metric = evaluate.load(lavit.evaluation.metric_path("caption_accuracy"))
    metric.compute(predictions=["A photo of a cat."], references=[["a photo of a cat"]])  # {"caption_accuracy": 1.0}

Self-contained (evaluate copies this file into its module cache).
"""

import string

import datasets
import evaluate

_DESCRIPTION = "The share (0 to 1) of captions equal to one of their references after normalisation."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one caption per image.
    references (`list[list[str]]`): the accepted captions of each image.
Returns:
    `{"caption_accuracy": share of exact matches, 0 to 1}`.
"""
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_caption(text: str) -> str:
    """Lower-cased, without punctuation, single spaces."""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("no predictions to score")
        hits = [normalize_caption(prediction) in {normalize_caption(text) for text in texts}
                for prediction, texts in zip(predictions, references, strict=True)]
        return {"caption_accuracy": sum(hits) / len(hits)}
