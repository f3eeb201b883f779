"""LaVIT model classes. The files in this folder are copied flat into Hub model folders (remote code), so they only
import each other as `from .module import X`."""

from .configuration_lavit import (
    LaVITConfig,
    LaVITDetokenizerConfig,
    LaVITEvaVisionConfig,
    LaVITImageSelection,
    LaVITTokenizerConfig,
)
from .generation_lavit import LaVITImageGenerationConfig
from .modeling_eva_vit import LaVITEvaVisionModel
from .modeling_lavit import (
    LaVITCausalLMOutputWithPast,
    LaVITForCausalLM,
    LaVITImageFeaturesOutput,
    LaVITModel,
    LaVITPreTrainedModel,
)
from .modeling_lavit_detokenizer import LaVITConditionEncoder, LaVITDetokenizer, LaVITDetokenizerOutput
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
from .pipeline_lavit import LaVITPipeline

__all__ = [
    "LaVITCausalLMOutputWithPast",
    "LaVITConditionEncoder",
    "LaVITConfig",
    "LaVITDetokenizer",
    "LaVITDetokenizerConfig",
    "LaVITDetokenizerOutput",
    "LaVITForCausalLM",
    "LaVITImageFeaturesOutput",
    "LaVITImageGenerationConfig",
    "LaVITImageSelection",
    "LaVITModel",
    "LaVITPipeline",
    "LaVITPreTrainedModel",
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
