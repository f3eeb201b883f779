"""CLIP score as an `evaluate` module: torchmetrics' `CLIPScore` of images against their prompts (100 x the mean
cosine of the CLIP embeddings, floored at 0), and the per-image similarities the official evaluation ranks
candidates by.

    metric = evaluate.load(lavit.evaluation.metric_path("clip_score"))
    metric.add_batch(predictions=pil_images, references=prompts)
    metric.compute(model="openai/clip-vit-large-patch14")  # {"clip_score": ...}

Self-contained (evaluate copies this file into its module cache).
"""

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

_DESCRIPTION = "CLIP score: 100 x the mean cosine between CLIP image and text embeddings, floored at 0."
_CITATION = """@inproceedings{hessel2021clipscore, title={CLIPScore: A Reference-free Evaluation Metric for Image
Captioning}, author={Hessel, Jack and others}, booktitle={EMNLP}, year={2021}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[PIL.Image]`): the images.
    references (`list[str]`): the prompt of each image.
    model: a CLIP folder or Hub id (transformers' CLIPModel + CLIPProcessor), or a callable returning
        `(model, processor)`.
Returns:
    `{"clip_score": score}`.
"""


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


def mean_clip_score(images: Sequence, texts: Sequence[str], model: str | Callable) -> float:
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Value("string")}))

    def _compute(self, predictions, references, model=None):
        if model is None:
            raise ValueError("CLIP score needs a CLIP model: compute(..., model=PATH_OR_HUB_ID)")
        return {"clip_score": mean_clip_score(list(predictions), list(references), model)}
