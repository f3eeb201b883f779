"""The `lavit` namespace exports the user-facing classes only; building blocks stay in their modules."""
from importlib.metadata import version

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
