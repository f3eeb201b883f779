"""`lavit.training.models`: every builder refuses settings that do not say which model to use, naming the flags; a
new tokenizer follows its settings file; a new detokenizer shares the visual tokenizer's codebook and feature decoder
(frozen unless asked) and one trained with another tokenizer is refused; the codebook check reads a folder's weight
files alone; the trained decoder becomes a pipeline without a language model when none is given.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_VAE_CONFIG, tiny_tokenizer_config, tiny_unet_config
from lavit.training.models import (
    CODEBOOK_WEIGHT,
    build_detokenizer,
    build_tokenizer,
    build_unified_model,
    load_4bit_model,
    load_model_for_finetuning,
    pipeline_language_model_folder,
    require_same_codebook,
    trained_pipeline,
)
from safetensors.torch import save_file

from lavit import LaVITDetokenizer, LaVITPipeline, LaVITTokenizerModel

DETOKENIZER_SETTINGS = dict(
    conditioning="highres", prompt_projection_sizes=[12, 20], pooled_projection_size=16, pooling_num_heads=4,
    negative_context_length=5, unet_config=tiny_unet_config(32, 16), vae_config=TINY_VAE_CONFIG, image_size=32,
    num_inference_steps=4,
)


def tokenizer(seed: int) -> LaVITTokenizerModel:
    torch.manual_seed(seed)
    model = LaVITTokenizerModel(tiny_tokenizer_config())
    with torch.no_grad():  # a trained codebook: each seed its own
        model.quantizer.codebook.normal_()
    return model


def detokenizer_script(tmp_path, **flags):
    path = tmp_path / "detokenizer.json"
    path.write_text(json.dumps(DETOKENIZER_SETTINGS))
    settings = dict(detokenizer=None, detokenizer_config=str(path), diffusers_model=None, train_feature_decoder=False)
    return SimpleNamespace(**{**settings, **flags})


@pytest.fixture(scope="module")
def visual_tokenizer():
    return tokenizer(seed=0)


def test_builders_name_the_flags_to_give_when_none_says_which_model():
    with pytest.raises(ValueError, match="--model .* or --tokenizer_config"):
        build_tokenizer(SimpleNamespace(model=None, tokenizer_config=None, vision_model=None))
    with pytest.raises(ValueError, match="--model .* or both --visual_tokenizer and --language_model"):
        build_unified_model(SimpleNamespace(model=None, visual_tokenizer="runs/tokenizer", language_model=None))
    with pytest.raises(ValueError, match="give --model, the LaVIT folder to fine-tune"):
        load_model_for_finetuning(SimpleNamespace(model=None, task="caption"), None)
    with pytest.raises(ValueError, match="--detokenizer .* or --detokenizer_config"):
        build_detokenizer(SimpleNamespace(detokenizer=None, detokenizer_config=None), None)


def test_fine_tuning_refuses_an_unknown_task_before_loading_anything():
    with pytest.raises(ValueError, match="--task must be 'caption', 'vqa' or 'chat', got 'translate'"):
        load_model_for_finetuning(SimpleNamespace(model="no/such/folder", task="translate"), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_qlora_without_cuda_says_what_it_needs():
    with pytest.raises(RuntimeError, match="--qlora needs a CUDA GPU and the bitsandbytes package"):
        load_4bit_model("no/such/folder", gradient_checkpointing=False)


def test_a_new_tokenizer_follows_its_settings_file(tmp_path):
    settings = tiny_tokenizer_config(codebook_size=24).to_dict()
    (tmp_path / "tokenizer.json").write_text(json.dumps(settings))
    model = build_tokenizer(SimpleNamespace(model=None, tokenizer_config=str(tmp_path / "tokenizer.json"),
                                            vision_model=None))
    assert isinstance(model, LaVITTokenizerModel)
    assert model.config.codebook_size == 24 and model.quantizer.codebook.shape[0] == 24
    assert model.config.vision_config.hidden_size == settings["vision_config"]["hidden_size"]


@pytest.mark.parametrize("train_feature_decoder", [False, True])
def test_a_new_detokenizer_shares_the_codebook_and_decoder_frozen_unless_asked(tmp_path, visual_tokenizer,
                                                                               train_feature_decoder):
    detokenizer = build_detokenizer(detokenizer_script(tmp_path, train_feature_decoder=train_feature_decoder),
                                    visual_tokenizer)
    assert torch.equal(detokenizer.codebook, visual_tokenizer.quantizer.codebook)
    decoder_weights = visual_tokenizer.decoder.state_dict()
    assert all(torch.equal(value, decoder_weights[name]) for name, value in detokenizer.decoder.state_dict().items())
    assert {parameter.requires_grad for parameter in detokenizer.decoder.parameters()} == {train_feature_decoder}
    assert all(parameter.requires_grad for parameter in detokenizer.unet.parameters())


def test_continuing_a_detokenizer_of_another_tokenizer_is_refused(tmp_path, visual_tokenizer):
    other = tokenizer(seed=1)
    assert not torch.equal(other.quantizer.codebook, visual_tokenizer.quantizer.codebook)
    LaVITDetokenizer.from_visual_tokenizer(other, **DETOKENIZER_SETTINGS).save_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match="codebook differs from the visual tokenizer's"):
        build_detokenizer(detokenizer_script(tmp_path, detokenizer=str(tmp_path / "old")), visual_tokenizer)


def test_the_codebook_check_reads_the_weight_files_of_a_folder(tmp_path, visual_tokenizer):
    detokenizer = SimpleNamespace(codebook=visual_tokenizer.quantizer.codebook)
    require_same_codebook(str(tmp_path), detokenizer)  # no weight file to read: checked at load time instead
    save_file({CODEBOOK_WEIGHT: visual_tokenizer.quantizer.codebook.clone()}, tmp_path / "model.safetensors")
    require_same_codebook(str(tmp_path), detokenizer)
    save_file({CODEBOOK_WEIGHT: tokenizer(seed=1).quantizer.codebook}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"the language model of {tmp_path} reads another visual tokenizer"):
        require_same_codebook(str(tmp_path), detokenizer)
    with pytest.raises(ValueError, match="reads another visual tokenizer"):  # another codebook size
        require_same_codebook("lm", detokenizer, codebook=visual_tokenizer.quantizer.codebook[:-1])


def test_only_a_model_flag_that_is_no_lavit_model_is_refused(tmp_path, visual_tokenizer):
    visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    flags = dict(model=None, detokenizer=None, visual_tokenizer=None)
    assert pipeline_language_model_folder(SimpleNamespace(**flags)) is None
    # a plain visual tokenizer holds no language model: the pipeline keeps the decoder alone
    assert pipeline_language_model_folder(SimpleNamespace(**{**flags, "visual_tokenizer": str(tmp_path /
                                                                                              "tokenizer")})) is None
    with pytest.raises(ValueError, match="--model no-such/lavit-model is not a LaVIT model folder"):
        pipeline_language_model_folder(SimpleNamespace(**{**flags, "model": "no-such/lavit-model"}))


def test_a_trained_decoder_alone_becomes_a_pipeline_without_a_language_model(visual_tokenizer):
    detokenizer = LaVITDetokenizer.from_visual_tokenizer(visual_tokenizer, **DETOKENIZER_SETTINGS).train()
    pipe = trained_pipeline(detokenizer, None)
    assert isinstance(pipe, LaVITPipeline)
    assert pipe.language_model is None and pipe.processor is None
    assert pipe.unet is detokenizer.unet and not detokenizer.training
    assert torch.equal(pipe.condition_encoder.codebook, visual_tokenizer.quantizer.codebook)
