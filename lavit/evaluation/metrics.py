"""The paper's metrics: COCO caption metrics (pycocoevalcap), the official VQA accuracy, GQA exact match, and FID /
CLIP score for text-to-image (torchmetrics).

Every score is reported on the paper's scale: CIDEr 134.0, VQA accuracy 68.2 (percent), FID 7.2.
"""

import contextlib
import functools
import io
import re
import shutil
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ captioning


def java_available() -> bool:
    """pycocoevalcap's PTB tokenizer, METEOR and SPICE run Java programs."""
    return shutil.which("java") is not None


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


def _caption_scorers(use_java: bool) -> tuple[list, dict[str, str]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Rouge(), "ROUGE-L"), (Cider(), "CIDEr")]
    unavailable = {}
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), "METEOR"))
        if spice_models_available():
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), "SPICE"))
        else:
            unavailable["SPICE"] = ("the Stanford CoreNLP 3.6.0 jars are missing (run `python -m "
                                    "pycocoevalcap.spice.get_stanford_models` once, online)")
    else:
        reason = "needs Java: `java` not found on PATH" if not java_available() else "Java tools turned off"
        unavailable.update({name: reason for name in ("METEOR", "SPICE")})
    return scorers, unavailable


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]],
                    use_java: bool | None = None) -> dict:
    """
    COCO caption metrics with pycocoevalcap, as the official COCO evaluation: PTB tokenization, BLEU-1..4, METEOR,
    ROUGE-L, CIDEr (CIDEr-D, idf over these references) and SPICE, each x100.

    Args:
        predictions: one caption per id. references: the human captions per id (every prediction id needs some).
        use_java: run the Java tools (PTB tokenizer, METEOR, SPICE); default: when `java` is on PATH. Without Java
            the tokenization is [`python_ptb_tokenize`] and METEOR/SPICE are listed under `unavailable`.

    Returns:
        `{"metrics": {name: value}, "unavailable": {name: reason}, "tokenizer": "ptb-java" | "ptb-python"}`.
    """
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(f"{len(missing)} prediction id(s) have no reference captions, e.g. {missing[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    empty = [key for key in predictions if not references[key]]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have an empty reference list, e.g. {empty[:3]}")
    use_java = java_available() if use_java is None else use_java
    keys = sorted(predictions)
    gts, res = {key: references[key] for key in keys}, {key: [predictions[key]] for key in keys}
    tokenizer = "ptb-java" if use_java else "ptb-python"
    tokenize = java_ptb_tokenize if use_java else python_ptb_tokenize
    try:
        gts, res = tokenize(gts), tokenize(res)
    except (OSError, RuntimeError) as error:  # e.g. a read-only pycocoevalcap folder (its temporary files go there)
        gts, res = python_ptb_tokenize(gts), python_ptb_tokenize(res)
        tokenizer = f"ptb-python (the Java tokenizer failed: {error})"
    scorers, unavailable = _caption_scorers(use_java)
    metrics = {}
    for scorer, names in scorers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
                score, _ = scorer.compute_score(gts, res)
        except Exception as error:  # a Java tool that fails (old JVM, memory) must not lose the other metrics
            for name in [names] if isinstance(names, str) else names:
                unavailable[name] = f"{type(error).__name__}: {error}"
            continue
        for name, value in zip([names] if isinstance(names, str) else names,
                               score if isinstance(score, list) else [score], strict=True):
            metrics[name] = 100.0 * float(value)
    return {"metrics": metrics, "unavailable": unavailable, "tokenizer": tokenizer}


# ------------------------------------------------------------------------------------------------ VQA

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


