"""The one place lavit's classes meet transformers' Auto classes and pipeline registry ([`register_auto_classes`]).

`import lavit` registers them, so that saved folders load with the installed classes through
`AutoModel.from_pretrained(path)`, `AutoModelForCausalLM`, `AutoConfig`, `AutoProcessor` and `AutoImageProcessor`
without `trust_remote_code` (a folder's own custom pipelines, `pipeline("lavit-text-to-image", model=folder)` and
`DiffusionPipeline.from_pretrained(folder)`, still ask for it: transformers and diffusers run a folder's code only when
told). As the classes come from their modules, the namespaces are lazy ([`lazy_namespace`]).

The one exception is the `lavit` command itself: its process registers just before a command runs
(`lavit.cli.main`), so that `lavit --help` imports no model code (issue 28: within 1.5x of `import torch`); a first
use of a class through a namespace registers too.
"""

import importlib
import sys
import threading
from pathlib import Path

_registered = _in_progress = False
_lock = threading.RLock()  # one registration: another thread's first use waits until it is complete
# the console script of the `lavit` command (`[project.scripts]`), as its process's `__main__` file is named
COMMAND_SCRIPTS = ("lavit", "lavit.exe", "lavit-script.py")


def started_as_the_lavit_command() -> bool:
    """Whether this process runs the `lavit` console script, which registers only when a command runs: its
    `__main__` file is named as the script and runs `lavit.cli`'s `main` (a user's own script named `lavit` does
    not, and registers at `import lavit` as every other importer)."""
    script = Path(getattr(sys.modules.get("__main__"), "__file__", None) or "")
    if script.name not in COMMAND_SCRIPTS or not script.is_file():
        return False
    try:
        with open(script, "rb") as handle:
            return b"from lavit.cli import main" in handle.read(4096)
    except OSError:
        return False


def lazy_namespace(namespace: dict, classes: dict[str, tuple[str, ...]]):
    """The module `__getattr__` and `__dir__` (PEP 562) of a lazy namespace (`lavit`, `lavit.modeling`,
    `lavit.processing`): `classes` maps each module (absolute, or relative to the namespace's package) to the names it
    gives. A name's first use registers lavit's classes ([`register_auto_classes`]), imports its module and keeps the
    value in `namespace`, so later uses skip `__getattr__`."""
    module_of = {name: module for module, names in classes.items() for name in names}
    package = namespace["__name__"]

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        register_auto_classes()
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted([*namespace, *module_of])

    return __getattr__, __dir__


def register_auto_classes() -> None:
    """Registers the LaVIT configs, models, processors and the `lavit-text-to-image` pipeline with transformers, once
    per process, atomically: a thread whose first use meets another's registration waits for it, and a registration
    that fails (an interrupted import) is done again by the next call. The classes' own `_auto_class` gives their
    saved folders an `auto_map` whether or not this ran, so those load with `trust_remote_code=True` where lavit is
    not installed."""
    global _registered, _in_progress
    if _registered:
        return
    with _lock:
        if _registered or _in_progress:  # done, or asked again by an import of this registration (same thread)
            return
        _in_progress = True
        try:
            _register()
            _registered = True
        finally:
            _in_progress = False


def _register() -> None:
    """The imports of the registered classes, and the registrations."""
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

    from lavit.modeling.configuration_lavit import (
        LaVITConfig,
        LaVITDetokenizerConfig,
        LaVITEvaVisionConfig,
        LaVITTokenizerConfig,
    )
    from lavit.modeling.modeling_eva_vit import LaVITEvaVisionModel
    from lavit.modeling.modeling_lavit import LaVITForCausalLM, LaVITModel
    from lavit.modeling.modeling_lavit_detokenizer import LaVITDetokenizer
    from lavit.modeling.modeling_lavit_tokenizer import LaVITTokenizerModel
    from lavit.processing.image_processing_lavit import LaVITImageProcessor
    from lavit.processing.pipelines_lavit import LaVITTextToImagePipeline
    from lavit.processing.processing_lavit import LaVITProcessor

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
    PIPELINE_REGISTRY.register_pipeline(
        "lavit-text-to-image", pipeline_class=LaVITTextToImagePipeline, pt_model=AutoModelForCausalLM, type="multimodal"
    )
