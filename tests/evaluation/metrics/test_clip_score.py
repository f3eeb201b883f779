"""The `clip_score` evaluate module on a tiny random CLIP: 100 x the mean cosine of the projected image and text
embeddings, floored at 0, over any number of batches of 16; the evaluate module with a model given as a callable;
the embeddings unwrapped from transformers' output objects; and the refusal without a model."""

import functools

import pytest
import torch
from conftest import real_photos, tiny_clip
from PIL import Image

from lavit.evaluation.metrics import load_metric, metric_module

CLIP = metric_module("clip_score")


@functools.cache
def cached_clip():
    """One tiny CLIP for the file (`conftest.tiny_clip`): the tests leave it as they found it."""
    return tiny_clip()


@functools.cache
def small_photos() -> tuple[Image.Image, ...]:
    return tuple(Image.fromarray(photo).resize((48, 48)).rotate(angle) for angle in (0, 90, 180, 270)
                 for photo in real_photos())


def photos(count: int) -> list[Image.Image]:
    return list(small_photos()[:count])


@torch.no_grad()
def cosines(model, processor, images, texts) -> torch.Tensor:
    """Each image's cosine to its text, straight from transformers (independent of the module)."""
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_the_score_is_100_times_the_mean_cosine_floored_at_0_over_batches_of_16():
    model, processor = cached_clip()
    images, texts = photos(17), ["an astronaut", "a cat", "a cup of coffee", "a rocket"] * 4 + ["a cat"]
    mean = float(cosines(model, processor, images, texts).mean())
    scores = {}
    for sign in (1, -1):  # the text projection negated negates every cosine: one sign gives a mean <= 0
        with torch.no_grad():
            model.text_projection.weight.mul_(sign)
        scores[sign] = CLIP.mean_clip_score(images, texts, lambda: (model, processor))
    assert max(scores.values()) == pytest.approx(100 * abs(mean), rel=1e-4)
    assert min(scores.values()) == 0.0
    assert model.text_projection.weight.equal(cached_clip()[0].text_projection.weight)  # negated twice: as built


def test_the_module_takes_a_callable_that_returns_model_and_processor():
    model, processor = cached_clip()
    images, texts = photos(3), ["an astronaut", "a cat", "a cup of coffee"]
    mean = float(cosines(model, processor, images, texts).mean())
    score = load_metric("clip_score").compute(predictions=images, references=texts,
                                              model=lambda: (model, processor))["clip_score"]
    assert score == pytest.approx(max(0.0, 100 * mean), rel=1e-4, abs=1e-4)


def test_projected_features_are_tensors_whatever_transformers_returns():
    model, processor = cached_clip()
    wrapped = CLIP.ProjectedFeatures(model)
    inputs = processor(text=["a cat"], images=photos(1), return_tensors="pt")
    with torch.no_grad():
        image = wrapped.get_image_features(pixel_values=inputs["pixel_values"])
        text = wrapped.get_text_features(input_ids=inputs["input_ids"])
    assert isinstance(image, torch.Tensor) and image.shape == text.shape == (1, 8)  # projection_dim
    assert CLIP.ProjectedFeatures._embeddings(image) is image
    assert wrapped.config is model.config and not wrapped.model.training


def test_compute_without_a_model_names_what_is_missing():
    with pytest.raises(ValueError, match=r"CLIP score needs a CLIP model: compute\(\.\.\., model=PATH_OR_HUB_ID\)"):
        load_metric("clip_score").compute(predictions=photos(1), references=["a cat"])
