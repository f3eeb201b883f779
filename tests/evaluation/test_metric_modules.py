"""The metrics as `evaluate` modules shipped in the package: every one loads from its folder without the network,
scores what the functions of `lavit evaluate` scored before they became modules (values stored from the merge base,
tests/evaluation/data/metric_values_at_merge_base.json), matches hand-computed values, and combines."""

import json
import shutil
import socket
from pathlib import Path

import evaluate
import pytest

from lavit.evaluation import METRIC_NAMES, caption_metrics, load_metric, metric_path, vqa_metrics

MERGE_BASE = json.loads((Path(__file__).parent / "data" / "metric_values_at_merge_base.json").read_text())
JAVA = shutil.which("java") is not None


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_packaged_metric_loads_by_path_without_the_network(name, no_network):
    assert set(METRIC_NAMES) >= {"coco_caption", "caption_accuracy", "vqa_accuracy", "fid", "clip_score"}
    module = evaluate.load(metric_path(name))  # the path users type, no Hub lookup
    assert isinstance(module, evaluate.EvaluationModule) and module.features is not None
    assert module.description and module.inputs_description  # `help(metric)` says what it takes


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="no packaged metric 'cider'.*coco_caption"):
        metric_path("cider")


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("java", marks=pytest.mark.slow)])
def test_caption_module_equals_the_merge_base_implementation(tokenizer, no_network):
    if tokenizer == "java" and not JAVA:
        pytest.skip("needs Java")
    expected = MERGE_BASE[f"caption_{tokenizer}"]
    use_java = tokenizer == "java"
    assert caption_metrics(MERGE_BASE["predictions"], MERGE_BASE["references"], use_java)["metrics"] == (
        pytest.approx(expected, rel=1e-12))
    # the module in batches of any size gives the same scores
    metric = evaluate.load(metric_path("coco_caption"))
    keys = sorted(MERGE_BASE["predictions"])
    for start in range(0, len(keys), 2):
        metric.add_batch(predictions=[MERGE_BASE["predictions"][key] for key in keys[start:start + 2]],
                         references=[MERGE_BASE["references"][key] for key in keys[start:start + 2]])
    scores = metric.compute(use_java=use_java)
    assert {name: scores[name] for name in expected} == pytest.approx(expected, rel=1e-12)


def test_vqa_module_equals_the_merge_base_implementation():
    for metric in ("vqa_accuracy", "exact_match"):
        scores = vqa_metrics(MERGE_BASE["vqa_predictions"], MERGE_BASE["answers"], metric)["metrics"]
        assert scores == pytest.approx(MERGE_BASE[metric], rel=1e-12)


def test_modules_match_hand_computed_values():
    vqa = load_metric("vqa_accuracy")
    # 2 of 10 humans said "yes": leaving out a "yes" (2 of 10 subsets) gives 1/3, any other 2/3 -> 0.6
    assert vqa.compute(predictions=["Yes"], references=[["yes"] * 2 + ["no"] * 8])["vqa_accuracy"] == (
        pytest.approx(60.0))
    assert vqa.compute(predictions=["two"], references=[["2"] * 10])["vqa_accuracy"] == pytest.approx(100.0)
    # two images, each caption equal to its one reference: "a" is in both (idf 0); 1- and 2-gram cosines are 1,
    # there are no 3- or 4-grams: CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5, x100
    captions = dict(predictions=["a cat", "a dog"], references=[["a cat"], ["a dog"]])
    scores = load_metric("coco_caption").compute(**captions, use_java=False)
    assert scores["CIDEr"] == pytest.approx(500.0) and scores["BLEU-1"] == pytest.approx(100.0, abs=1e-6)
    accuracy = load_metric("caption_accuracy").compute(predictions=["A photo of a Cat.", "a photo of a dog"],
                                                       references=[["a photo of a cat"], ["a photo of a cow"]])
    assert accuracy == {"caption_accuracy": 0.5}


def test_modules_combine(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no Java: the Python PTB tokenizer (the Java tools take a minute)
    combined = evaluate.combine([load_metric("caption_accuracy"), load_metric("coco_caption")])
    combined.add_batch(predictions=["a photo of a cat"], references=[["a photo of a cat"]])
    combined.add_batch(predictions=["a photo of a cow"], references=[["a photo of a dog"]])
    scores = combined.compute()
    assert scores["caption_accuracy"] == 0.5 and 0 < scores["CIDEr"] and "BLEU-4" in scores
