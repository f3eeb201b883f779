"""The `vqa_accuracy` evaluate module: the official VQA answer normalisation rule by rule, the leave-one-out
accuracy for any number of human answers, GQA's exact match on the first answer, the mean x100, and the refusals."""

import pytest

from lavit.evaluation.metrics import load_metric, metric_module

VQA = metric_module("vqa_accuracy")
METRIC = load_metric("vqa_accuracy")


@pytest.mark.parametrize(("answer", "normalised"), [
    ("Ten\tapples\n", "10 apples"), ("none", "0"), ("an apple", "apple"),  # number words, articles, whitespace
    ("yes.", "yes"), ("the end. ok", "end ok"), ("5.", "5"), ("2.5", "2.5"),  # periods go unless before a digit
    ("left!right", "left right"), ("hello , world", "hello world"),  # a mark touching a space goes, others split
    ("a/b", "b"),  # "a/b" -> "a b", then the article "a" is dropped
    ("3,000 red-ish", "3000 redish"),  # a number with a comma: every mark is removed, none spaced
    ("isnt it", "isn't it"), ("wont", "won't"),  # missing apostrophes restored
])
def test_the_official_normalisation(answer, normalised):
    assert VQA.normalize_vqa_answer(answer) == normalised


def test_leave_one_out_accuracy_generalises_to_any_number_of_answers():
    # 3 answers, 1 match: of the 3 subsets of 2, two hold the match (1/3 each), one does not -> 2/9
    assert VQA.vqa_accuracy("red", ["red", "blue", "green"]) == pytest.approx(2 / 9)
    assert VQA.vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)  # every subset of 1 has 1 match
    # 5 answers, 4 matches: 4 subsets hold 3 matches (1), 1 holds 4 (1) -> 1; 3 matches: 2 subsets hold 3, 3 hold 2
    assert VQA.vqa_accuracy("cat", ["cat"] * 4 + ["dog"]) == 1.0
    assert VQA.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 2) == pytest.approx((2 * 1 + 3 * 2 / 3) / 5)


def test_exact_match_compares_with_the_first_answer_only():
    assert VQA.exact_match("The Left.", "left") == 1.0 and VQA.exact_match("left", "right") == 0.0
    scores = METRIC.compute(predictions=["left", "left"], references=[["right", "left"], ["left", "right"]],
                            metric="exact_match")
    assert scores == {"exact_match": pytest.approx(50.0)}


def test_compute_is_the_mean_over_questions_times_100():
    scores = METRIC.compute(predictions=["two", "no", "blue"],
                            references=[["2"] * 10, ["yes"] * 10, ["blue"] * 3 + ["navy"] * 7])
    # 1, 0, and 3 of 10 agreeing: 7 subsets keep 3 (1), 3 keep 2 (2/3) -> 0.9
    assert scores == {"vqa_accuracy": pytest.approx(100 * (1 + 0 + 0.9) / 3)}


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"metric must be one of \['exact_match', 'vqa_accuracy'\], got 'bleu'"):
        METRIC.compute(predictions=["yes"], references=[["yes", "yes"]], metric="bleu")
    with pytest.raises(ValueError, match="no predictions to score"):
        METRIC.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="at least 2 human answers per question, got 1"):
        METRIC.compute(predictions=["yes"], references=[["yes"]])
