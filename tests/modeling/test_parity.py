"""Parity with the official LaVIT arithmetic on the tiny fixtures of ../shared/parity/official_tiny."""

import pytest
import torch
from lavit.modeling.convert_original_lavit import convert_tokenizer
from official_release import assert_close, write_official_release

from lavit import LaVITTokenizerModel


@pytest.fixture(scope="module")
def official(parity_files):
    model = convert_tokenizer(
        parity_files["tokenizer_state_dict"],
        decoder_state_dict=parity_files["decoder_state_dict"],
        vision_num_heads=4, merger_num_heads=4, decoder_num_heads=4,
    )
    return model, parity_files["inputs"], parity_files["expected"]


def test_converted_config_reads_sizes_from_tensors(official):
    model, _, _ = official
    config = model.config
    assert (config.image_size, config.patch_size, config.num_patches) == (112, 14, 64)
    assert config.vision_config.hidden_size == 64 and config.vision_config.num_hidden_layers == 2
    assert config.vision_config.intermediate_size == 279
    assert (config.merger_num_layers, config.merger_intermediate_size, config.merger_attention) == (2, 279, "official")
    assert (config.codebook_size, config.code_dim) == (256, 8)
    assert (config.decoder_num_layers, config.decoder_hidden_size) == (2, 64)


def test_encoder_selector_merger_quantizer_decoder(official):
    model, inputs, expected = official
    pixel_values, keep_mask = inputs["pixel_values"], inputs["keep_mask"]
    with torch.no_grad():
        assert_close(model.vision_model(pixel_values).last_hidden_state, expected["encoder_all_features"])
        features = model.encode_patches(pixel_values)
        assert_close(features, expected["encoder_features"])
        assert_close(model.selector(features), expected["predictor_log_probs"])
        assert_close(model.merger.forward_full_sequence(features, keep_mask), expected["merger_out_full"])
        kept = model.merger(features, keep_mask)
        assert_close(kept, expected["kept_features"])
        assert_close(model.quantizer.project_in(kept), expected["quantizer_input"])

    tokens = model.tokenize(pixel_values, keep_mask=keep_mask)
    assert torch.equal(tokens.code_ids, expected["code_ids"])
    assert torch.equal(tokens.token_counts, expected["token_counts"])
    assert torch.equal(model.quantizer.codebook[tokens.code_ids], expected["quantized"])
    assert_close(model.encode_features(pixel_values, keep_mask=keep_mask).features, expected["kept_features"])
    assert_close(model.decode_codes(tokens.code_ids, tokens.token_counts), expected["decoder_out"])


def test_highres_decoder_trunk(parity_files):
    model = convert_tokenizer(
        parity_files["tokenizer_state_dict"],
        decoder_state_dict=parity_files["highres_decoder_state_dict"],
        vision_num_heads=4, merger_num_heads=4, decoder_num_heads=4,
    )
    expected = parity_files["expected"]
    assert_close(model.decode_codes(expected["code_ids"], expected["token_counts"]), expected["highres_decoder_out"])


def test_deterministic_selection_reproduces_the_threshold_mask(official):
    model, inputs, _ = official
    # image 0's fixture mask is p_keep > 0.5: our default deterministic mode must find it exactly
    tokens = model.tokenize(inputs["pixel_values"][:1])
    assert torch.equal(tokens.keep_mask[0], inputs["keep_mask"][0].bool())


def test_official_keys_are_all_accounted_for(parity_files):
    state_dict = dict(parity_files["tokenizer_state_dict"])
    state_dict["causal_encoder.blocks.0.typo.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="typo"):
        convert_tokenizer(state_dict, vision_num_heads=4, merger_num_heads=4)
    state_dict = dict(parity_files["tokenizer_state_dict"])
    del state_dict["causal_encoder.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert_tokenizer(state_dict, vision_num_heads=4, merger_num_heads=4)


def test_exact_merger_misses_the_leaky_official_outputs(official):
    """The fixtures are built so that true masked attention differs from the official leaky softmax."""
    model, inputs, expected = official
    exact = LaVITTokenizerModel(model.config.__class__(**{**model.config.to_dict(), "merger_attention": "exact"}))
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        kept = exact.eval().merger(exact.encode_patches(inputs["pixel_values"]), inputs["keep_mask"])
    assert (kept - expected["kept_features"]).abs().max() > 1e-3


def test_from_original_release_reproduces_the_llm_visual_embeddings(parity_files, tmp_path):
    from lavit.modeling.convert_original_lavit import convert_release

    language_model = write_official_release(parity_files, tmp_path)
    model, detokenizer = convert_release(tmp_path, vision_num_heads=4, merger_num_heads=4, decoder_num_heads=4)
    inputs, expected = parity_files["inputs"], parity_files["expected"]
    config = model.config
    assert (config.text_vocab_size, config.image_start_token_id, config.visual_token_offset) == (40, 40, 42)
    features = model.model.get_image_features(inputs["pixel_values"], inputs["keep_mask"], return_code_ids=True)
    assert torch.equal(features.token_counts, expected["token_counts"])
    assert_close(features.features, expected["llm_visual_embeds"])
    assert torch.equal(features.code_ids, expected["code_ids"])
    # the LM input sequence: [IMG] + the continuous embeddings + [/IMG], exactly as the official understanding path
    first = int(expected["token_counts"][0])
    prepared = model.model.prepare_multimodal_inputs(
        torch.tensor([[7, config.image_start_token_id, config.image_end_token_id, 9]]),
        pixel_values=inputs["pixel_values"][:1], image_keep_mask=inputs["keep_mask"][:1],
    )
    assert_close(prepared.inputs_embeds[0, 2 : 2 + first], expected["llm_visual_embeds"][:first])
    text = torch.tensor([[1, 5, 9]])
    assert torch.equal(model(input_ids=text).logits, language_model(input_ids=text).logits)
    assert_close(model.model.visual_tokenizer.decode_codes(expected["code_ids"], expected["token_counts"]),
                 expected["highres_decoder_out"])
    # the pixel decoder: official heads, and the UNet/VAE/scheduler of the diffusers folder
    from diffusers import UNet2DConditionModel

    conditions = detokenizer.get_conditions(expected["code_ids"], expected["token_counts"])
    assert_close(conditions.prompt_embeds, expected["highres_prompt_embeds"])
    assert_close(conditions.pooled_prompt_embeds, expected["highres_pooled_prompt_embeds"])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "highres_pixel_decoding", subfolder="unet")
    assert torch.equal(detokenizer.unet.conv_out.weight, unet.conv_out.weight)
    assert type(detokenizer.scheduler).__name__ == "DDIMScheduler"
    images = detokenizer.decode(expected["code_ids"][:4], torch.tensor([4]), num_inference_steps=2)
    assert images[0].size == (32, 32)
