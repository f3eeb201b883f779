"""LaVIT for the Hugging Face ecosystem: `from lavit import LaVITTokenizerModel, ...`.

Importing `lavit` registers the LaVIT configs and models with the transformers Auto classes
([`lavit.registration`]), so saved folders load with `AutoModel.from_pretrained(path)`; a folder also loads without
`lavit` installed through `AutoModel.from_pretrained(path, trust_remote_code=True)`. The namespace is lazy (as
transformers' own): each class is imported from its module on first use, so the `lavit` command, which registers only
when a command runs, starts without importing any model code.
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

import lavit.modeling  # noqa: F401 (bound as `lavit.modeling`, `lavit.processing`: both lazy, light)
import lavit.processing  # noqa: F401
from lavit.registration import lazy_namespace, register_auto_classes, started_as_the_lavit_command

# processing/saving_lavit.py is a link to the model side's file, so Hub folders (which hold both sides flat) get it
# beside the processor's code; installed, both packages share one module (one guard, one `SourceFolderError`)
sys.modules.setdefault("lavit.processing.saving_lavit", importlib.import_module("lavit.modeling.saving_lavit"))

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("lavit")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# the user-facing classes, by module; building blocks (selector, merger, quantizer, outputs...) stay importable from
# `lavit.modeling` and `lavit.processing`
_CLASSES = {
    "lavit.modeling.configuration_lavit": ("LaVITConfig", "LaVITDetokenizerConfig", "LaVITEvaVisionConfig",
                                           "LaVITImageSelection", "LaVITTokenizerConfig"),
    "lavit.modeling.generation_lavit": ("LaVITImageGenerationConfig",),
    "lavit.modeling.modeling_eva_vit": ("LaVITEvaVisionModel",),
    "lavit.modeling.modeling_lavit": ("LaVITForCausalLM", "LaVITModel"),
    "lavit.modeling.modeling_lavit_detokenizer": ("LaVITConditionEncoder", "LaVITDetokenizer"),
    "lavit.modeling.modeling_lavit_tokenizer": ("LaVITTokenizerModel",),
    "lavit.modeling.pipeline_lavit": ("LaVITPipeline",),
    "lavit.processing.image_processing_lavit": ("LaVITImageProcessor",),
    "lavit.processing.pipelines_lavit": ("LaVITTextToImagePipeline",),
    "lavit.processing.processing_lavit": ("LaVITProcessor",),
}
__getattr__, __dir__ = lazy_namespace(globals(), _CLASSES)
if not started_as_the_lavit_command():
    register_auto_classes()

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