def vqa_metrics(predictions: dict[str, str], answers: dict[str, list[str]], metric: str = "vqa_accuracy") -> dict:
    """Mean VQA accuracy (`metric="vqa_accuracy"`) or exact match (`"exact_match"`, first answer) x100, keyed by id;
    every prediction id needs answers."""
    missing = sorted(set(predictions) - set(answers))
    if missing:
        raise ValueError(f"{len(missing)} prediction id(s) have no answers, e.g. {missing[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    if metric == "vqa_accuracy":
        scores = [vqa_accuracy(predictions[key], answers[key]) for key in predictions]
    elif metric == "exact_match":
        scores = [exact_match(predictions[key], answers[key][0]) for key in predictions]
    else:
        raise ValueError(f"metric must be 'vqa_accuracy' or 'exact_match', got {metric!r}")
    return {"metrics": {metric: 100.0 * float(np.mean(scores))}, "unavailable": {}}


# ------------------------------------------------------------------------------------------------ text-to-image


class HFImageFeatures(torch.nn.Module):
    """
    FID features from any transformers vision model (a path or a Hub id, e.g. a CLIP or DINOv2 vision tower): uint8
    images (B, 3, H, W) -> the pooled output (B, D). Resizing and normalisation follow the model's image processor.
    """

    def __init__(self, model, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str) -> "HFImageFeatures":
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(path)
        model = getattr(model, "vision_model", model)  # a full CLIP/SigLIP model: its vision tower
        processor = AutoImageProcessor.from_pretrained(path)
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        size = size.get("height") or size.get("shortest_edge")
        return cls(model, int(size), processor.image_mean, processor.image_std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = F.interpolate(images.float() / 255.0, size=(self.image_size, self.image_size),
                                     mode="bicubic", antialias=True, align_corners=False)
        outputs = self.model(pixel_values=(pixel_values - self.mean) / self.std)
        pooled = getattr(outputs, "pooler_output", None)
        return (pooled if pooled is not None else outputs.last_hidden_state.mean(dim=1)).double()


INCEPTION_WEIGHT_SUFFIXES = (".pth", ".pt")


def fid_feature_extractor(source: str | torch.nn.Module | None) -> dict:
    """
    The feature arguments of torchmetrics' `FrechetInceptionDistance`:
    - `None`: the standard FID Inception-v3 (2048-d; needs torch-fidelity and torchvision; torch-fidelity downloads
      its weights once), or a `.pth` file of those weights (`pt_inception-2015-12-05-6726825d.pth`) for offline use;
    - a module: used as is (uint8 images in, (B, D) features out);
    - another path or a Hub id: [`HFImageFeatures`] of that vision model (e.g. DINOv2 or CLIP features).
    """
    if source is None:
        return {"feature": 2048}
    if isinstance(source, torch.nn.Module):
        return {"feature": source}
    if str(source).endswith(INCEPTION_WEIGHT_SUFFIXES):
        if not Path(source).is_file():
            raise FileNotFoundError(f"Inception weights not found: {source}")
        return {"feature": 2048, "feature_extractor_weights_path": str(source)}
    return {"feature": HFImageFeatures.from_pretrained(source)}


def _uint8_batches(images: Sequence, size: int, batch_size: int = 16):
    for start in range(0, len(images), batch_size):
        arrays = [np.asarray(image.convert("RGB").resize((size, size))) for image in images[start:start + batch_size]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def fid_score(generated: Sequence, real: Sequence, features=None, image_size: int = 299) -> float:
    """
    Fréchet distance between the features of generated and real PIL images (torchmetrics
    `FrechetInceptionDistance`; the official evaluation resizes both sets alike). `features`: see
    [`fid_feature_extractor`]. Needs at least 2 images per set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 generated and 2 real images, got {len(generated)} and {len(real)}")
    metric = FrechetInceptionDistance(**fid_feature_extractor(features), input_img_size=(3, image_size, image_size))
    for is_real, images in ((True, real), (False, generated)):
        for batch in _uint8_batches(images, image_size):
            metric.update(batch, real=is_real)
    return float(metric.compute())


class ProjectedFeatures(torch.nn.Module):
    """A transformers CLIP model whose `get_image_features` / `get_text_features` return the projected embeddings
    (B, D): transformers 5 returns output objects, which torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    @staticmethod
    def _embeddings(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_text_features(*args, **kwargs))


@functools.lru_cache(maxsize=2)
def _clip(path: str):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


@torch.no_grad()
def clip_similarities(images: Sequence, texts: Sequence[str], model: str) -> list[float]:
    """Cosine similarity of each PIL image to its text under the CLIP model at `model` (path or Hub id; loaded once),
    as the official text-to-image evaluation ranks its candidates (OpenAI CLIP ViT-L/14)."""
    clip, processor = _clip(str(model))
    inputs = processor(text=list(texts), images=[image.convert("RGB") for image in images], return_tensors="pt",
                       padding=True, truncation=True)
    image_embeds = ProjectedFeatures._embeddings(clip.get_image_features(pixel_values=inputs["pixel_values"]))
    text_embeds = ProjectedFeatures._embeddings(clip.get_text_features(input_ids=inputs["input_ids"],
                                                                       attention_mask=inputs["attention_mask"]))
    return F.cosine_similarity(image_embeds, text_embeds, dim=-1).tolist()


def clip_score(images: Sequence, texts: Sequence[str], model: str | Callable) -> float:
    """
    torchmetrics `CLIPScore` of PIL images against their prompts: 100 x the mean cosine of the CLIP embeddings,
    floored at 0. `model`: a CLIP
    folder or Hub id (transformers' CLIPModel + CLIPProcessor; the official evaluation uses
    `openai/clip-vit-large-patch14`), or a callable returning `(model, processor)`.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(model, str | Path):
        model = functools.partial(_clip, str(model))

    def load():
        clip, processor = model()
        return ProjectedFeatures(clip), processor

    metric = CLIPScore(model_name_or_path=load)
    for start in range(0, len(images), 16):
        batch = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                 for image in images[start:start + 16]]
        metric.update(batch, list(texts[start:start + 16]))
    return float(metric.compute())


__all__ = ["HFImageFeatures", "caption_metrics", "clip_score", "clip_similarities", "exact_match", "fid_score",
           "java_available", "normalize_vqa_answer", "python_ptb_tokenize", "vqa_accuracy", "vqa_metrics"]
