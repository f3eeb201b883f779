"""Crash-safe image writes of `lavit.atomic` (folder replacement: tests/distributed/test_crash.py)."""

import numpy as np
import pytest
from conftest import real_photos
from PIL import Image

from lavit.atomic import save_png_atomically


def test_save_png_atomically_writes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "deep" / "folder" / "image.png"
    save_png_atomically(Image.fromarray(real_photos()[2]), target)  # parent folders are created
    assert np.array_equal(np.asarray(Image.open(target)), real_photos()[2])
    with pytest.raises(OSError, match="CMYK"):  # PNG cannot store CMYK: PIL fails after opening its output file
        save_png_atomically(Image.new("CMYK", (8, 8)), target)
    assert np.array_equal(np.asarray(Image.open(target)), real_photos()[2])  # the previous file is whole
    assert [path.name for path in target.parent.iterdir()] == ["image.png"]  # no temporary file is left
