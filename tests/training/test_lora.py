"""`lavit.training.lora`: the PEFT target pattern that puts LoRA adapters on the language model's projections only
(never on the same-named projections of the frozen visual tokenizer), and the `LoraConfig` built around it."""

import re

import pytest
from lavit.training.lora import LM_PROJECTIONS, language_model_targets, lora_config

LM_NAME = "language_model.model.layers.0.self_attn.{}"
TOKENIZER_NAME = "visual_tokenizer.token_merger.layers.0.self_attn.{}"


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None  # how PEFT reads a string `target_modules`


def test_the_default_pattern_matches_every_lm_projection_and_none_of_the_visual_tokenizer():
    pattern = language_model_targets()
    assert all(matches(pattern, LM_NAME.format(name)) for name in LM_PROJECTIONS)
    assert not any(matches(pattern, TOKENIZER_NAME.format(name)) for name in LM_PROJECTIONS)


def test_only_the_named_modules_are_matched():
    pattern = language_model_targets(("q_proj",))
    assert matches(pattern, LM_NAME.format("q_proj"))
    assert not matches(pattern, LM_NAME.format("v_proj"))
    assert not matches(pattern, LM_NAME.format("q_proj_extra"))  # a whole module name, not a prefix


def test_a_comma_separated_string_is_read_as_names_with_blanks_and_empty_items_dropped():
    assert language_model_targets(" q_proj ,, v_proj, ") == language_model_targets(["q_proj", "v_proj"])


def test_names_in_a_list_are_matched_literally_not_as_regex():
    pattern = language_model_targets(["q.proj"])
    assert matches(pattern, LM_NAME.format("q.proj"))
    assert not matches(pattern, LM_NAME.format("qXproj"))


@pytest.mark.parametrize("empty", ["", " , ,", [], ()])
def test_no_module_name_is_refused(empty):
    with pytest.raises(ValueError, match="target_modules is empty"):
        language_model_targets(empty)


def test_lora_config_is_a_causal_lm_config_on_the_lm_targets_with_the_given_settings():
    config = lora_config(["v_proj"], r=4, lora_alpha=8)
    assert config.task_type == "CAUSAL_LM"
    assert config.target_modules == language_model_targets(["v_proj"])
    assert (config.r, config.lora_alpha) == (4, 8)


def test_lora_config_passes_a_regex_through_unchanged():
    assert lora_config(r".*\.fc1").target_modules == r".*\.fc1"
