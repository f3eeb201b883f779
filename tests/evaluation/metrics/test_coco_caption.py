"""The `coco_caption` evaluate module without Java: the Python PTB tokenization, which scorers run and why the
others are unavailable, CIDEr-D's idf taken over the given references, and the refusals of empty input."""

import stat

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from lavit.evaluation.metrics import load_metric, metric_module

COCO = metric_module("coco_caption")


def test_python_ptb_tokens_are_lower_case_without_punctuation_and_brackets_as_lrb():
    tokens = COCO.python_ptb_tokenize({"1": ["A man's dog, (running)!", "Two\ncats; sleeping..."]})
    assert tokens == {"1": ["a man 's dog -lrb- running -rrb-", "two cats sleeping"]}
    assert not set(" ".join(tokens["1"]).split()) & set(PUNCTUATIONS)


def test_cider_d_of_a_single_image_is_zero_even_when_the_caption_is_exact():
    # idf = log(N / df) over the given references: with one image every n-gram has df = N = 1, so idf 0
    scores = load_metric("coco_caption").compute(predictions=["a black cat"], references=[["A black cat."]],
                                                 use_java=False)
    assert scores["CIDEr"] == 0.0
    assert scores["BLEU-1"] == pytest.approx(100.0, abs=1e-6) and scores["ROUGE-L"] == pytest.approx(100.0)
    assert scores["tokenizer"] == "ptb-python" and set(scores["unavailable"]) == {"METEOR", "SPICE"}


def fake_java_on_path(folder, monkeypatch, starts: bool = True):
    """A `java` on PATH that starts (exits 0: `java -version` passes) or cannot (exits 1, as a JVM that cannot
    reserve its heap). Each in a folder of its own: whether a java starts is remembered per path."""
    folder.mkdir(exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\nexit {0 if starts else 1}\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(folder))


def test_without_java_only_bleu_rouge_and_cider_run_and_the_reason_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    assert not COCO.java_available()
    scorers, unavailable = COCO.caption_scorers(use_java=False)
    assert [name for _, names in scorers for name in names] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L",
                                                                "CIDEr"]
    assert unavailable == {"METEOR": "needs Java: `java` not found on PATH",
                           "SPICE": "needs Java: `java` not found on PATH"}
    fake_java_on_path(tmp_path / "starts", monkeypatch)
    assert COCO.java_available()
    assert COCO.caption_scorers(use_java=False)[1]["METEOR"] == "Java tools turned off"


def test_a_java_that_does_not_start_is_no_java_and_nothing_waits_on_it(tmp_path, monkeypatch):
    """METEOR started a `java` that exited at once, failed while holding its lock, and its `__del__` then waited on
    that lock forever: a java that does not start is now unavailable, named, and never given work."""
    fake_java_on_path(tmp_path / "broken", monkeypatch, starts=False)
    assert not COCO.java_available()
    scorers, unavailable = COCO.caption_scorers(use_java=True)
    assert [names for _, names in scorers] == [["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], ["ROUGE-L"], ["CIDEr"]]
    assert "does not start" in unavailable["METEOR"] and "does not start" in unavailable["SPICE"]
    scores = COCO.coco_caption_scores(["a cat"], [["a cat"]], use_java=True)
    assert scores["tokenizer"] == "ptb-python (Java does not start)" and "METEOR" not in scores


def test_the_python_tokenizer_runs_when_java_is_off(monkeypatch, tmp_path):
    gts, res = {"0": ["A cat."]}, {"0": ["a cat!"]}
    assert COCO.tokenize_captions(gts, res, use_java=False) == ({"0": ["a cat"]}, {"0": ["a cat"]}, "ptb-python")
    monkeypatch.setenv("PATH", str(tmp_path))
    # use_java=None means "when java is on PATH": here it is not, so nothing tries to start it
    scores = COCO.coco_caption_scores(["a cat"], [["a cat"]])
    assert scores["tokenizer"] == "ptb-python" and "METEOR" not in scores and "METEOR" in scores["unavailable"]


def test_empty_input_is_refused_naming_the_positions():
    with pytest.raises(ValueError, match="no predictions to score"):
        COCO.coco_caption_scores([], [])
    with pytest.raises(ValueError, match=r"1 prediction\(s\) have an empty reference list, e.g. positions \[1\]"):
        load_metric("coco_caption").compute(predictions=["a cat", "a dog"], references=[["a cat"], []],
                                            use_java=False)


def test_java_asked_for_but_missing_makes_meteor_unavailable_rather_than_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here, though the caller turned the Java tools on
    scorers, unavailable = COCO.caption_scorers(use_java=True)
    assert [names for _, names in scorers] == [["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], ["ROUGE-L"], ["CIDEr"]]
    assert "needs Java" in unavailable["METEOR"]
