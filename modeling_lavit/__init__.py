"""LaVIT model classes. The files in this folder are copied flat into Hub model folders (remote code), so they only
import each other as `from .module import X`.

The namespace is lazy: a class is imported on first use (`from lavit.modeling import LaVITForCausalLM`), which also
registers lavit's classes with the transformers Auto classes (`lavit.registration`). This file is never copied into a
Hub folder (those hold the modules and what they import, `saving_lavit.code_files`), so it may import `lavit`.
"""

from lavit.registration import lazy_namespace

_CLASSES = {
    ".configuration_lavit": ("LaVITConfig", "LaVITDetokenizerConfig", "LaVITEvaVisionConfig", "LaVITImageSelection",
                            "LaVITTokenizerConfig"),
    ".generation_lavit": ("LaVITImageGenerationConfig",),
    ".modeling_eva_vit": ("LaVITEvaVisionModel",),
    ".modeling_lavit": ("LaVITCausalLMOutputWithPast", "LaVITForCausalLM", "LaVITImageFeaturesOutput", "LaVITModel",
                       "LaVITPreTrainedModel"),
    ".modeling_lavit_detokenizer": ("LaVITConditionEncoder", "LaVITDetokenizer", "LaVITDetokenizerOutput"),
    ".modeling_lavit_tokenizer": ("LaVITFeatureDecoder", "LaVITFeaturesOutput", "LaVITTokenizationOutput",
                                 "LaVITTokenizerModel", "LaVITTokenizerOutput", "LaVITTokenMerger",
                                 "LaVITTokenSelector", "LaVITVectorQuantizer"),
    ".pipeline_lavit": ("LaVITPipeline",),
}
__getattr__, __dir__ = lazy_namespace(globals(), _CLASSES)

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
