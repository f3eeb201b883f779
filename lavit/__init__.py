"""LaVIT for the Hugging Face ecosystem: `from lavit import LaVITTokenizerModel, ...`.

Importing `lavit` registers the LaVIT configs and models with the transformers Auto classes, so saved folders load
with `AutoModel.from_pretrained(path)`; a folder also loads without `lavit` installed through
`AutoModel.from_pretrained(path, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel

from lavit.modeling import (
    LaVITEvaVisionConfig,
    LaVITEvaVisionModel,
    LaVITFeatureDecoder,
    LaVITFeaturesOutput,
    LaVITTokenizationOutput,
    LaVITTokenizerConfig,
    LaVITTokenizerModel,
    LaVITTokenizerOutput,
    LaVITTokenMerger,
    LaVITTokenSelector,
    LaVITVectorQuantizer,
)

__version__ = "0.1.0"

AutoConfig.register(LaVITEvaVisionConfig.model_type, LaVITEvaVisionConfig, exist_ok=True)
AutoConfig.register(LaVITTokenizerConfig.model_type, LaVITTokenizerConfig, exist_ok=True)
AutoModel.register(LaVITEvaVisionConfig, LaVITEvaVisionModel, exist_ok=True)
AutoModel.register(LaVITTokenizerConfig, LaVITTokenizerModel, exist_ok=True)
# saved folders carry the code files and an `auto_map`, so they load with trust_remote_code=True anywhere
LaVITTokenizerConfig.register_for_auto_class()
LaVITTokenizerModel.register_for_auto_class("AutoModel")

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
