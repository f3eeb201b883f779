"""Issue 24 (S2, U5): the configs a LaVIT config holds but does not define (the language model's `text_config`, the
pixel decoder's `unet_config`, `vae_config` and `scheduler_config`) are range-checked when the config is built or
loaded, as LaVIT's own fields are (tests/test_argument_ranges.py).

The surface is enumerated: every number found anywhere in the default nested configs of every LaVIT config class,
given NaN, infinity and a wrong-type value, is refused with one line naming its dotted path."""

import json
import math

import pytest
from lavit.modeling.validation_lavit import NESTED_FIELD_RANGES
from test_argument_ranges import config_classes


def nested_numbers(settings: dict, path=()):
    """(path, value) of every number inside the nested dicts of `settings` (lists: their first number)."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from nested_numbers(value, (*path, key))
        elif isinstance(value, list) and value and isinstance(value[0], (int, float)) and not isinstance(
                value[0], bool):
            yield (*path, key, 0), value[0]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield (*path, key), value


def replaced(settings: dict, path: tuple, value) -> dict:
    settings = json.loads(json.dumps(settings))
    holder = settings
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return settings


def nested_configs(cls) -> dict:
    """The nested configs of `cls`'s default config that LaVIT does not define (`*_config` fields held as dicts or
    as foreign configs)."""
    config = cls()
    found = {}
    for name in vars(config):
        value = getattr(config, name)
        if not name.endswith("_config") or "lavit" in type(value).__module__:
            continue
        if isinstance(value, dict) or hasattr(value, "to_dict"):
            found[name] = value if isinstance(value, dict) else value.to_dict()
    return found


def test_every_lavit_config_with_foreign_nested_configs_is_found():
    found = {cls.__name__: sorted(nested_configs(cls)) for cls in config_classes()
             if hasattr(cls, "to_dict") and nested_configs(cls)}
    assert found == {"LaVITConfig": ["text_config"],
                     "LaVITDetokenizerConfig": ["scheduler_config", "unet_config", "vae_config"]}


@pytest.mark.parametrize("cls", [cls for cls in config_classes() if hasattr(cls, "to_dict")],
                         ids=lambda cls: cls.__name__)
def test_every_number_of_every_nested_config_is_checked(cls):
    checked = 0
    for name, settings in nested_configs(cls).items():
        for path, _default in nested_numbers(settings):
            if path[0] in ("id2label", "label2id"):  # label maps: numbers are names' indices
                continue
            dotted = ".".join(str(part) for part in (name, *path) if not isinstance(part, int))
            for bad in (math.nan, math.inf, "abc"):
                if bad == "abc" and not any(pattern.search(str(path[-1] if not isinstance(path[-1], int)
                                                             else path[-2])) for pattern, _ in NESTED_FIELD_RANGES):
                    continue  # a field of unknown meaning: only its numbers are checked
                top = cls().to_dict()
                top[name] = replaced(settings, path, bad)
                top.pop("transformers_version", None)
                with pytest.raises(ValueError, match="must be") as error:
                    cls(**{key: value for key, value in top.items() if key not in ("model_type",)})
                message = str(error.value)
                assert dotted in message and "\n" not in message, (cls.__name__, dotted, bad, message)
            checked += 1
    assert checked or cls.__name__ not in ("LaVITConfig", "LaVITDetokenizerConfig")


@pytest.mark.parametrize("field, value", [("rms_norm_eps", math.nan), ("max_position_embeddings", 0),
                                          ("hidden_size", -64), ("num_hidden_layers", 0),
                                          ("attention_dropout", 1.5), ("vocab_size", "abc")])
def test_issue_examples_a_config_json_with_a_bad_text_config_does_not_load(tmp_path, field, value):
    from conftest import text_vocab_size, tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITConfig

    tiny_lavit_config(text_vocab_size(tiny_text_tokenizer())).save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    settings["text_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=rf"text_config\.{field} must be"):
        LaVITConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ U1


def test_the_context_length_message_counts_the_visual_tokens(lavit_model, lavit_processor):
    """`generate` on an image prompt: the numbers of the message add up in the caller's units (the ids given, plus
    the visual tokens the images became), and the advice names both fixes."""
    import re

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    inputs = lavit_processor(images=[image], text="<image>a photo of", return_tensors="pt")
    context = lavit_model.config.text_config.max_position_embeddings
    given = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError) as error:
        lavit_model.generate(**inputs, max_new_tokens=context)
    message = str(error.value)
    found = re.search(r"a prompt of (\d+) tokens \((\d+) given ids \+ (\d+) for its images' visual tokens", message)
    assert found, message
    prompt, given_ids, visual = map(int, found.groups())
    assert given_ids == given and prompt == given_ids + visual and visual > 0
    assert f"give max_new_tokens <= {context - prompt}" in message and "max_tokens" in message
    with pytest.raises(ValueError) as error:  # a text prompt: no visual tokens to count
        lavit_model.generate(**lavit_processor(text="a cat", return_tensors="pt"), max_new_tokens=context)
    assert "given ids" not in str(error.value) and "context length" in str(error.value)


def test_image_generation_from_an_image_prompt_counts_its_visual_tokens(lavit_model, lavit_processor):
    """`generate_image_tokens` on a prompt holding an image: a context that fits the ids as given but not the image's
    visual tokens is refused before decoding, with the numbers of both."""
    import re

    import numpy as np
    from lavit.modeling.generation_lavit import LaVITImageGenerationConfig
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    inputs = lavit_processor(images=[image], text="<image>draw it again", return_tensors="pt")
    settings = LaVITImageGenerationConfig.resolve(None, {"guidance_scale": 1.0})
    max_new_tokens = settings.token_limits(lavit_model.config.tokenizer_config.num_patches)[1]
    given = inputs["input_ids"].shape[1]
    text_config = lavit_model.config.text_config
    original = text_config.max_position_embeddings
    text_config.max_position_embeddings = given + 1 + max_new_tokens + 1  # the ids as given fit exactly
    try:
        with pytest.raises(ValueError) as error:
            lavit_model.generate_image_tokens(**inputs, guidance_scale=1.0)
    finally:
        text_config.max_position_embeddings = original
    found = re.search(r"a prompt of (\d+) tokens \((\d+) given ids \+ (\d+) for its images' visual tokens",
                      str(error.value))
    assert found and int(found[2]) == given + 1 and int(found[1]) == int(found[2]) + int(found[3]), str(error.value)
