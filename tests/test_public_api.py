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
REGISTERED = """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.pipelines import PIPELINE_REGISTRY
    types = ("lavit", "lavit_tokenizer", "lavit_detokenizer", "lavit_eva_vision")
    print("registered:", all(key in CONFIG_MAPPING for key in types),
          "lavit-text-to-image" in PIPELINE_REGISTRY.get_supported_tasks())
"""


@pytest.mark.slow  # fresh processes (make test's 5-minute budget)
def test_import_lavit_registers_and_the_namespaces_are_lazy(pipeline_folder):
    """`import lavit` alone registers every LaVIT type (atk38: a lazy registration left `import lavit;
    AutoModelForCausalLM.from_pretrained(folder)` asking for remote code), and so does a deep import (every import
    of a module of lavit imports the package first: a class's own loader, which reads its parts through the Auto
    classes, works). No exported name of any namespace is bound before its first use: every one goes through the
    namespace's `__getattr__` (`lavit.registration.lazy_namespace`)."""
    checks = run_fresh(textwrap.dedent(f"""
        import lavit
        print("bound before use:", [name for namespace in (lavit, lavit.modeling, lavit.processing)
                                    for name in namespace.__all__ if name in vars(namespace)])
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(pipeline_folder / "language_model")!r})
        processor = AutoProcessor.from_pretrained({str(pipeline_folder / "processor")!r})
        print("loaded:", type(model).__module__, type(processor).__module__)
    """) + textwrap.dedent(REGISTERED))
    assert checks.splitlines() == [
        "bound before use: []", "loaded: lavit.modeling.modeling_lavit lavit.processing.processing_lavit",
        "registered: True True"], checks
    deep = run_fresh(textwrap.dedent(f"""
        from lavit.processing.processing_lavit import LaVITProcessor
        from lavit.modeling.pipeline_lavit import LaVITPipeline
        print("loaded:", type(LaVITProcessor.from_pretrained({str(pipeline_folder / "processor")!r})).__name__,
              type(LaVITPipeline.from_pretrained({str(pipeline_folder)!r})).__name__)
    """) + textwrap.dedent(REGISTERED))
    assert deep.splitlines() == ["loaded: LaVITProcessor LaVITPipeline", "registered: True True"], deep


@pytest.mark.slow  # fresh processes (make test's 5-minute budget)
def test_the_lavit_command_imports_no_model_code_and_registration_is_whole_before_any_thread_uses_it(tmp_path):
    """In a process that runs as the `lavit` console script (its `__main__` file is named `lavit`), `import lavit`
    imports no model code and registers nothing (the command registers when a command runs: `lavit --help` starts
    fast). atk38: registration then marked itself done before it was, so a second thread's first use found the Auto
    classes without LaVIT's types. Threads that meet a registration in progress now wait for it."""
    script = tmp_path / "lavit"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        from lavit.cli import main  # the console script's own line, which says it is the command (atk39)
        import lavit
        print("model code:", [name for name in sys.modules if name.startswith({MODEL_CODE!r})])
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        print("registered at import:", "lavit" in CONFIG_MAPPING)
        seen = []
        def first_use(name):
            getattr(lavit, name)
            seen.append("lavit" in CONFIG_MAPPING and "lavit_detokenizer" in CONFIG_MAPPING)
        threads = [threading.Thread(target=first_use, args=(name,)) for name in sorted(lavit.__all__)[:4]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("each thread saw:", seen)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.splitlines() == ["model code: []", "registered at import: False",
                                          "each thread saw: [True, True, True, True]"], result.stderr[-3000:]
    # a user's own script that happens to be named `lavit` is not the command: `import lavit` registers there
    script.write_text("import lavit\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
                      "print('registered at import:', 'lavit' in CONFIG_MAPPING)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip() == "registered at import: True", result.stderr[-3000:]


def test_the_classes_carry_their_auto_class():
    """Each class gives its saved folders an `auto_map` (they load with trust_remote_code=True where lavit is not
    installed) through its own `_auto_class`, whatever imported it."""
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
