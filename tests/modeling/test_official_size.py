"""The released LaVIT sizes without the weights: every official-size model built on the meta device has the official
parameter counts, and an official release folder at the official widths (few layers, random bf16 weights in the
official file names, key layout and LM sharding) converts with `lavit convert-original` file by file, in bf16, with
peak memory near the size of the weights.

Reference numbers: ../shared/research/lavit_reference.md section 7 (parameter counts of the official modules, dumped
from the official code's own modules; key list and shapes) and section 5 / the Hub file sizes; the LM count is that
of the LLaMA-2-7B keys of section 7 with the 48386-row vocabulary (also measured in research/gpu_anchors.md B).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from lavit import LaVITConfig, LaVITDetokenizer, LaVITDetokenizerConfig, LaVITForCausalLM, LaVITTokenizerConfig

# lavit_reference.md section 7
EVA_ENCODER = 1_012_588_928  # 40 blocks + final norm + CLIP head (1024 x 1408 + 1024)
EVA_UNUSED = 2 * 1408 + 1024 * 1408 + 1024  # final norm and head: loaded by the official code, never applied
TOKEN_PREDICTOR = 3_227_490
CAUSAL_ENCODER = 398_267_392
ENCODE_TASK_LAYER = 2_028_960
QUANTIZE = 524_288  # 16384 x 32 codebook (a buffer here: the EMA updates it, the optimizer does not)
VIT_PROJ = 5_771_264
LOWRES_DECODER = 404_081_792  # tokenizer_decoder.bin, with unet_proj (768 x 1408 + 768)
HIGHRES_DECODER = 414_002_304  # highres_tokenizer_decoder.bin, with unet_proj_1/2 and unet_attnpool
UNET_PROJ = 768 * 1408 + 768
LLAMA_7B_LAVIT = 48386 * 4096 * 2 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096  # 6,872,649,728
SD15_UNET, SDXL_UNET, SD_VAE = 859_520_964, 2_567_463_684, 83_653_863  # diffusers' SD-1.5 / SDXL UNet, SD VAE


def count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_official_sizes_on_the_meta_device():
    with torch.device("meta"):
        model = LaVITForCausalLM(LaVITConfig())
    tokenizer = model.model.visual_tokenizer
    assert count(tokenizer.vision_model) == EVA_ENCODER - EVA_UNUSED
    assert count(tokenizer.selector) == TOKEN_PREDICTOR
    assert count(tokenizer.merger) == CAUSAL_ENCODER
    assert count(tokenizer.quantizer) == ENCODE_TASK_LAYER and tokenizer.quantizer.codebook.numel() == QUANTIZE
    assert count(tokenizer.decoder) == LOWRES_DECODER - UNET_PROJ
    # visual_weight.bin: the merger trained with the LM + vit_proj = 404,038,656 (section 7, from its file size)
    assert count(model.model.visual_merger) + count(model.model.visual_projection) == CAUSAL_ENCODER + VIT_PROJ
    assert count(model.model.language_model) + count(model.lm_head) == LLAMA_7B_LAVIT == 6_872_649_728
    assert count(model) == (EVA_ENCODER - EVA_UNUSED + TOKEN_PREDICTOR + 2 * CAUSAL_ENCODER + ENCODE_TASK_LAYER
                            + LOWRES_DECODER - UNET_PROJ + VIT_PROJ + LLAMA_7B_LAVIT)
    for conditioning, decoder_file, unet in (("lowres", LOWRES_DECODER, SD15_UNET), ("highres", HIGHRES_DECODER,
                                                                                     SDXL_UNET)):
        pytest.importorskip("diffusers")
        config = LaVITDetokenizerConfig.from_tokenizer_config(LaVITTokenizerConfig(), conditioning=conditioning)
        with torch.device("meta"):
            detokenizer = LaVITDetokenizer(config)
        assert count(detokenizer.decoder) + count(detokenizer.condition) == decoder_file, conditioning
        assert (count(detokenizer.unet), count(detokenizer.vae)) == (unet, SD_VAE), conditioning


# ------------------------------------------------------------------------------ an official-width release folder

WIDTH, MLP, LM_WIDTH, LM_MLP, VOCAB = 1408, 6144, 4096, 11008, 48386


def official_tensors(layers: int) -> dict[str, dict[str, tuple]]:
    """Shapes of every official file (lavit_reference.md section 7) at the official widths with `layers` blocks."""
    eva = {"cls_token": (1, 1, WIDTH), "pos_embed": (1, 257, WIDTH), "patch_embed.proj.weight": (WIDTH, 3, 14, 14),
           "patch_embed.proj.bias": (WIDTH,), "norm.weight": (WIDTH,), "norm.bias": (WIDTH,),
           "head.weight": (1024, WIDTH), "head.bias": (1024,)}
    for i in range(layers):
        block = f"blocks.{i}."
        eva.update({f"{block}{name}": (WIDTH,) for name in ("norm1.weight", "norm1.bias", "norm2.weight",
                                                              "norm2.bias", "attn.q_bias", "attn.v_bias",
                                                              "attn.proj.bias", "mlp.fc2.bias")})
        eva.update({f"{block}attn.qkv.weight": (3 * WIDTH, WIDTH), f"{block}attn.proj.weight": (WIDTH, WIDTH),
                    f"{block}mlp.fc1.weight": (MLP, WIDTH), f"{block}mlp.fc1.bias": (MLP,),
                    f"{block}mlp.fc2.weight": (WIDTH, MLP)})

    def attention_blocks(prefix, self_name, cross_name, cross_keys):
        shapes = {}
        for i in range(layers):
            block = f"{prefix}blocks.{i}."
            for norm in ("norm0", "norm1", "norm2"):
                shapes.update({f"{block}{norm}.weight": (WIDTH,), f"{block}{norm}.bias": (WIDTH,)})
            shapes.update({f"{block}{self_name}.qkv.weight": (3 * WIDTH, WIDTH), f"{block}{self_name}.qkv.bias":
                           (3 * WIDTH,), f"{block}{self_name}.proj.weight": (WIDTH, WIDTH),
                           f"{block}{self_name}.proj.bias": (WIDTH,), f"{block}mlp.fc1.weight": (MLP, WIDTH),
                           f"{block}mlp.fc1.bias": (MLP,), f"{block}mlp.fc2.weight": (WIDTH, MLP),
                           f"{block}mlp.fc2.bias": (WIDTH,)})
            for name in cross_keys:
                shapes.update({f"{block}{cross_name}.{name}.weight": (WIDTH, WIDTH),
                               f"{block}{cross_name}.{name}.bias": (WIDTH,)})
        return shapes

    merger = {**attention_blocks("causal_encoder.", "token_causal_attn", "token_cross_attn",
                                 ("query", "key", "value", "proj")),
              "causal_encoder.ln_vision.weight": (WIDTH,), "causal_encoder.ln_vision.bias": (WIDTH,),
              "causal_encoder.norm.weight": (WIDTH,), "causal_encoder.norm.bias": (WIDTH,)}
    encoder = {**merger, "token_predictor.in_conv.0.weight": (WIDTH,), "token_predictor.in_conv.0.bias": (WIDTH,),
               "token_predictor.in_conv.1.weight": (WIDTH, WIDTH), "token_predictor.in_conv.1.bias": (WIDTH,),
               "token_predictor.out_conv.0.weight": (704, WIDTH), "token_predictor.out_conv.0.bias": (704,),
               "token_predictor.out_conv.2.weight": (352, 704), "token_predictor.out_conv.2.bias": (352,),
               "token_predictor.out_conv.4.weight": (2, 352), "token_predictor.out_conv.4.bias": (2,),
               "quantize.embedding.weight": (16384, 32), "encode_task_layer.0.weight": (WIDTH, WIDTH),
               "encode_task_layer.0.bias": (WIDTH,), "encode_task_layer.2.weight": (32, WIDTH),
               "encode_task_layer.2.bias": (32,)}
    decoder = {**attention_blocks("", "self_attn", "cross_attn", ("query", "key", "value", "proj")),
               "pos_embed": (1, 256, WIDTH), "query_embed": (1, 256, WIDTH), "in_proj.weight": (WIDTH, 32),
               "in_proj.bias": (WIDTH,), "norm.weight": (WIDTH,), "norm.bias": (WIDTH,),
               "decode_task_layer.0.weight": (WIDTH, WIDTH), "decode_task_layer.0.bias": (WIDTH,),
               "decode_task_layer.2.weight": (WIDTH, WIDTH), "decode_task_layer.2.bias": (WIDTH,),
               "unet_proj.weight": (768, WIDTH), "unet_proj.bias": (768,)}
    visual_weight = {**merger, "vit_proj.weight": (LM_WIDTH, WIDTH), "vit_proj.bias": (LM_WIDTH,)}
    return {"visual_tokenizer/eva_vitg_psz14.bin": eva, "visual_tokenizer/tokenizer_encoder.bin": encoder,
            "visual_tokenizer/tokenizer_decoder.bin": decoder, "language_model/visual_weight.bin": visual_weight}


def llama_shards(layers: int) -> list[dict[str, tuple]]:
    """The LaVIT LLaMA keys in three shards, as the release (embedding + first layers, ..., last layers + head)."""
    def layer(i):
        prefix = f"model.layers.{i}."
        shapes = {f"{prefix}self_attn.{name}_proj.weight": (LM_WIDTH, LM_WIDTH) for name in "qkvo"}
        shapes.update({f"{prefix}mlp.gate_proj.weight": (LM_MLP, LM_WIDTH), f"{prefix}mlp.up_proj.weight":
                       (LM_MLP, LM_WIDTH), f"{prefix}mlp.down_proj.weight": (LM_WIDTH, LM_MLP),
                       f"{prefix}input_layernorm.weight": (LM_WIDTH,),
                       f"{prefix}post_attention_layernorm.weight": (LM_WIDTH,)})
        return shapes

    return [{"model.embed_tokens.weight": (VOCAB, LM_WIDTH), **layer(0)},
            {key: shape for i in range(1, layers) for key, shape in layer(i).items()},
            {"model.norm.weight": (LM_WIDTH,), "lm_head.weight": (VOCAB, LM_WIDTH)}]


def write_random(path, shapes: dict[str, tuple], generator) -> int:
    tensors = {key: torch.randn(shape, generator=generator).to(torch.bfloat16) for key, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return sum(tensor.numel() for tensor in tensors.values())


def write_official_width_release(folder, layers: int = 2) -> int:
    """The release layout with random bf16 tensors; returns the number of values written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    generator = torch.Generator().manual_seed(0)
    values = sum(write_random(folder / name, shapes, generator) for name, shapes in official_tensors(layers).items())
    language_model = folder / "language_model"
    weight_map, lm_values = {}, 0
    for index, shapes in enumerate(llama_shards(layers), start=1):
        name = f"pytorch_model-{index:05d}-of-00003.bin"
        lm_values += write_random(language_model / name, shapes, generator)
        weight_map.update(dict.fromkeys(shapes, name))
    index = {"metadata": {"total_size": 2 * lm_values}, "weight_map": weight_map}
    (language_model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    values += lm_values
    LlamaConfig(vocab_size=VOCAB, hidden_size=LM_WIDTH, intermediate_size=LM_MLP, num_hidden_layers=layers,
                num_attention_heads=32, max_position_embeddings=2048, pad_token_id=0, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(language_model)
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"word{index}": index for index in range(3, 32000)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(language_model)
    return values


# VmHWM: this process's peak resident memory (ru_maxrss would also count the parent's, kept across exec)
MEASURE = """
import re, sys
import lavit, lavit.cli, lavit.hub_cards, transformers  # imported before the baseline is read
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
baseline = peak_kib()
code = lavit.cli.main(["convert-original", sys.argv[1], sys.argv[2], "--pixel-decoder", "lowres"])
print("RSS_KIB", baseline, peak_kib(), code)
"""


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_convert_an_official_width_release_file_by_file_in_bf16(tmp_path):
    """Every official tensor is mapped (the converter raises on any other), the Hub folder is bf16, and the
    conversion's peak resident memory above the imported libraries stays within 1.3x the weights (no float32
    copy, no second copy of the LM: shards are memory-mapped and assigned one at a time)."""
    from safetensors import safe_open

    release, converted = tmp_path / "release", tmp_path / "converted"
    values = write_official_width_release(release)
    weight_bytes = 2 * values
    completed = subprocess.run([sys.executable, "-c", MEASURE, str(release), str(converted)], capture_output=True,
                               text=True, timeout=600, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    baseline_kib, peak_kib, code = completed.stdout.split("RSS_KIB")[-1].split()
    assert code == "0", completed.stderr[-3000:]
    growth = (int(peak_kib) - int(baseline_kib)) * 1024
    assert growth <= 1.3 * weight_bytes, f"conversion peak {growth / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB"
    dtypes, stored = set(), 0
    for shard in converted.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = handle.get_slice(key)
                dtypes.add(tensor.get_dtype())
                stored += torch.Size(tensor.get_shape()).numel()
    assert dtypes <= {"BF16", "BOOL"} and "BF16" in dtypes, dtypes
    # every written value is stored once, except the EVA final norm/head and the decoder's UNet projection (unused
    # without a pixel decoder); the quantizer's EMA state (codebook copy, counts, flag) is derived
    assert stored == values - EVA_UNUSED - UNET_PROJ + 16384 * 32 + 16384 + 1


def test_conversion_without_a_feature_decoder_initialises_one(parity_files, tmp_path):
    """pixel_decoder=None: no official file fills the feature decoder, so it starts random (not left on meta)."""
    from lavit.modeling.convert_original_lavit import convert_release
    from official_release import write_official_release

    write_official_release(parity_files, tmp_path)
    model, detokenizer = convert_release(tmp_path, pixel_decoder=None, vision_num_heads=4, merger_num_heads=4,
                                         decoder_num_heads=4)
    decoder = model.model.visual_tokenizer.decoder
    assert detokenizer is None
    assert all(not parameter.is_meta and torch.isfinite(parameter).all() for parameter in decoder.parameters())
    assert 0.01 < float(decoder.query_embedding.std()) < 0.05  # the config's initializer range, not garbage
    expected = parity_files["expected"]
    reconstructed = model.model.visual_tokenizer.decode_codes(expected["code_ids"][:5], torch.tensor([5]))
    tokenizer_config = model.config.tokenizer_config
    assert reconstructed.shape == (1, tokenizer_config.num_patches, tokenizer_config.vision_config.hidden_size)
