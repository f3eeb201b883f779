"""configuration_lavit.py: the LM vocabulary layout of LaVITConfig and its refusals, the derived sizes and vision
encoder choices of LaVITTokenizerConfig, the defaults and UNet checks of LaVITDetokenizerConfig, the model-type guard
and field diagnosis of config.json loading, and LaVITImageSelection's forms (no model is built)."""

import pytest
import torch
from conftest import tiny_detokenizer_config, tiny_lavit_config, tiny_tokenizer_config
from lavit.modeling.configuration_lavit import (
    SD_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    check_selection_arguments,
    config_field_problems,
)
from lavit.modeling.transformers_compat import transformers_requirement
from transformers import CLIPVisionConfig, LlamaConfig

from lavit import (
    LaVITConfig,
    LaVITDetokenizerConfig,
    LaVITEvaVisionConfig,
    LaVITImageSelection,
    LaVITTokenizerConfig,
)

TEXT_VOCAB = 100


@pytest.fixture
def config():
    return tiny_lavit_config(TEXT_VOCAB)


def test_the_vocabulary_is_text_then_img_then_end_then_the_codes(config):
    codebook = config.tokenizer_config.codebook_size
    assert (config.image_start_token_id, config.image_end_token_id) == (TEXT_VOCAB, TEXT_VOCAB + 1)
    assert config.visual_token_offset == TEXT_VOCAB + 2
    assert config.visual_token_end == TEXT_VOCAB + 2 + codebook
    assert config.vocab_size == config.text_config.vocab_size == config.visual_token_end
    assert config.vision_config is config.tokenizer_config.vision_config


def test_the_vocabulary_can_grow_but_never_drop_image_rows(config):
    config.vocab_size = config.visual_token_end + 8
    assert config.text_config.vocab_size == config.visual_token_end + 8
    with pytest.raises(ValueError, match=rf"vocab_size {config.visual_token_end - 1} would drop rows of the image "
                                         rf"vocabulary.*at least {config.visual_token_end} rows"):
        config.vocab_size = config.visual_token_end - 1
    assert config.vocab_size == config.visual_token_end + 8


def test_a_text_config_too_small_for_the_visual_ids_is_refused_with_the_sum():
    codebook = tiny_tokenizer_config().codebook_size
    with pytest.raises(ValueError, match=rf"text_config.vocab_size is 50, expected at least text_vocab_size "
                                         rf"\({TEXT_VOCAB}\) \+ 2 \(\[IMG\], \[/IMG\]\) \+ codebook_size "
                                         rf"\({codebook}\) = {TEXT_VOCAB + 2 + codebook}"):
        tiny_lavit_config(TEXT_VOCAB, text_config=dict(vocab_size=50, hidden_size=32, num_attention_heads=4))


def test_text_and_tokenizer_configs_may_be_given_as_dicts(config):
    rebuilt = LaVITConfig(text_config={"vocab_size": 200, "hidden_size": 32, "num_attention_heads": 4},
                          tokenizer_config=config.tokenizer_config.to_dict(), text_vocab_size=TEXT_VOCAB)
    assert isinstance(rebuilt.text_config, LlamaConfig)  # llama unless the dict names another model_type
    assert isinstance(rebuilt.tokenizer_config, LaVITTokenizerConfig)
    assert rebuilt.tokenizer_config.codebook_size == config.tokenizer_config.codebook_size
    with pytest.raises(ValueError, match=r"text_config.rms_norm_eps must be a finite number in \(0, 1\], got -1"):
        LaVITConfig(text_config={"vocab_size": 200, "rms_norm_eps": -1}, tokenizer_config=config.tokenizer_config,
                    text_vocab_size=TEXT_VOCAB)


def test_a_config_round_trips_through_its_folder(config, tmp_path):
    config.save_pretrained(tmp_path)
    loaded = LaVITConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.to_dict()["transformers_requirement"] == transformers_requirement()
    assert isinstance(loaded.tokenizer_config.vision_config, LaVITEvaVisionConfig)


