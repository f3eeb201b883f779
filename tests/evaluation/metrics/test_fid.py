"""The `fid` evaluate module: which features torchmetrics is given for each kind of `features`, the uint8 batches
both image sets become, the Fréchet distance against a value worked out by hand (solid-colour images under a
colour-mean feature), its independence from order and batching, and the refusals."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from lavit.evaluation.metrics import load_metric, metric_module

FID = metric_module("fid")


class MeanRedGreen(torch.nn.Module):
    """Features of a uint8 image batch: the mean red and green values (B, 2), so a solid colour is its own
    feature."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :2].double().mean(dim=(2, 3))


def solid(red: int, green: int) -> Image.Image:
    return Image.new("RGB", (12, 10), (red, green, 0))


# generated features (0,0) (2,0) (0,2) (2,2): mean (1,1), covariance 4/3 I (n - 1 = 3);
# real features (1,1) (5,1) (1,5) (5,5): mean (3,3), covariance 16/3 I.
# FID = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^1/2) = 8 + 2 * (4/3 + 16/3 - 2 * 8/3) = 8 + 8/3
GENERATED = [solid(r, g) for r, g in ((0, 0), (2, 0), (0, 2), (2, 2))]
REAL = [solid(r, g) for r, g in ((1, 1), (5, 1), (1, 5), (5, 5))]
HAND_WORKED_FID = 8 + 8 / 3


def test_the_distance_matches_the_hand_worked_value():
    assert FID.frechet_distance(GENERATED, REAL, MeanRedGreen(), image_size=8) == pytest.approx(HAND_WORKED_FID,
                                                                                                 rel=1e-6)
    assert FID.frechet_distance(REAL, REAL, MeanRedGreen(), image_size=8) == pytest.approx(0.0, abs=1e-6)


def test_the_module_scores_images_in_any_order_and_batches_the_same():
    metric = load_metric("fid")
    images, real = [*GENERATED, *REAL], [False] * 4 + [True] * 4
    order = [5, 0, 7, 3, 1, 6, 2, 4]
    metric.add_batch(images=[images[index] for index in order[:3]], real=[real[index] for index in order[:3]])
    metric.add_batch(images=[images[index] for index in order[3:]], real=[real[index] for index in order[3:]])
    assert metric.compute(features=MeanRedGreen(), image_size=8)["fid"] == pytest.approx(HAND_WORKED_FID, rel=1e-6)


def test_fewer_than_two_images_in_a_set_is_refused_with_the_counts():
    with pytest.raises(ValueError, match="at least 2 generated and 2 real images, got 1 and 4"):
        FID.frechet_distance(GENERATED[:1], REAL, MeanRedGreen(), image_size=8)
    with pytest.raises(ValueError, match="got 4 and 1"):
        load_metric("fid").compute(images=[*GENERATED, REAL[0]], real=[False] * 4 + [True],
                                   features=MeanRedGreen(), image_size=8)


def test_feature_arguments_for_each_kind_of_source(tmp_path):
    assert FID.fid_feature_extractor(None) == {"feature": 2048}  # torchmetrics' own Inception
    module = MeanRedGreen()
    assert FID.fid_feature_extractor(module)["feature"] is module
    assert FrechetInceptionDistance(**FID.fid_feature_extractor(module), input_img_size=(3, 4, 4)).inception is module
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")  # only its presence is checked here; torchmetrics reads it
    assert FID.fid_feature_extractor(str(weights)) == {"feature": 2048, "feature_extractor_weights_path": str(weights)}
    with pytest.raises(FileNotFoundError, match=r"Inception weights not found: .*missing\.pt"):
        FID.fid_feature_extractor(str(tmp_path / "missing.pt"))


def test_every_image_becomes_a_square_rgb_uint8_batch_of_at_most_the_batch_size():
    images = [Image.new("L", (5, 7), 200), Image.new("RGBA", (3, 3), (10, 20, 30, 0)), solid(1, 2)]
    batches = list(FID._uint8_batches(images, size=4, batch_size=2))
    assert [tuple(batch.shape) for batch in batches] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    assert all(batch.dtype == torch.uint8 and batch.is_contiguous() for batch in batches)
    assert np.all(batches[0][0].numpy() == 200)  # grey -> the same value in all three channels
    assert batches[0][1, :, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, colour kept
