"""convert_original_lavit.py at unit level: a tiny tokenizer written out under the official key names (`jy0205/LaVIT`)
converts back to the same weights and sizes; renaming accounts for every key; sizes are read from tensor shapes and
mismatches are refused by name; the checkpoint readers (safetensors beside .bin, sharded LM folders), and the
meta-device helpers `assign_tensors` and `check_materialized`."""

import json
import re

import pytest
import torch
from conftest import tiny_tokenizer_config
from lavit.modeling.convert_original_lavit import (
    assign_tensors,
    check_materialized,
    convert_original_lm_visual_state_dict,
    convert_tokenizer,
    count_blocks,
    iter_lm_checkpoint,
    load_original_state_dict,
    original_detokenizer_config,
    original_tokenizer_config,
    rename_keys,
)
from safetensors.torch import save_file
from torch import nn

from lavit import LaVITTokenizerModel

# our attention-layer names -> the official ones (the inverse of the module's rules, written out once more)
LAYER_NAMES = [("self_attn_norm.", "norm0."), ("cross_attn_norm.", "norm1."), ("mlp_norm.", "norm2."),
               ("self_attn.qkv.", "self_attn.qkv."), ("self_attn.out_proj.", "self_attn.proj."),
               ("cross_attn.q_proj.", "cross_attn.query."), ("cross_attn.k_proj.", "cross_attn.key."),
               ("cross_attn.v_proj.", "cross_attn.value."), ("cross_attn.out_proj.", "cross_attn.proj."),
               ("mlp.", "mlp.")]
OFFICIAL_NAMES = [
    (r"^vision_model\.embeddings\.cls_token$", "encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "encoder.patch_embed.proj."),
    (r"^vision_model\.layers\.(\d+)\.layer_norm(\d)\.", r"encoder.blocks.\1.norm\2."),
    (r"^vision_model\.layers\.(\d+)\.(attn|mlp)\.", r"encoder.blocks.\1.\2."),
    (r"^selector\.layer_norm\.", "token_predictor.in_conv.0."), (r"^selector\.in_proj\.", "token_predictor.in_conv.1."),
    (r"^selector\.fc1\.", "token_predictor.out_conv.0."), (r"^selector\.fc2\.", "token_predictor.out_conv.2."),
    (r"^selector\.classifier\.", "token_predictor.out_conv.4."),
    (r"^merger\.context_norm\.", "causal_encoder.ln_vision."), (r"^merger\.norm\.", "causal_encoder.norm."),
    *[(rf"^merger\.layers\.(\d+)\.{re.escape(ours)}", rf"causal_encoder.blocks.\1.{theirs}")
      for ours, theirs in LAYER_NAMES],
    (r"^quantizer\.codebook$", "quantize.embedding.weight"), (r"^quantizer\.project_in\.", "encode_task_layer."),
]
OFFICIAL_DECODER_NAMES = [
    (r"^decoder\.position_embedding$", "pos_embed"), (r"^decoder\.query_embedding$", "query_embed"),
    (r"^decoder\.in_proj\.", "in_proj."), (r"^decoder\.norm\.", "norm."),
    (r"^decoder\.project_out\.", "decode_task_layer."),
    *[(rf"^decoder\.layers\.(\d+)\.{re.escape(ours)}", rf"blocks.\1.{theirs}") for ours, theirs in LAYER_NAMES],
]


def official_state_dicts(model):
    """`model`'s weights under the official names: (tokenizer state dict, decoder state dict)."""
    tokenizer, decoder = {}, {}
    for key, tensor in model.state_dict().items():
        for rules, out in ((OFFICIAL_NAMES, tokenizer), (OFFICIAL_DECODER_NAMES, decoder)):
            for pattern, replacement in rules:
                if re.search(pattern, key):
                    out[re.sub(pattern, replacement, key)] = tensor.clone()
                    break
    return tokenizer, decoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config(merger_attention="official"))
    with torch.no_grad():  # every tensor distinct from its init, so a weight that is not carried over shows
        for parameter in model.parameters():
            parameter.normal_()
    return model, *official_state_dicts(model)


def test_a_tokenizer_in_official_names_converts_to_the_same_weights_and_sizes(tiny):
    model, tokenizer_state, decoder_state = tiny
    unused = {"encoder.norm.weight": torch.ones(1), "encoder.head.weight": torch.ones(1),
              "vit_proj.weight": torch.ones(1)}  # in the official file, but not the tokenizer's
    converted = convert_tokenizer({**tokenizer_state, **unused}, decoder_state, vision_num_heads=4,
                                  merger_num_heads=4, decoder_num_heads=4)
    assert not converted.training
    ours, expected = converted.config, model.config
    for name in ("image_size", "patch_size", "num_patches", "codebook_size", "code_dim", "merger_num_layers",
                 "merger_intermediate_size", "decoder_hidden_size", "decoder_num_layers", "decoder_intermediate_size"):
        assert getattr(ours, name) == getattr(expected, name), name
    assert ours.vision_config.to_dict() == expected.vision_config.to_dict()
    assert ours.merger_attention == "official"
    derived = ("quantizer.ema_code_sum", "quantizer.ema_cluster_size", "quantizer.initialized")
    for key, tensor in model.state_dict().items():
        if key not in derived:
            assert torch.equal(converted.state_dict()[key], tensor), key
    quantizer = converted.quantizer  # the EMA statistics start from the official codebook
    assert torch.equal(quantizer.ema_code_sum, quantizer.codebook) and bool(quantizer.initialized)
    assert torch.equal(quantizer.ema_cluster_size, torch.ones(ours.codebook_size))


