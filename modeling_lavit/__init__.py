"""LaVIT model classes. The files in this folder are copied flat into Hub model folders (remote code), so they only
import each other as `from .module import X`."""

from .configuration_lavit import LaVITEvaVisionConfig, LaVITTokenizerConfig
from .modeling_eva_vit import LaVITEvaVisionModel
from .modeling_lavit_tokenizer import (
    LaVITFeatureDecoder,
    LaVITFeaturesOutput,
    LaVITTokenizationOutput,
    LaVITTokenizerModel,
    LaVITTokenizerOutput,
    LaVITTokenMerger,
    LaVITTokenSelector,
    LaVITVectorQuantizer,
)

__all__ = [
    "LaVITEvaVisionConfig",
    "LaVITEvaVisionModel",
    "LaVITFeatureDecoder",
    "LaVITFeaturesOutput",
    "LaVITTokenMerger",
    "LaVITTokenSelector",
    "LaVITTokenizationOutput",
    "LaVITTokenizerConfig",
    "LaVITTokenizerModel",
    "LaVITTokenizerOutput",
    "LaVITVectorQuantizer",
]