@pytest.mark.parametrize("found, loader", [("lavit_tokenizer", "LaVITTokenizerModel"),
                                           ("lavit_detokenizer", "LaVITDetokenizer"),
                                           ("llama", "its own class, or AutoModel")])
def test_a_config_of_another_model_type_is_refused_naming_its_loader(config, found, loader):
    with pytest.raises(ValueError, match=rf"holds a config of model_type '{found}', not 'lavit' \(LaVITConfig\); "
                                         rf"load that folder with {loader}"):
        LaVITConfig.from_dict({**config.to_dict(), "model_type": found})


def test_a_failed_load_names_the_wrong_field(config):
    with pytest.raises(ValueError, match="config.json of LaVITConfig: text_vocab_size must be an int, got 'abc'"):
        LaVITConfig.from_dict({**config.to_dict(), "text_vocab_size": "abc"})


def test_field_problems_name_derived_values_wrong_types_and_nested_fields():
    problems = config_field_problems(LaVITConfig, {
        "text_vocab_size": True, "image_start_token_id": 5, "loss_modalities": None,
        "tokenizer_config": {"patch_size": 14, "selector_threshold": 1, "gumbel_temperature": "hot"},
    })
    assert problems == [
        "text_vocab_size must be an int, got True: fix it in config.json",
        "image_start_token_id is derived from other settings, not a setting: remove it",
        "tokenizer_config.patch_size is derived from other settings, not a setting: remove it",
        "tokenizer_config.gumbel_temperature must be a float, got 'hot': fix it in config.json",
    ]
    assert config_field_problems(LaVITConfig, {"text_vocab_size": 5, "name_or_path": "x"}) == []