def test_rename_keys_drops_listed_unused_keys_and_names_every_unknown_one():
    rules = [(r"^a\.", "x."), (r"^a\.b\.", "never.")]  # the first matching rule wins
    state = {"a.b.w": torch.zeros(1), "skip.w": torch.zeros(1)}
    assert list(rename_keys(state, rules, [r"^skip\."], "file")) == ["x.b.w"]
    with pytest.raises(ValueError, match=r"^file: 2 key\(s\) match no official LaVIT name: \['skip.w', 'z'\]$"):
        rename_keys({**state, "z": torch.zeros(1)}, rules, [], "file")


def test_the_lm_side_merger_and_projection_get_the_models_names():
    state = {"causal_encoder.blocks.1.norm0.weight": torch.zeros(1), "causal_encoder.ln_vision.bias": torch.zeros(1),
             "vit_proj.weight": torch.zeros(1)}
    assert sorted(convert_original_lm_visual_state_dict(state)) == [
        "visual_merger.context_norm.bias", "visual_merger.layers.1.self_attn_norm.weight", "visual_projection.weight"]
    with pytest.raises(ValueError, match="visual_weight state dict: 1 key"):
        convert_original_lm_visual_state_dict({"encoder.cls_token": torch.zeros(1)})


def test_count_blocks_is_the_highest_index_plus_one():
    state = dict.fromkeys(["blocks.0.w", "blocks.3.w", "blocks.10.w", "other.2.w"])
    assert count_blocks(state, r"blocks\.") == 11
    with pytest.raises(ValueError, match=r"no keys start with 'layers\\\\.'<index>."):
        count_blocks(state, r"layers\.")


def test_tensors_that_do_not_fit_are_refused_by_name(tiny):
    _, tokenizer_state, decoder_state = tiny
    without = {key: value for key, value in tokenizer_state.items() if key != "quantize.embedding.weight"}
    with pytest.raises(ValueError, match="tokenizer state dict has no tensor 'quantize.embedding.weight'"):
        original_tokenizer_config(without)
    positions = tokenizer_state["encoder.pos_embed"]
    with pytest.raises(ValueError, match="encoder.pos_embed has 16 rows, expected 1 \\+ a square number"):
        original_tokenizer_config({**tokenizer_state, "encoder.pos_embed": positions[:, :16]})
    narrow = {**decoder_state, "in_proj.weight": decoder_state["in_proj.weight"][:, :4]}
    with pytest.raises(ValueError, match=r"decoder does not match the tokenizer: code dim 4 vs 8"):
        original_tokenizer_config(tokenizer_state, narrow)


def test_without_a_decoder_the_fresh_decoder_gets_the_mergers_sizes(tiny):
    _, tokenizer_state, _ = tiny
    config = original_tokenizer_config(tokenizer_state, vision_num_heads=4, merger_num_heads=4, decoder_num_heads=4,
                                       selection_mode="sample")
    assert config.decoder_hidden_size == config.vision_hidden_size
    assert (config.decoder_num_layers, config.decoder_intermediate_size) == (config.merger_num_layers,
                                                                            config.merger_intermediate_size)
    assert config.selection_mode == "sample"  # overrides reach the config


def test_a_pixel_decoder_file_is_told_by_its_keys_and_unknown_settings_are_refused():
    codebook = torch.zeros(32, 8)
    with pytest.raises(TypeError, match=r"unknown LaVITDetokenizerConfig argument\(s\) \['guidance'\]"):
        original_detokenizer_config({}, codebook, guidance=3)
    with pytest.raises(ValueError, match="neither unet_proj \\(lowres\\) nor unet_proj_1 \\(highres\\)"):
        original_detokenizer_config({"query_embed": torch.zeros(1, 16, 32)}, codebook)


def test_a_safetensors_file_wins_over_the_bin_of_the_same_name(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.bin")
    assert torch.equal(load_original_state_dict(tmp_path / "weights.bin")["w"], torch.zeros(2))
    save_file({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert torch.equal(load_original_state_dict(tmp_path / "weights.bin")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="official LaVIT checkpoint file not found: .*missing.bin"):
        load_original_state_dict(tmp_path / "missing.bin")


@pytest.mark.parametrize("content, found", [({"w": torch.zeros(1), "step": 3}, r"entries that are not tensors \("
                                                                                 r"\['step'\]\)"),
                                            ([torch.zeros(1)], "list")])
def test_a_checkpoint_that_is_not_a_plain_state_dict_is_refused(tmp_path, content, found):
    torch.save(content, tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=rf"weights.bin holds {found}, expected a plain state dict"):
        load_original_state_dict(tmp_path / "weights.bin")


def test_a_sharded_lm_folder_is_read_one_shard_at_a_time_in_the_models_names(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": torch.ones(4, 2)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    shards = list(iter_lm_checkpoint(tmp_path))
    assert [list(shard) for shard in shards] == [["model.language_model.embed_tokens.weight"], ["lm_head.weight"]]
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        list(iter_lm_checkpoint(tmp_path / "empty"))


def test_assign_tensors_fills_a_meta_module_in_the_given_dtype_and_check_materialized_names_the_rest():
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    weight = torch.randn(3, 2)
    assigned = assign_tensors(module, {"0.weight": weight, "0.bias": torch.zeros(3)}, torch.bfloat16)
    assert assigned == {"0.weight", "0.bias"}
    assert module[0].weight.dtype == torch.bfloat16 and torch.equal(module[0].weight, weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"the official release does not fill 2 tensor\(s\): \['1.weight', '1.bias'\]"):
        check_materialized(module)
    with pytest.raises(ValueError, match=r"1 converted key\(s\) are not in Sequential: \['2.weight'\]"):
        assign_tensors(module, {"2.weight": weight}, None)
    assign_tensors(module, {"1.weight": torch.zeros(1, 3), "1.bias": torch.zeros(1)}, None)
    check_materialized(module)
