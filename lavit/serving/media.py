"""Images of chat requests: `image_url` parts as data URLs, or local files from the one folder the operator allows.

The pixel count is read from the image header and checked before the pixels are decoded; anything that is not an
image, a folder escape (`..`, symlinks) and remote URLs are refused with an error naming the part.
"""

import base64
import binascii
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .schemas import OpenAIError


def read_image_url(url: str, param: str, max_pixels: int, allowed_local_path: str | None):
    """The RGB image an `image_url.url` names: a `data:image/...;base64,` URL, or (only when the operator allowed a
    folder) a `file://` URL or path inside that folder. Raises `OpenAIError` naming `param`."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, param)
    elif url.startswith(("http://", "https://")):
        raise OpenAIError("remote image URLs are not fetched by this server; send the image as a data URL "
                          "(data:image/png;base64,...)", param)
    else:
        data = _local_file_bytes(url, param, allowed_local_path)
    return _decode(data, param, max_pixels)


def _data_url_bytes(url: str, param: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise OpenAIError("a data URL must look like data:image/png;base64,<base64 data>", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise OpenAIError(f"the data URL is not valid base64: {error}", param) from error


def _local_file_bytes(url: str, param: str, allowed_local_path: str | None) -> bytes:
    if allowed_local_path is None:
        raise OpenAIError("local image files are not allowed on this server (the operator allows a folder with "
                          "--allowed-local-media-path); send the image as a data URL", param)
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    allowed = Path(allowed_local_path).resolve()
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(allowed):
        raise OpenAIError(f"{path} is outside the folder this server allows for local images", param)
    if not resolved.is_file():
        raise OpenAIError(f"{path} is not a file", param)
    return resolved.read_bytes()


def _decode(data: bytes, param: str, max_pixels: int):
    from lavit.processing.image_processing_lavit import load_whole, to_rgb_image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise OpenAIError(f"the image is {width}x{height} = {width * height} pixels; this server takes at "
                                  f"most {max_pixels}", param)
            load_whole(image)
            return to_rgb_image(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise OpenAIError(f"the data is not a readable image: {error}", param) from error
