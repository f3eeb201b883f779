"""COCO caption metrics as an `evaluate` module: the official COCO caption evaluation (pycocoevalcap) with PTB
tokenization, BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D, idf over the given references) and SPICE, each x100.

    metric = evaluate.load(lavit.evaluation.metric_path("coco_caption"))
    metric.add_batch(predictions=["a cat on a mat"], references=[["a cat sits on a mat", "a cat on a rug"]])
    metric.compute()  # {"BLEU-1": ..., "CIDEr": ..., "tokenizer": "ptb-python", "unavailable": {...}}

Self-contained (evaluate copies this file into its module cache): it imports only evaluate, datasets and, when
scoring, pycocoevalcap and nltk.
"""

import contextlib
import functools
import io
import shutil
import subprocess
from pathlib import Path

import datasets
import evaluate

_DESCRIPTION = "COCO caption metrics (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE, x100."
_CITATION = """@inproceedings{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation
Server}, author={Chen, Xinlei and others}, year={2015}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one caption per image.
    references (`list[list[str]]`): the human captions of each image (at least one each).
    use_java (`bool`, *optional*): run the Java tools (PTB tokenizer, METEOR, SPICE); default: when `java` is on
        PATH. Without Java the tokenization is `python_ptb_tokenize` and METEOR/SPICE are listed under `unavailable`.
Returns:
    `{metric name: value x100, ..., "tokenizer": "ptb-java" | "ptb-python", "unavailable": {name: reason}}`.
"""


def java_available() -> bool:
    """pycocoevalcap's PTB tokenizer, METEOR and SPICE run Java programs: a `java` on PATH that starts with METEOR's
    2 GB heap (a JVM that cannot start made METEOR wait forever on a lock its failure kept)."""
    java = shutil.which("java")
    return java is not None and _java_starts(java)


@functools.cache
def _java_starts(java: str) -> bool:
    try:
        return subprocess.run([java, "-Xmx2G", "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def spice_models_available() -> bool:
    """SPICE also needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use (not offline)."""
    from pycocoevalcap import spice

    return (Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar").is_file()


def python_ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """
    Java-free stand-in for pycocoevalcap's `PTBTokenizer`: lower-cased Penn Treebank tokens (nltk's Treebank
    rules, brackets as `-lrb-` like Stanford's `-lowerCase` output) without the punctuation tokens the COCO
    evaluation drops. Scores may differ from the Java tokenizer's in rare cases (periods inside a caption,
    abbreviations); results say which tokenizer ran.
    """
    from nltk.tokenize import NLTKWordTokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    tokenizer, punctuation = NLTKWordTokenizer(), set(PUNCTUATIONS)

    def tokenize(text: str) -> str:
        tokens = tokenizer.tokenize(text.replace("\n", " "), convert_parentheses=True)
        return " ".join(token for token in (token.lower() for token in tokens) if token not in punctuation)

    return {key: [tokenize(text) for text in texts] for key, texts in captions.items()}


def java_ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's Stanford PTB tokenizer (Java); a `RuntimeError` when it returns fewer captions than given (it
    does not report its own failures)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize({key: [{"caption": text} for text in texts] for key, texts in captions.items()})
    if any(len(tokens.get(key, [])) != len(texts) for key, texts in captions.items()):
        raise RuntimeError("the Java PTB tokenizer returned fewer captions than it was given")
    return tokens


def caption_scorers(use_java: bool) -> tuple[list, dict[str, str]]:
    """pycocoevalcap's scorers with their metric names, and the metrics that cannot run here with the reason."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Rouge(), ["ROUGE-L"]), (Cider(), ["CIDEr"])]
    unavailable = {}
    if use_java and not java_available():
        reason = "needs Java: `java` not found on PATH, or it does not start (`java -Xmx2G -version` fails)"
        return scorers, {name: reason for name in ("METEOR", "SPICE")}
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        try:  # METEOR starts `java` at once: a missing or broken Java makes it unavailable, not a crash
            scorers.append((Meteor(), ["METEOR"]))
        except OSError as error:
            unavailable["METEOR"] = f"needs Java, which did not start ({error})"
        if spice_models_available():
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"]))
        else:
            unavailable["SPICE"] = ("the Stanford CoreNLP 3.6.0 jars are missing (run `python -m "
                                    "pycocoevalcap.spice.get_stanford_models` once, online)")
    else:
        reason = "needs Java: `java` not found on PATH" if not java_available() else "Java tools turned off"
        unavailable.update({name: reason for name in ("METEOR", "SPICE")})
    return scorers, unavailable


def tokenize_captions(gts: dict, res: dict, use_java: bool) -> tuple[dict, dict, str]:
    """Both sides PTB-tokenized; the Python tokenizer when Java is off or fails (e.g. a read-only pycocoevalcap
    folder, where its temporary files go)."""
    if not use_java:
        return python_ptb_tokenize(gts), python_ptb_tokenize(res), "ptb-python"
    if not java_available():
        return python_ptb_tokenize(gts), python_ptb_tokenize(res), "ptb-python (Java does not start)"
    try:
        return java_ptb_tokenize(gts), java_ptb_tokenize(res), "ptb-java"
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return (python_ptb_tokenize(gts), python_ptb_tokenize(res),
                f"ptb-python (the Java tokenizer failed: {error})")


def coco_caption_scores(predictions: list[str], references: list[list[str]], use_java: bool | None = None) -> dict:
    """The scores of [`CocoCaption`]; captions are keyed by their position."""
    if not predictions:
        raise ValueError("no predictions to score")
    empty = [index for index, texts in enumerate(references) if not texts]
    if empty:
        raise ValueError(f"{len(empty)} prediction(s) have an empty reference list, e.g. positions {empty[:3]}")
    use_java = java_available() if use_java is None else use_java
    gts = {str(index): list(texts) for index, texts in enumerate(references)}
    res = {str(index): [text] for index, text in enumerate(predictions)}
    gts, res, tokenizer = tokenize_captions(gts, res, use_java)
    scorers, unavailable = caption_scorers(use_java)
    metrics = {}
    for scorer, names in scorers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
                score, _ = scorer.compute_score(gts, res)
        except Exception as error:  # a Java tool that fails (old JVM, memory) must not lose the other metrics
            unavailable.update({name: f"{type(error).__name__}: {error}" for name in names})
            lock = getattr(scorer, "lock", None)  # METEOR keeps its lock when it fails; its __del__ would wait forever
            if lock is not None and lock.locked():
                lock.release()
            continue
        for name, value in zip(names, score if isinstance(score, list) else [score], strict=True):
            metrics[name] = 100.0 * float(value)
    return {**metrics, "tokenizer": tokenizer, "unavailable": unavailable}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"])

    def _compute(self, predictions, references, use_java=None):
        return coco_caption_scores(list(predictions), [list(texts) for texts in references], use_java)
