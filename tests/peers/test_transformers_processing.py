"""transformers' own processor and image-processor tests (`ProcessorTesterMixin`, `ImageProcessingTestMixin`) of the
installed release, run against `LaVITProcessor` and `LaVITImageProcessor`. A test LaVIT cannot meet is skipped next
to its reason."""

import unittest

from conftest import tiny_text_tokenizer
from peer_tests import upstream_tests

from lavit import LaVITImageProcessor, LaVITProcessor

UPSTREAM = upstream_tests("transformers")
test_processing_common = __import__(f"{UPSTREAM}.test_processing_common", fromlist=["ProcessorTesterMixin"])
test_image_processing_common = __import__(f"{UPSTREAM}.test_image_processing_common",
                                          fromlist=["ImageProcessingTestMixin"])
ProcessorTesterMixin = test_processing_common.ProcessorTesterMixin
ImageProcessingTestMixin = test_image_processing_common.ImageProcessingTestMixin
ImageProcessingTester = test_image_processing_common.ImageProcessingTester

IMAGE_SIZE = 56


class LaVITProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = LaVITProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return tiny_text_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return LaVITImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})

    URL_REASON = "reads its test image from huggingface.co; the peer suites run offline"
    test_apply_chat_template_image_0 = unittest.skip(URL_REASON)(lambda self: None)
    test_apply_chat_template_image_1 = unittest.skip(URL_REASON)(lambda self: None)


class LaVITImageProcessingTester(ImageProcessingTester):
    """Random images of 30-400 pixels; LaVIT resizes each to the tokenizer's square input (no crop)."""

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # the mixin looks classes up in transformers' table of built-in models; LaVIT's one image processor is PIL-based
        return {"pil": LaVITImageProcessor}


class LaVITImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = LaVITImageProcessingTester

    @unittest.skip("LaVIT's encoder reads RGB: every image is converted (RGBA composited on white), so the tester's "
                   "4-channel statistics with do_convert_rgb=False do not apply")
    def test_call_numpy_4_channels(self):
        pass

    @unittest.skip("LaVIT's image processor reads every input through one PIL loader (to_rgb_image: EXIF orientation, "
                   "16-bit, palette, alpha) that the training data and the CLI share; a torchvision backend would be "
                   "a second path with other pixels")
    def test_new_models_require_torchvision_backend(self):
        pass