def test_the_tokenizer_sizes_are_derived_from_its_vision_encoder():
    config = tiny_tokenizer_config()
    vision = config.vision_config
    assert config.uses_eva_encoder and isinstance(vision, LaVITEvaVisionConfig)
    assert config.hidden_size == config.vision_hidden_size == vision.hidden_size
    assert (config.image_size, config.patch_size) == (vision.image_size, vision.patch_size)
    assert config.num_patches == (vision.image_size // vision.patch_size) ** 2
    assert isinstance(config.image_mean, list) and isinstance(config.image_std, list)


def test_another_vision_backbone_is_built_from_its_model_type():
    config = tiny_tokenizer_config(vision_config=dict(model_type="clip_vision_model", image_size=28, patch_size=14,
                                                      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                      intermediate_size=64))
    assert isinstance(config.vision_config, CLIPVisionConfig) and not config.uses_eva_encoder
    assert config.num_patches == 4
    with pytest.raises(ValueError, match="vision_config has unknown model_type 'not_a_model'"):
        tiny_tokenizer_config(vision_config={"model_type": "not_a_model"})
    with pytest.raises(TypeError, match="vision_config must be a dict, a PretrainedConfig or None, got <class 'str'>"):
        tiny_tokenizer_config(vision_config="eva")


def test_a_tokenizer_config_saves_its_auto_map_as_plain_references():
    config = tiny_tokenizer_config()
    config.auto_map = {"AutoConfig": ["configuration_lavit.LaVITTokenizerConfig", None],
                       "AutoModel": "modeling_lavit_tokenizer.LaVITTokenizerModel"}
    saved = config.to_dict()
    assert saved["auto_map"] == {"AutoConfig": "configuration_lavit.LaVITTokenizerConfig",
                                 "AutoModel": "modeling_lavit_tokenizer.LaVITTokenizerModel"}
    assert saved["transformers_requirement"] == transformers_requirement()


@pytest.mark.parametrize("conditioning, unet, sizes, image_size", [("highres", SDXL_UNET_CONFIG, [768, 1280], 1024),
                                                                    ("lowres", SD_UNET_CONFIG, [768], 512)])
def test_the_detokenizer_defaults_are_the_official_ones_of_its_conditioning(conditioning, unet, sizes, image_size):
    config = LaVITDetokenizerConfig(conditioning=conditioning)
    assert config.prompt_projection_sizes == sizes and config.image_size == image_size
    assert config.unet_config == unet and config.unet_config is not unet
    assert config.scheduler_config["_class_name"] == "DDIMScheduler"
    assert config.hidden_size == max(config.decoder_hidden_size, *unet["block_out_channels"])


def test_changing_one_detokenizer_configs_unet_leaves_the_defaults_alone():
    default_channels = list(SD_UNET_CONFIG["block_out_channels"])
    config = LaVITDetokenizerConfig(conditioning="lowres")
    try:
        config.unet_config["block_out_channels"][0] = 8
        assert SD_UNET_CONFIG["block_out_channels"] == default_channels
        assert LaVITDetokenizerConfig(conditioning="lowres").unet_config["block_out_channels"] == default_channels
    finally:  # a shared list must not leak this edit into the other tests of the run
        SD_UNET_CONFIG["block_out_channels"][:] = default_channels


def test_the_detokenizer_takes_its_codebook_and_decoder_sizes_from_the_tokenizer():
    tokenizer = tiny_tokenizer_config()
    config = tiny_detokenizer_config(num_inference_steps=2)
    for name in ("codebook_size", "code_dim", "num_patches", "vision_hidden_size", "decoder_hidden_size",
                 "decoder_num_layers", "decoder_num_heads", "decoder_intermediate_size", "layer_norm_eps"):
        assert getattr(config, name) == getattr(tokenizer, name), name
    assert config.num_inference_steps == 2


def test_a_unet_that_does_not_take_the_conditions_is_refused():
    config = tiny_detokenizer_config()
    unet = config.unet_config
    with pytest.raises(ValueError, match=r"needs an SDXL-style UNet \(addition_embed_type='text_time'\)"):
        tiny_detokenizer_config(unet_config={**unet, "addition_embed_type": None})
    expected = 6 * unet["addition_time_embed_dim"] + config.pooled_projection_size
    with pytest.raises(ValueError, match=rf"projection_class_embeddings_input_dim must be 6 \* addition_time_embed_dim"
                                         rf" \+ pooled_projection_size = {expected}, got {expected + 1}"):
        tiny_detokenizer_config(unet_config={**unet, "projection_class_embeddings_input_dim": expected + 1})
    num_patches = tiny_tokenizer_config().num_patches
    with pytest.raises(ValueError, match=rf"negative_context_length must be in \[1, num_patches={num_patches}\], "
                                         rf"got {num_patches + 1}"):
        tiny_detokenizer_config("lowres", negative_context_length=num_patches + 1)


def test_an_image_selection_merges_its_forms_with_the_arguments_winning():
    generator = torch.Generator()
    base = LaVITImageSelection(mode="sample", generator=generator)
    assert LaVITImageSelection.from_value(base) is base
    merged = LaVITImageSelection.from_value(base, max_tokens=3)
    assert merged == LaVITImageSelection("sample", 3, None, generator)
    assert LaVITImageSelection.from_value({"keep_ratio": 0.5}, mode="deterministic").keep_ratio == 0.5
    assert LaVITImageSelection.from_value() == LaVITImageSelection()
    with pytest.raises(ValueError, match=r"does not take 'max_token' \(did you mean 'max_tokens'\?\)"):
        LaVITImageSelection.from_value({"max_token": 3})
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got 7"):
        LaVITImageSelection(generator=7)


@pytest.mark.parametrize("arguments, message", [
    (("sample", 2, 0.5), "give at most one of max_tokens and keep_ratio"),
    (("greedy", None, None), r"mode must be one of \['deterministic', 'sample'\], got 'greedy'"),
    ((None, 0, None), "max_tokens must be an integer >= 1, got 0"),
    ((None, None, 0.0), r"keep_ratio must be a finite number in \(0, 1\], got 0.0"),
    ((None, None, 1.5), r"keep_ratio must be a finite number in \(0, 1\], got 1.5"),
])
def test_selection_arguments_out_of_range_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        check_selection_arguments(*arguments)
    check_selection_arguments(None, None, 1.0)
