"""LaVITImageProcessor as the tokenizer's preprocessing, and the kept-patch drawing (`draw_kept_patches`)."""

import numpy as np
import pytest
import torch
from conftest import real_photos, tiny_tokenizer_config
from lavit.processing.image_processing_lavit import draw_kept_patches, to_rgb_image
from PIL import Image
from transformers import CLIPImageProcessorPil

from lavit import LaVITImageProcessor, LaVITTokenizerConfig
from lavit.atomic import save_png_atomically


@pytest.mark.parametrize("config", [LaVITTokenizerConfig(), tiny_tokenizer_config()], ids=["official", "tiny"])
def test_tokenizer_preprocessing_is_the_official_clip_preprocessing(config):
    """The official preprocessing (bicubic resize to the encoder size, no crop, CLIP normalisation) is transformers'
    CLIP image processor without its center crop: the same pixel values, bit for bit, from every input type."""
    ours = LaVITImageProcessor.from_tokenizer_config(config)
    reference = CLIPImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size}, do_center_crop=False,
        resample=Image.Resampling.BICUBIC, image_mean=config.image_mean, image_std=config.image_std,
    )
    for photo in real_photos():
        expected = reference(images=photo, return_tensors="pt")["pixel_values"]
        assert expected.shape == (1, 3, config.image_size, config.image_size)
        for image in (photo, Image.fromarray(photo), torch.from_numpy(photo).permute(2, 0, 1) / 255.0):
            assert torch.equal(ours(images=image, return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize("brightness", [1.0, 0.04], ids=["photo", "dark-photo"])
def test_visualize_marks_dropped_patches_visibly_on_any_image(tiny_model, tmp_path, brightness):
    """processor -> tokenize -> draw_kept_patches -> save_png_atomically, as `lavit tokenize --visualize` does."""
    photo = (real_photos()[0] * brightness).round().astype(np.uint8)  # 512 x 512; the dark one is nearly black
    path = tmp_path / "out" / "astronaut.png"
    image_processor = LaVITImageProcessor.from_tokenizer_config(tiny_model.config)
    keep_mask = tiny_model.tokenize(image_processor(images=photo)["pixel_values"], max_tokens=4).keep_mask[0]
    grid = tiny_model.config.image_size // tiny_model.config.patch_size
    save_png_atomically(draw_kept_patches(photo, keep_mask, grid), path)
    assert int(keep_mask.sum()) == 4
    written = np.asarray(Image.open(path)).astype(int)
    assert written.shape == photo.shape
    cell_h, cell_w = photo.shape[0] // grid, photo.shape[1] // grid
    washed = []
    for index, kept in enumerate(keep_mask.tolist()):
        row, col = divmod(index, grid)
        if row == 0:
            continue  # the token count label sits over the first row
        point = (row * cell_h + cell_h // 4, col * cell_w + cell_w // 2)  # off the patch's cross and grid lines
        change = np.abs(written[point] - photo[point].astype(int)).max()
        center = written[row * cell_h + cell_h // 2 - 2 : row * cell_h + cell_h // 2 + 3,
                         col * cell_w + cell_w // 2 - 2 : col * cell_w + cell_w // 2 + 3]
        if kept:
            assert change == 0  # kept patches keep their pixels
        else:
            washed.append(change)
            assert center.min() <= 10 and center.max() >= 245  # a black-and-white cross: visible on any colour
    if brightness < 0.1:
        assert min(washed) >= 40  # dropped patches of a nearly black photo turn visibly grey
    row_border = written[cell_h, :, 0] - photo[cell_h, :, 0].astype(int)
    assert (np.abs(row_border) >= 100).mean() > 0.9  # grid lines stand out from dark and light pixels alike
    with pytest.raises(ValueError, match="cannot read image file"):
        image_processor(images=tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="cannot read image file"):
        draw_kept_patches(tmp_path / "missing.jpg", keep_mask, grid)


def test_draw_kept_patches_enlarges_small_images_and_checks_the_mask():
    photo = np.asarray(to_rgb_image(real_photos()[1]).resize((56, 42)))  # smaller than 256 on both sides
    keep_mask = torch.zeros(4, 4, dtype=torch.bool)
    keep_mask[1:, :] = True
    drawn = draw_kept_patches(photo, keep_mask, 4)
    assert drawn.size == (56 * 7, 42 * 7)  # the smallest integer scale that reaches 256 on the short side
    pixels = np.asarray(drawn).astype(int)
    enlarged = np.asarray(Image.fromarray(photo).resize(drawn.size, Image.Resampling.NEAREST)).astype(int)
    kept_inside = (slice(42 * 7 // 4 + 5, 42 * 7 // 2 - 5), slice(56 * 7 // 4 + 5, 56 * 7 // 2 - 5))
    assert np.array_equal(pixels[kept_inside], enlarged[kept_inside])  # a kept patch: the enlarged pixels
    assert np.array_equal(np.asarray(draw_kept_patches(photo, keep_mask.flatten().numpy(), 4)), pixels)
    with pytest.raises(ValueError, match="grid \\* grid = 25 values, got 16"):
        draw_kept_patches(photo, keep_mask, 5)
