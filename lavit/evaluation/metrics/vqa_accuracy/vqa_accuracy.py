"""The official VQA accuracy as an `evaluate` module: answers normalised as the VQA evaluation does (punctuation,
number words, articles, contractions), then the leave-one-out average over the human answers; or GQA's exact match.

    metric = evaluate.load(lavit.evaluation.metric_path("vqa_accuracy"))
    metric.compute(predictions=["two"], references=[["2"] * 10])  # {"vqa_accuracy": 100.0}
    metric.compute(predictions=["left"], references=[["left"]], metric="exact_match")  # {"exact_match": 100.0}

Self-contained (evaluate copies this file into its module cache).
"""

import re
from collections.abc import Sequence
from itertools import combinations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "VQA accuracy (official normalisation, leave-one-out average over human answers) or exact match, x100."
_CITATION = """@inproceedings{antol2015vqa, title={VQA: Visual Question Answering}, author={Antol, Stanislaw and
others}, booktitle={ICCV}, year={2015}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one answer per question.
    references (`list[list[str]]`): the human answers of each question (at least 2 for `vqa_accuracy`; the first
        one is the answer for `exact_match`).
    metric (`str`): `"vqa_accuracy"` (default) or `"exact_match"` (GQA).
Returns:
    `{metric: mean score x100}`.
"""

# the normalisation of the official VQA evaluation (vqaEval.py of the VQA API), rewritten
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, look-behind typo included
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """
    The official VQA answer normalisation: whitespace, punctuation (kept inside numbers such as `1,000` and `2.5`),
    number words -> digits, articles dropped, missing apostrophes restored (`dont` -> `don't`). Lower-cases first.
    """
    original = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = original
    for mark in PUNCTUATION:  # as the official script, the test reads the text before any replacement
        if (mark + " " in original or " " + mark in original) or _COMMA_STRIP.search(original) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """
    The official VQA accuracy of one prediction: over the 10 leave-one-out subsets of the human answers,
    min(#humans in the subset who gave the prediction / 3, 1), averaged. Both sides are normalised
    ([`normalize_vqa_answer`]). Any number of answers >= 2 works (the formula generalises to n choose n-1).
    The official script normalises only questions whose answers disagree; normalising always gives the same score
    for normalised predictions (all LaVIT predictions are post-processed) and never penalises "Yes" vs "yes".
    """
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs at least 2 human answers per question, got {len(answers)}")
    prediction = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == prediction for answer in answers]
    subsets = combinations(range(len(answers)), len(answers) - 1)
    scores = [min(1.0, sum(matches[index] for index in subset) / 3.0) for subset in subsets]
    return float(np.mean(scores))


def exact_match(prediction: str, answer: str) -> float:
    """GQA: the normalised prediction equals the normalised answer."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


METRICS = {"vqa_accuracy": lambda prediction, answers: vqa_accuracy(prediction, answers),
           "exact_match": lambda prediction, answers: exact_match(prediction, answers[0])}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA"])

    def _compute(self, predictions, references, metric="vqa_accuracy"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if not predictions:
            raise ValueError("no predictions to score")
        scores = [METRICS[metric](prediction, answers) for prediction, answers in zip(predictions, references,
                                                                                      strict=True)]
        return {metric: 100.0 * float(np.mean(scores))}
