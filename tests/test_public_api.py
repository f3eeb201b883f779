"""The `lavit` namespace exports the user-facing classes only; building blocks stay in their modules."""
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import lavit


def test_top_level_exports_the_user_classes_and_each_is_registered_with_an_auto_class():
    assert set(lavit.__all__) == {
        "LaVITConfig", "LaVITTokenizerConfig", "LaVITDetokenizerConfig", "LaVITTokenizerModel", "LaVITModel",
        "LaVITForCausalLM", "LaVITImageGenerationConfig", "LaVITImageSelection", "LaVITDetokenizer",
        "LaVITImageProcessor", "LaVITProcessor",
        "LaVITTextToImagePipeline", "LaVITPipeline", "LaVITConditionEncoder",
    }
    pairs = ((lavit.LaVITTokenizerConfig, lavit.LaVITTokenizerModel),
             (lavit.LaVITDetokenizerConfig, lavit.LaVITDetokenizer), (lavit.LaVITConfig, lavit.LaVITModel))
    for config, model in pairs:
        assert AutoConfig.for_model(config.model_type).__class__ is config
        assert AutoModel._model_mapping[config] is model
    assert AutoModelForCausalLM._model_mapping[lavit.LaVITConfig] is lavit.LaVITForCausalLM
    assert PROCESSOR_MAPPING[lavit.LaVITConfig] is lavit.LaVITProcessor
    image_processors = IMAGE_PROCESSOR_MAPPING[lavit.LaVITConfig]  # a tuple or a dict by backend, as releases differ
    assert lavit.LaVITImageProcessor in (image_processors.values() if isinstance(image_processors, dict)
                                         else image_processors)


def test_building_blocks_import_from_their_modules_not_from_the_namespace():
    from lavit.modeling import LaVITTokenMerger, LaVITTokenSelector, LaVITVectorQuantizer

    for block in (LaVITTokenMerger, LaVITTokenSelector, LaVITVectorQuantizer):
        assert block.__name__ not in lavit.__all__


def test_version_is_the_installed_package_version():
    assert lavit.__version__ == version("lavit")


def run_fresh(code: str) -> str:
    """`code` in a fresh Python (what a user's first import sees); its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


MODEL_CODE = ("transformers.modeling_utils", "transformers.processing_utils", "diffusers", "peft",
              "lavit.modeling.modeling_lavit", "lavit.processing.processing_lavit")


def test_namespaces_are_lazy_and_the_first_use_of_a_class_registers_every_auto_class(tmp_path):
    """In one fresh Python (what a user's first import sees): `import lavit` (and its namespaces) imports no model
    code (issue 28: the `lavit` command's start-up); no exported name of any namespace is bound before its first use,
    so every one goes through the namespace's `__getattr__` (`lavit.registration.lazy_namespace`, one for all three);
    a deep import registers nothing, yet the class saves its `auto_map` (its own `_auto_class`); the first use through
    a namespace registers every LaVIT type with the Auto classes and the pipeline registry."""
    checks = run_fresh(f"""
        import json, sys
        import lavit, lavit.modeling, lavit.processing
        print("model code:", [name for name in sys.modules if name.startswith({MODEL_CODE!r})])
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.pipelines import PIPELINE_REGISTRY
        print("bound before use:", [name for namespace in (lavit, lavit.modeling, lavit.processing)
                                    for name in namespace.__all__ if name in vars(namespace)])
        from lavit.modeling.configuration_lavit import LaVITTokenizerConfig
        LaVITTokenizerConfig().save_pretrained({str(tmp_path)!r})
        print("auto_map:", json.load(open({str(tmp_path / "config.json")!r}))["auto_map"])
        print("known before use:", "lavit" in CONFIG_MAPPING)
        lavit.processing.LaVITProcessor
        types = ("lavit", "lavit_tokenizer", "lavit_detokenizer", "lavit_eva_vision")
        tasks = PIPELINE_REGISTRY.get_supported_tasks()
        print("known after use:", all(key in CONFIG_MAPPING for key in types), "lavit-text-to-image" in tasks)
    """)
    assert checks.splitlines() == [
        "model code: []", "bound before use: []",
        "auto_map: {'AutoConfig': 'configuration_lavit.LaVITTokenizerConfig'}", "known before use: False",
        "known after use: True True"], checks
    for name, auto_class in (("LaVITTokenizerConfig", "AutoConfig"), ("LaVITConfig", "AutoConfig"),
                             ("LaVITDetokenizerConfig", "AutoConfig"), ("LaVITTokenizerModel", "AutoModel"),
                             ("LaVITDetokenizer", "AutoModel"), ("LaVITConditionEncoder", "AutoModel"),
                             ("LaVITForCausalLM", "AutoModelForCausalLM"),
                             ("LaVITImageProcessor", "AutoImageProcessor"), ("LaVITProcessor", "AutoProcessor")):
        assert getattr(lavit, name)._auto_class == auto_class, name


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'lavit' has no attribute 'LaVITForCasualLM'"):
        lavit.LaVITForCasualLM  # noqa: B018
    with pytest.raises(ImportError):
        from lavit.modeling import NoSuchThing  # noqa: F401
    assert set(lavit.__all__) <= set(dir(lavit))
