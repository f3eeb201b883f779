"""FID as an `evaluate` module: the Fréchet distance between the features of generated and real images
(torchmetrics' `FrechetInceptionDistance`, both sets resized alike), with the standard Inception features or those
of any transformers vision model.

    metric = evaluate.load(lavit.evaluation.metric_path("fid"))
    metric.add_batch(images=generated_pil_images, real=[False] * len(generated_pil_images))
    metric.add_batch(images=real_pil_images, real=[True] * len(real_pil_images))  # the two sets may differ in size
    metric.compute(features="path/to/dinov2")  # {"fid": ...}

Self-contained (evaluate copies this file into its module cache).
"""

from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

_DESCRIPTION = "Fréchet distance between the image features of generated and real images (torchmetrics)."
_CITATION = """@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium}, author={Heusel, Martin and others}, booktitle={NeurIPS}, year={2017}}"""
_KWARGS_DESCRIPTION = """
Args:
    images (`list[PIL.Image]`): generated and real images (at least 2 of each), in any order and batches.
    real (`list[bool]`): whether each image is a real one.
    features: `None` (torchmetrics' Inception, needs torch-fidelity), a `.pth` of its weights, a module, or a
        transformers vision model path/Hub id (see `fid_feature_extractor`).
    image_size (`int`): both sets are resized to this square size first (default 299).
Returns:
    `{"fid": distance}`.
"""


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


def frechet_distance(generated: Sequence, real: Sequence, features=None, image_size: int = 299) -> float:
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Fid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"images": datasets.Image(), "real": datasets.Value("bool")}))

    def _compute(self, images, real, features=None, image_size=299):
        generated = [image for image, is_real in zip(images, real, strict=True) if not is_real]
        return {"fid": frechet_distance(generated, [image for image, is_real in zip(images, real, strict=True)
                                                    if is_real], features, image_size)}
