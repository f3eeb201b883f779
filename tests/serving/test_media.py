"""`read_image_url` of `lavit.serving.media`, called directly: data URLs and files of the allowed folder give the RGB
image they hold (any PNG mode), the pixel limit is exact and read from the header, and every refusal (a folder not
allowed, a link or `..` out of it, a folder instead of a file, a malformed data URL) is an `OpenAIError` naming the
part and the problem."""

import base64
import functools
import io

import numpy as np
import pytest
from conftest import real_photos
from PIL import Image

from lavit.serving.media import read_image_url
from lavit.serving.schemas import OpenAIError

PARAM = "messages[0].content[1].image_url"


@functools.cache
def cat() -> Image.Image:
    return Image.fromarray(real_photos()[1])


def photo(size=(24, 16), mode="RGB") -> Image.Image:
    """A real photo, shrunk to `size` (width, height) and converted to `mode`."""
    return cat().resize(size).convert(mode)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def refusal(url: str, allowed=None, max_pixels=10**6) -> str:
    with pytest.raises(OpenAIError) as raised:
        read_image_url(url, PARAM, max_pixels, allowed)
    assert raised.value.param == PARAM and raised.value.status == 400
    return raised.value.message


def test_a_data_url_gives_the_rgb_image_it_holds():
    image = photo()
    read = read_image_url(data_url(image), PARAM, 10**6, None)
    assert read.mode == "RGB" and read.size == (24, 16)
    assert np.array_equal(np.asarray(read), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_every_png_mode_is_read_as_rgb(mode):
    read = read_image_url(data_url(photo(mode=mode)), PARAM, 10**6, None)
    assert read.mode == "RGB" and read.size == (24, 16)


def test_the_pixel_limit_is_exact():
    url = data_url(photo((24, 16)))
    assert read_image_url(url, PARAM, 24 * 16, None).size == (24, 16)
    message = refusal(url, max_pixels=24 * 16 - 1)
    assert "24x16 = 384 pixels" in message and str(24 * 16 - 1) in message


def test_the_pixel_limit_is_checked_before_decoding():
    # a valid PNG header with a cut-off body: over the limit it is refused for its size, not as a broken image
    truncated = png(photo((64, 64)))[:60]
    url = "data:image/png;base64," + base64.b64encode(truncated).decode()
    assert "pixels" in refusal(url, max_pixels=100)
    assert "not a readable image" in refusal(url, max_pixels=10**6)


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,", "must look like data:image/png;base64"),
    ("data:image/png;charset=utf-8,abcd", "must look like"),
    ("data:image/png;base64,abc", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode(), "not a readable image"),
    ("http://example.com/cat.png", "remote image URLs are not fetched"),
    ("https://example.com/cat.png", "data URL"),
])
def test_malformed_and_remote_urls_are_refused_by_name(url, words):
    assert words in refusal(url)


def test_local_files_need_an_allowed_folder(tmp_path):
    (tmp_path / "cat.png").write_bytes(png(photo()))
    message = refusal(str(tmp_path / "cat.png"))
    assert "local image files are not allowed" in message and "--allowed-local-media-path" in message
    for url in (str(tmp_path / "cat.png"), f"file://{tmp_path / 'cat.png'}"):
        assert read_image_url(url, PARAM, 10**6, str(tmp_path)).size == (24, 16)


def test_a_file_url_with_escaped_characters_is_unquoted(tmp_path):
    (tmp_path / "a cat.png").write_bytes(png(photo()))
    assert read_image_url(f"file://{tmp_path}/a%20cat.png", PARAM, 10**6, str(tmp_path)).size == (24, 16)


def test_links_and_dot_dots_out_of_the_folder_are_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (outside / "secret.png").write_bytes(png(photo()))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "inner").symlink_to(outside, target_is_directory=True)
    for path in (allowed / "link.png", allowed / "inner" / "secret.png", allowed / ".." / "outside" / "secret.png"):
        assert "outside the folder" in refusal(str(path), allowed=str(allowed))
    # a folder whose name starts like the allowed one's is not inside it
    (tmp_path / "allowed2").mkdir()
    (tmp_path / "allowed2" / "cat.png").write_bytes(png(photo()))
    assert "outside the folder" in refusal(str(tmp_path / "allowed2" / "cat.png"), allowed=str(allowed))


def test_a_link_inside_the_folder_is_read(tmp_path):
    (tmp_path / "cat.png").write_bytes(png(photo()))
    (tmp_path / "alias.png").symlink_to(tmp_path / "cat.png")
    assert read_image_url(str(tmp_path / "alias.png"), PARAM, 10**6, str(tmp_path)).size == (24, 16)


def test_a_folder_or_a_missing_file_is_not_a_file(tmp_path):
    (tmp_path / "sub").mkdir()
    assert "is not a file" in refusal(str(tmp_path / "sub"), allowed=str(tmp_path))
    assert "is not a file" in refusal(str(tmp_path / "missing.png"), allowed=str(tmp_path))
