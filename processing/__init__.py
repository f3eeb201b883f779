"""LaVIT preprocessing and pipelines. The files in this folder are copied flat into Hub model folders (remote code),
so they only import each other as `from .module import X`."""

from .image_processing_lavit import LaVITImageProcessor
from .pipelines_lavit import LaVITTextToImagePipeline
from .processing_lavit import LaVITProcessor

__all__ = ["LaVITImageProcessor", "LaVITProcessor", "LaVITTextToImagePipeline"]
