"""LaVIT for the Hugging Face ecosystem: `from lavit import LaVITTokenizerModel, ...`.

Importing `lavit` registers the LaVIT configs and models with the transformers Auto classes, so saved folders load
with `AutoModel.from_pretrained(path)`; a folder also loads without `lavit` installed through
`AutoModel.from_pretrained(path, trust_remote_code=True)`.
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

# the user-facing classes; building blocks (selector, merger, quantizer, outputs...) stay importable from
# `lavit.modeling` and `lavit.processing`
from lavit.modeling import (
    LaVITConditionEncoder,
    LaVITConfig,
    LaVITDetokenizer,
    LaVITDetokenizerConfig,
    LaVITEvaVisionConfig,
    LaVITEvaVisionModel,
    LaVITForCausalLM,
    LaVITImageGenerationConfig,
    LaVITImageSelection,
    LaVITModel,
    LaVITPipeline,
    LaVITTokenizerConfig,
    LaVITTokenizerModel,
)

# processing/saving_lavit.py is a link to the model side's file, so Hub folders (which hold both sides flat) get it
# beside the processor's code; installed, both packages share one module (one guard, one `SourceFolderError`)
sys.modules.setdefault("lavit.processing.saving_lavit", importlib.import_module("lavit.modeling.saving_lavit"))

from lavit.processing import LaVITImageProcessor, LaVITProcessor, LaVITTextToImagePipeline  # noqa: E402

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("lavit")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

AutoConfig.register(LaVITEvaVisionConfig.model_type, LaVITEvaVisionConfig, exist_ok=True)
AutoConfig.register(LaVITTokenizerConfig.model_type, LaVITTokenizerConfig, exist_ok=True)
AutoModel.register(LaVITEvaVisionConfig, LaVITEvaVisionModel, exist_ok=True)
AutoModel.register(LaVITTokenizerConfig, LaVITTokenizerModel, exist_ok=True)
AutoConfig.register(LaVITDetokenizerConfig.model_type, LaVITDetokenizerConfig, exist_ok=True)
AutoModel.register(LaVITDetokenizerConfig, LaVITDetokenizer, exist_ok=True)
AutoConfig.register(LaVITConfig.model_type, LaVITConfig, exist_ok=True)
AutoModel.register(LaVITConfig, LaVITModel, exist_ok=True)
AutoModelForCausalLM.register(LaVITConfig, LaVITForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(LaVITConfig, LaVITForCausalLM, exist_ok=True)
AutoModelForMultimodalLM.register(LaVITConfig, LaVITForCausalLM, exist_ok=True)
AutoImageProcessor.register(LaVITConfig, slow_image_processor_class=LaVITImageProcessor, exist_ok=True)
AutoProcessor.register(LaVITConfig, LaVITProcessor, exist_ok=True)
# saved folders carry the code files and an `auto_map`, so they load with trust_remote_code=True anywhere
LaVITTokenizerConfig.register_for_auto_class()
LaVITTokenizerModel.register_for_auto_class("AutoModel")
LaVITDetokenizerConfig.register_for_auto_class()
LaVITDetokenizer.register_for_auto_class("AutoModel")
LaVITConditionEncoder.register_for_auto_class("AutoModel")
LaVITConfig.register_for_auto_class()
LaVITForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LaVITImageProcessor.register_for_auto_class("AutoImageProcessor")
LaVITProcessor.register_for_auto_class("AutoProcessor")
PIPELINE_REGISTRY.register_pipeline(
    "lavit-text-to-image", pipeline_class=LaVITTextToImagePipeline, pt_model=AutoModelForCausalLM, type="multimodal"
)

__all__ = [
    "LaVITConditionEncoder",
    "LaVITConfig",
    "LaVITDetokenizer",
    "LaVITDetokenizerConfig",
    "LaVITForCausalLM",
    "LaVITImageGenerationConfig",
    "LaVITImageProcessor",
    "LaVITImageSelection",
    "LaVITModel",
    "LaVITPipeline",
    "LaVITProcessor",
    "LaVITTextToImagePipeline",
    "LaVITTokenizerConfig",
    "LaVITTokenizerModel",
]
