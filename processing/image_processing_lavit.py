"""Image processor of LaVIT: any image in, normalised (3, 224, 224) pixels out.

Default = the official preprocessing: RGB, bicubic resize to 224 x 224 (squash, no crop), OpenAI CLIP mean/std.
"""

import io
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ChannelDimension

from .saving_lavit import SOURCE_ATTRIBUTE, SaveBesideSourcesMixin, remember_source

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "shortest_edge_crop")
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def to_rgb_image(image, max_image_pixels: int | None = None, name: str = "image") -> Image.Image:
    """
    Any supported image -> an RGB PIL image, as image viewers show it: the one image reader of the processor, the
    training data, the data sources and the CLI. Accepts PIL images, file paths, encoded bytes (or a file object),
    numpy arrays ((H, W), (H, W, 3|4); uint8, uint16 or float in [0, 1]) and torch tensors ((C, H, W) or (H, W, C),
    same dtypes). A stored EXIF orientation (phone photos) is applied with `PIL.ImageOps.exif_transpose`, as
    `transformers.image_utils.load_image` and `datasets.Image` do; grayscale, palette, CMYK and 16-bit images are
    converted; transparency is composited on white. Unreadable, empty or oversized images raise a `ValueError` that
    names `name`.
    """
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    if isinstance(image, (str, os.PathLike, io.IOBase)):
        source = "the image bytes" if isinstance(image, io.IOBase) else f"image file {os.fspath(image)!r}"
        try:
            with Image.open(image) as opened:
                load_whole(opened)
                image = opened.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{name}: cannot read {source}: {error}") from error
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.float().numpy() if image.dtype == torch.bfloat16 else image.numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, name)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: unsupported image type {type(image).__name__}; give a PIL image, a file path, "
                         f"a numpy array or a torch tensor")
    image = ImageOps.exif_transpose(image)  # drops the orientation tag: an already upright image is left as it is
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} is empty ({image.width} x {image.height} pixels)")
    if max_image_pixels is not None and image.width * image.height > max_image_pixels:
        raise ValueError(f"{name} is too large: {image.width} x {image.height} = {image.width * image.height} pixels, "
                         f"more than max_image_pixels={max_image_pixels}")
    return _pil_to_rgb(image)


