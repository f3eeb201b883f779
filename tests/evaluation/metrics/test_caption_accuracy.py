"""The `caption_accuracy` evaluate module: a caption counts when it equals one of its references after
lower-casing, removing punctuation and collapsing spaces; the score is the share of such captions, and empty or
mismatched input is refused."""

import pytest

from lavit.evaluation.metrics import load_metric, metric_module

ACCURACY = load_metric("caption_accuracy")
normalize_caption = metric_module("caption_accuracy").normalize_caption


def test_normalisation_lowers_drops_punctuation_and_collapses_spaces():
    assert normalize_caption("  A Photo,  of a\tCAT!! ") == "a photo of a cat"
    assert normalize_caption("a well-known dog's toy") == "a wellknown dogs toy"  # removed, not spaced
    assert normalize_caption("...") == ""


def test_the_share_of_captions_equal_to_any_of_their_references():
    scores = ACCURACY.compute(predictions=["A photo of a cat.", "a photo of the dog", "a  photo of a COW"],
                              references=[["a photo of a dog", "a photo of a cat"], ["a photo of a dog"],
                                          ["a photo of a cow"]])
    assert scores == {"caption_accuracy": pytest.approx(2 / 3)}  # "the dog" is not "a dog"
    assert ACCURACY.compute(predictions=["a cat"], references=[["a cat sleeps"]]) == {"caption_accuracy": 0.0}


def test_batches_add_up_to_one_score():
    metric = load_metric("caption_accuracy")
    for prediction, reference in (("a cat", "a cat"), ("a dog", "a cow"), ("a cow", "a cow"), ("a", "b")):
        metric.add_batch(predictions=[prediction], references=[[reference]])
    assert metric.compute() == {"caption_accuracy": 0.5}


def test_empty_or_mismatched_input_is_refused():
    with pytest.raises(ValueError, match="no predictions to score"):
        ACCURACY.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=r"number of predictions \(2\) and references \(1\)"):
        ACCURACY.compute(predictions=["a cat", "a dog"], references=[["a cat"]])
