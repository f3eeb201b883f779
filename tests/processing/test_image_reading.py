"""Images are read as every viewer reads them: EXIF orientation applied and every PIL mode converted the same way on
every path (processor, kept-patch drawing, training data, CLI), checked against what `datasets`' `Image` decodes."""

import numpy as np
import pytest
import torch
from conftest import real_photos
from datasets import Image as ImageFeature
from lavit.processing.image_processing_lavit import LaVITImageProcessor, draw_kept_patches, to_rgb_image
from lavit.training.data import decode_image, load_records
from PIL import Image

ROTATE_90_CW = 6  # EXIF Orientation 6: the stored pixels are shown turned 90 degrees clockwise


def sideways_jpeg(folder):
    """A phone-style JPEG: the upright photo is 451 x 300, stored 300 x 451 with Orientation 6."""
    upright = Image.fromarray(real_photos()[1])  # chelsea: 451 wide, 300 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cat.jpg"
    stored.save(path, exif=exif, quality=95)
    (folder / "metadata.jsonl").write_text('{"file_name": "cat.jpg", "text": "a cat"}\n')
    return path, upright.size


def test_exif_orientation_is_applied_on_every_path(tmp_path, lavit_processor, lavit_model, capsys):
    from datasets import load_dataset

    path, upright_size = sideways_jpeg(tmp_path / "photos")
    assert upright_size == (451, 300) and Image.open(path).size == (300, 451)
    reference = load_dataset("imagefolder", data_dir=str(tmp_path / "photos"), split="train")[0]["image"]
    assert reference.size == upright_size
    expected = np.asarray(reference.convert("RGB"))

    assert np.array_equal(np.asarray(to_rgb_image(path)), expected)  # processor, CLI (open_image)
    assert np.array_equal(np.asarray(to_rgb_image(Image.open(path))), expected)  # a PIL image straight from open
    assert np.array_equal(np.asarray(to_rgb_image(path.read_bytes())), expected)
    record = next(iter(load_records(str(tmp_path / "photos"))))  # training data sources
    assert np.array_equal(np.asarray(decode_image(record["image"])), expected)
    from_file = lavit_processor(images=[str(path)], text="<image>")["pixel_values"]
    from_reference = lavit_processor(images=[reference], text="<image>")["pixel_values"]
    assert torch.equal(from_file, from_reference)
    # the tokenizer's own preprocessing and the kept-patch drawing (CLI `tokenize --visualize`, demo) read files too
    image_processor = LaVITImageProcessor.from_tokenizer_config(lavit_model.visual_tokenizer.config)
    assert torch.equal(image_processor(images=str(path))["pixel_values"],
                       image_processor(images=reference)["pixel_values"])
    keep_mask = torch.arange(lavit_model.config.tokenizer_config.num_patches) % 3 == 0
    grid = round(keep_mask.numel() ** 0.5)
    assert np.array_equal(np.asarray(draw_kept_patches(path, keep_mask, grid)),
                          np.asarray(draw_kept_patches(reference, keep_mask, grid)))
    # an image already made upright is not turned again
    assert to_rgb_image(to_rgb_image(path)).size == upright_size


def mode_images() -> dict[str, Image.Image]:
    """One image per mode PIL reads: bit depths, palettes (with transparency), alpha, CMYK."""
    photo = Image.fromarray(real_photos()[2]).resize((40, 30))
    gray = np.asarray(photo.convert("L"), dtype=np.uint16)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1)))
    rgba = photo.copy()
    rgba.putalpha(alpha)
    palette_alpha = photo.quantize(16)
    palette_alpha.info["transparency"] = 0
    la = photo.convert("L")
    la.putalpha(alpha)
    return {
        "1": photo.convert("1"), "L": photo.convert("L"), "P": photo.quantize(16), "P+transparency": palette_alpha,
        "LA": la, "RGB": photo, "RGBA": rgba, "CMYK": photo.convert("CMYK"),
        "I;16": Image.fromarray(gray * 257), "I": Image.fromarray((gray * 257).astype(np.int32)),
        "F": Image.fromarray(gray.astype(np.float32) / 255.0),
    }


FORMATS = {"CMYK": "TIFF", "I": "TIFF", "F": "TIFF"}
VIEWED_AS_PIL_CONVERTS = {"1", "L", "P", "RGB", "CMYK"}  # no alpha, 8 bits: PIL's RGB conversion is the view


@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_mode_reads_as_datasets_decodes_it(tmp_path, mode):
    image = mode_images()[mode]
    path = tmp_path / f"image.{FORMATS.get(mode, 'PNG').lower()}"
    image.save(path)
    decoded = ImageFeature().decode_example({"path": str(path), "bytes": None})
    ours = to_rgb_image(path)
    assert ours.mode == "RGB" and ours.size == decoded.size == image.size
    # the same pixels as the reader applied to datasets' decoding of the file: one decoder, one conversion
    assert np.array_equal(np.asarray(ours), np.asarray(to_rgb_image(decoded)))
    as_rgb = np.asarray(ImageFeature(mode="RGB").decode_example({"path": str(path), "bytes": None}))
    if mode in VIEWED_AS_PIL_CONVERTS:
        assert np.array_equal(np.asarray(ours), as_rgb)
    elif mode in ("RGBA", "LA", "P+transparency"):
        # a viewer shows transparent pixels over a background (white here), never the colour hidden under alpha 0
        transparent = np.asarray(decoded.convert("RGBA"))[..., 3] == 0
        assert transparent.any() and (np.asarray(ours)[transparent] == 255).all()
    else:  # 16/32-bit and float grayscale, made from the 8-bit gray photo: scaled back to it (PIL's conversion clips)
        gray = np.asarray(mode_images()["L"], dtype=int)
        assert np.abs(np.asarray(ours)[..., 0].astype(int) - gray).max() <= 1
        assert not np.array_equal(as_rgb[..., 0], np.asarray(ours)[..., 0])
