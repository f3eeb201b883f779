"""Small real image-text datasets written offline from images that ship with scikit-learn and scikit-image, in the
`imagefolder` layout every stage reads (`metadata.jsonl` with `file_name` and `text`). Used by the tests, the
quickstart and as a format example; needs the `dev` extras (scikit-learn, scikit-image).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lavit.atomic import write_atomically

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# colours for the digits: the class is in the shape, the colour varies the pixels
DIGIT_COLOURS = ((255, 255, 255), (255, 220, 120), (140, 220, 255), (180, 255, 160))


def digit_caption(label: int) -> str:
    return f"the digit {DIGIT_NAMES[label]}"


def write_imagefolder(folder, images: list[Image.Image], texts: list[str], extra: list[dict] | None = None) -> Path:
    """Writes PNGs and `metadata.jsonl` (atomically: a temporary file renamed into place)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, text) in enumerate(zip(images, texts, strict=True)):
        file_name = f"{index:05d}.png"
        image.save(folder / file_name)
        lines.append(json.dumps({"file_name": file_name, "text": text, **((extra or [{}] * len(texts))[index])}))
    write_atomically(folder / "metadata.jsonl", lambda temporary: Path(temporary).write_text("\n".join(lines) + "\n"))
    return folder


def digit_images(count: int | None = None, size: int = 64, offset: int = 0, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits, upscaled to `size` pixels and coloured: (PIL images, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    stop = len(digits.images) if count is None else min(len(digits.images), offset + count)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(offset, stop):
        intensity = digits.images[index] / 16.0
        colour = np.array(DIGIT_COLOURS[rng.integers(len(DIGIT_COLOURS))], dtype=np.float64)
        rgb = (intensity[..., None] * colour).astype(np.uint8)
        images.append(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
        labels.append(int(digits.target[index]))
    return images, labels


def write_digits_imagefolder(folder, count: int | None = None, size: int = 64, offset: int = 0) -> Path:
    """An imagefolder of coloured digits captioned "the digit seven" (with a `label` column)."""
    images, labels = digit_images(count, size, offset)
    return write_imagefolder(folder, images, [digit_caption(label) for label in labels],
                             [{"label": label} for label in labels])


def photo_images() -> dict[str, np.ndarray]:
    """The RGB photographs shipped with scikit-image and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
              "tissue": data.immunohistochemistry(), "galaxies": data.hubble_deep_field(), "retina": data.retina(),
              "colour wheel": data.colorwheel(), "motorcycle": data.stereo_motorcycle()[0]}
    sample = load_sample_images()
    photos.update({"temple": sample.images[0], "flower": sample.images[1]})
    return photos


PHOTO_CLASSES = ("astronaut", "cat", "coffee", "rocket", "tissue", "galaxies", "retina", "motorcycle", "temple",
                 "flower")


def photo_caption(label: int) -> str:
    return f"a photo of a {PHOTO_CLASSES[label]}"


def photo_crops(count: int, size: int = 64, held_out: bool = False, seed: int = 0):
    """
    Square crops of ten shipped photographs (`PHOTO_CLASSES`), resized to `size` pixels: (PIL images, labels), the
    classes in turn. The crop side is a random 20-25% of the photo's shorter side. Training crops lie in the left
    three quarters of each photo and held-out crops (`held_out=True`) in its right quarter, so no held-out pixel is
    ever trained on.
    """
    photos = photo_images()
    rng = np.random.default_rng([seed, int(held_out)])
    images, labels = [], []
    for index in range(count):
        label = index % len(PHOTO_CLASSES)
        photo = photos[PHOTO_CLASSES[label]]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.2, 0.25))
        boundary = width - width // 4
        left_range = (boundary, width - side) if held_out else (0, boundary - side)
        left = int(rng.integers(left_range[0], left_range[1] + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        images.append(crop.resize((size, size), Image.Resampling.BICUBIC))
        labels.append(label)
    return images, labels


def write_photo_crops_imagefolder(folder, count: int, size: int = 64, held_out: bool = False, seed: int = 0) -> Path:
    """An imagefolder of `photo_crops` captioned "a photo of a cat" (with a `label` column)."""
    images, labels = photo_crops(count, size, held_out, seed)
    return write_imagefolder(folder, images, [photo_caption(label) for label in labels],
                             [{"label": label} for label in labels])


def write_photo_imagefolder(folder) -> Path:
    """An imagefolder of the shipped photographs captioned "a photo of a <name>"."""
    photos = photo_images()
    return write_imagefolder(folder, [Image.fromarray(photo) for photo in photos.values()],
                             [f"a photo of a {name}" for name in photos])