def load_whole(image: Image.Image) -> None:
    """`image.load()` that refuses a truncated file (`OSError`) whatever `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says:
    libraries set that process-wide flag on import (lmms-eval does), and under it a cut-off file reads as an image
    whose missing part is grey, which would train and score as if it were whole."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{name}: arrays must be (H, W), (H, W, 3) or (H, W, 4) (or channels-first tensors), "
                         f"got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    else:
        raise ValueError(f"{name}: unsupported array dtype {array.dtype} (use uint8, uint16, float in [0, 1] or bool)")
    return Image.fromarray(np.ascontiguousarray(array))


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit grayscale: PIL's own convert clips at 255, so scale the value range explicitly
        values = np.asarray(image, dtype=np.float32)
        peak = 1.0 if image.mode == "F" and values.max() <= 1.0 else (255.0 if values.max() <= 255 else 65535.0)
        image = Image.fromarray((np.clip(values / peak, 0, 1) * 255).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image


def flatten_images(images) -> list:
    """A single image, a list of images or a list of lists (one per text, as `apply_chat_template` gives) -> list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def channel_statistics(name: str, values, positive: bool) -> list[float]:
    """Per-channel normalisation statistics: three finite numbers (RGB), and above 0 for a std (a 0 divides pixels
    into inf/NaN); a `ValueError` naming the argument otherwise."""
    try:
        numbers = [] if isinstance(values, str) else [float(value) for value in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 3 or not all(np.isfinite(numbers)) or (positive and min(numbers) <= 0):
        allowed = "3 finite numbers > 0 (one per RGB channel)" if positive else "3 finite numbers (one per RGB channel)"
        raise ValueError(f"{name} must be {allowed}, got {values!r}")
    return numbers


class LaVITImageProcessor(SaveBesideSourcesMixin, BaseImageProcessor):
    r"""
    Args:
        size (`dict`, *optional*, defaults to `{"height": 224, "width": 224}`): output size (the encoder's input).
        resize_mode (`str`, *optional*, defaults to `"squash"`): `"squash"` resizes to `size` ignoring the aspect
            ratio (official); `"shortest_edge_crop"` resizes the shorter side to the target and center-crops.
        resample (`str`, *optional*, defaults to `"bicubic"`): `"bicubic"`, `"bilinear"`, `"lanczos"` or `"nearest"`.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, *optional*, defaults to 1/255):
            images are read as 8-bit RGB (0-255) and multiplied by `rescale_factor`.
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean, image_std (OpenAI CLIP statistics).
        max_image_pixels (`int`, *optional*, defaults to 178956970): larger inputs are rejected (PIL's own
            decompression-bomb limit).
    """

    _auto_class = "AutoImageProcessor"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict | None = None,
        resize_mode: str = "squash",
        resample: str = "bicubic",
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        max_image_pixels: int | None = 178956970,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
        self.resize_mode = resize_mode
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = channel_statistics("image_mean", image_mean, positive=False)
        self.image_std = channel_statistics("image_std", image_std, positive=True)
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`BaseImageProcessor.from_pretrained`, remembering the folder (an image processor keeps no `name_or_path`)
        so that `save_pretrained` never mixes files into a folder holding or inside it."""
        return remember_source(super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs),
                               pretrained_model_name_or_path)

    def to_dict(self) -> dict:
        """The settings (`preprocessor_config.json`), without the remembered source folder."""
        output = super().to_dict()
        output.pop(SOURCE_ATTRIBUTE, None)
        return output

    @classmethod
    def from_tokenizer_config(cls, tokenizer_config, **kwargs) -> "LaVITImageProcessor":
        """The official preprocessing for a visual tokenizer: its input size and normalisation statistics."""
        size = tokenizer_config.image_size
        return cls(size={"height": size, "width": size}, image_mean=tokenizer_config.image_mean,
                   image_std=tokenizer_config.image_std, **kwargs)

    def resize_image(self, image: Image.Image, size: dict | None = None, resample: str | None = None) -> Image.Image:
        """`image` at `size` (default: the processor's): squashed, or resized on its shorter side and center-cropped
        (`resize_mode`)."""
        size, resample = size or self.size, RESAMPLING[resample or self.resample]
        height, width = size["height"], size["width"]
        if self.resize_mode == "squash":
            return image.resize((width, height), resample)
        scale = max(width / image.width, height / image.height)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               resample)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))

    def preprocess(self, images, return_tensors: str | None = "pt", do_convert_rgb: bool | None = None,
                   input_data_format=None, data_format="channels_first", **kwargs) -> BatchFeature:
        """
        Images (see [`to_rgb_image`]; nested lists are flattened in order) -> `pixel_values` (B, 3, H, W).

        The standard image-processor arguments of transformers override the processor's settings for this call:
        `size`, `resample`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`. Every image is
        converted to RGB (`do_convert_rgb=False` is refused: the encoder reads three channels) and its layout is
        read from its shape (`input_data_format` is accepted for that reason); the output is channels-first.
        """
        # 1. this call's settings: the processor's, overridden by the standard arguments given
        unknown = sorted(set(kwargs) - set(CALL_SETTINGS))
        if unknown:
            raise ValueError(f"unknown image processor arguments {unknown}; it takes {sorted(CALL_SETTINGS)}")
        if do_convert_rgb is False or data_format not in (None, "channels_first", ChannelDimension.FIRST):
            raise ValueError("LaVITImageProcessor always converts images to RGB and writes channels-first "
                             "pixel_values (the encoder's input); do_convert_rgb=False and other data_format values "
                             "are not supported")
        settings = {name: getattr(self, name) for name in CALL_SETTINGS}
        settings.update({name: value for name, value in kwargs.items() if value is not None})
        flat = flatten_images(images)
        if not flat:
            raise ValueError("no images given")
        mean = np.asarray(channel_statistics("image_mean", settings["image_mean"], positive=False), dtype=np.float32)
        std = np.asarray(channel_statistics("image_std", settings["image_std"], positive=True), dtype=np.float32)
        # 2. read, resize, rescale and normalise each image
        arrays = []
        for index, image in enumerate(flat):
            rgb = self.resize_image(to_rgb_image(image, self.max_image_pixels, name=f"image {index}"),
                                    settings["size"], settings["resample"])
            array = np.asarray(rgb, dtype=np.float32)
            if settings["do_rescale"]:  # dividing by 255 (as the official code) keeps its pixels bit-exact
                scale = 1 / settings["rescale_factor"]
                array = array / np.float32(round(scale)) if abs(scale - round(scale)) < 1e-6 else array / scale
            if settings["do_normalize"]:
                array = (array - mean) / std
            arrays.append(array.transpose(2, 0, 1))
        return BatchFeature({"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)


# the standard image-processor arguments (transformers' `ImagesKwargs` names) a call may override
CALL_SETTINGS = ("size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


# ------------------------------------------------------------------------------------------------ drawing

KEPT_PATCHES_MIN_SIZE = 256  # pixels on the short side: smaller images are enlarged before drawing


def draw_kept_patches(image, keep_mask, grid: int) -> Image.Image:
    """
    `image` (anything [`to_rgb_image`] reads) with the token selector's decision drawn on it, readable on dark and
    light images alike: the `grid` x `grid` patch grid, dropped patches (`keep_mask` False, raster order) washed
    towards grey and crossed out in black and white, and "n of N tokens" in the top-left corner. Images under 256
    pixels on their short side are enlarged first (nearest neighbour) so that lines and crosses stay visible.

    `keep_mask` is a bool tensor or array of `grid * grid` values ((N,) or (grid, grid)), e.g. one row of
    `LaVITTokenizerModel.tokenize(...).keep_mask`; another size raises `ValueError`.
    """
    image = to_rgb_image(image)
    keep_mask = torch.as_tensor(keep_mask).detach().cpu().bool().flatten().numpy()
    if keep_mask.size != grid * grid:
        raise ValueError(f"keep_mask must hold grid * grid = {grid * grid} values, got {keep_mask.size}")
    scale = max(1, -(-KEPT_PATCHES_MIN_SIZE // min(image.size)))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    drawn = Image.fromarray(wash_dropped_patches(np.asarray(image, dtype=np.float32), keep_mask, grid))
    draw = ImageDraw.Draw(drawn)
    for index in np.flatnonzero(~keep_mask):
        row, column = divmod(int(index), grid)
        width, height = drawn.size
        box = (column * width / grid + 2, row * height / grid + 2, (column + 1) * width / grid - 3,
               (row + 1) * height / grid - 3)
        for color, line_width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            draw.line((box[0], box[1], box[2], box[3]), fill=color, width=line_width)
            draw.line((box[0], box[3], box[2], box[1]), fill=color, width=line_width)
    draw_label(draw, f"{int(keep_mask.sum())} of {keep_mask.size} tokens", min(drawn.size))
    return drawn


def wash_dropped_patches(pixels: np.ndarray, keep_mask: np.ndarray, grid: int) -> np.ndarray:
    """(H, W, 3) float pixels -> uint8 pixels with dropped patches washed towards grey and the patch grid drawn."""
    height, width = pixels.shape[:2]
    rows = (np.arange(height) * grid // height)[:, None]
    columns = (np.arange(width) * grid // width)[None, :]
    dropped = ~keep_mask.reshape(grid, grid)[rows, columns]
    pixels = np.where(dropped[..., None], 0.35 * pixels + 0.65 * 128, pixels)
    # grid lines shifted by half the value range: they contrast with any colour, dark or light
    lines = np.zeros((height, width), dtype=bool)
    lines[np.flatnonzero(np.diff(rows[:, 0])) + 1, :] = True
    lines[:, np.flatnonzero(np.diff(columns[0])) + 1] = True
    pixels = np.where(lines[..., None], (pixels + 128) % 256, pixels)
    return pixels.round().astype(np.uint8)


def draw_label(draw: ImageDraw.ImageDraw, label: str, short_side: int) -> None:
    """White text on a black box in the top-left corner, sized to the image."""
    try:  # a scalable font where PIL has FreeType, else its small bitmap font
        font = ImageFont.load_default(size=max(10, short_side // 20))
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((4, 4), label, font=font)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 255, 255), font=font)


__all__ = ["LaVITImageProcessor"]
