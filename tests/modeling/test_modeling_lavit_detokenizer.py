"""The pixel detokenizer: official parity of the conditioning heads, sampling, guidance batching, schedulers,
save/load (with and without `lavit` importable) and a few training steps on real images."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VAE_CONFIG, real_photos, tiny_detokenizer_config, tiny_unet_config
from lavit.modeling.convert_original_lavit import (
    convert_detokenizer,
    convert_original_detokenizer_state_dict,
    detokenizer_from_original_state_dict,
)
from lavit.modeling.modeling_lavit_detokenizer import (
    LaVITHighresConditioning,
    LaVITLowresConditioning,
    training_target,
)
from lavit.modeling.modeling_lavit_tokenizer import LaVITTokenizationOutput
from official_release import assert_close
from PIL import Image
from test_hub import BLOCK_LAVIT

from lavit import LaVITDetokenizer

pytest.importorskip("diffusers")


def tiny_detokenizer(conditioning="highres", seed=0):
    torch.manual_seed(seed)
    return LaVITDetokenizer(tiny_detokenizer_config(conditioning)).eval()


CODES = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
COUNTS = torch.tensor([4, 1, 6])


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("conditioning", ["lowres", "highres"])
def test_official_decoder_heads_reproduce_the_fixtures(parity_files, conditioning):
    expected = parity_files["expected"]
    name = "decoder_state_dict" if conditioning == "lowres" else "highres_decoder_state_dict"
    codebook = parity_files["tokenizer_state_dict"]["quantize.embedding.weight"]
    pooled = 36 if conditioning == "highres" else None
    settings = dict(
        decoder_num_heads=4, pooling_num_heads=4,
        negative_prompt_embeds=torch.randn(1, 7, 24) if conditioning == "lowres" else None,
        unet_config=tiny_unet_config(60 if pooled else 24, pooled), vae_config=TINY_VAE_CONFIG,
    )
    detokenizer = detokenizer_from_original_state_dict(parity_files[name], codebook, **settings)
    assert detokenizer.config.conditioning == conditioning
    with torch.no_grad():
        features = detokenizer.reconstruct_features(expected["code_ids"], expected["token_counts"])
        conditions = detokenizer.condition(features)
    if conditioning == "lowres":
        assert_close(features, expected["decoder_out"])
        assert_close(conditions.prompt_embeds, expected["decoder_unet_cond"])
        assert conditions.pooled_prompt_embeds is None
        assert detokenizer.config.negative_context_length == 7
    else:
        assert_close(features, expected["highres_decoder_out"])
        assert_close(conditions.prompt_embeds, expected["highres_prompt_embeds"])
        assert_close(conditions.pooled_prompt_embeds, expected["highres_pooled_prompt_embeds"])
    broken = dict(parity_files[name])
    broken["blocks.0.typo.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="typo"):
        detokenizer_from_original_state_dict(broken, codebook, **settings)


@pytest.mark.parametrize("conditioning", ["lowres", "highres"])
def test_conditioning_class_is_picked_at_construction_and_keeps_the_official_keys(parity_files, conditioning):
    """One conditioning class per variant, and the converted official tensors are exactly the model's own keys
    (`load_state_dict(strict=False)` would skip a renamed one silently)."""
    name = "decoder_state_dict" if conditioning == "lowres" else "highres_decoder_state_dict"
    codebook = parity_files["tokenizer_state_dict"]["quantize.embedding.weight"]
    negative = torch.randn(1, 7, 24) if conditioning == "lowres" else None
    pooled = 36 if conditioning == "highres" else None
    detokenizer = detokenizer_from_original_state_dict(
        parity_files[name], codebook, decoder_num_heads=4, pooling_num_heads=4, negative_prompt_embeds=negative,
        unet_config=tiny_unet_config(60 if pooled else 24, pooled), vae_config=TINY_VAE_CONFIG,
    )
    expected_class = LaVITHighresConditioning if conditioning == "highres" else LaVITLowresConditioning
    assert type(detokenizer.condition) is expected_class
    converted = convert_original_detokenizer_state_dict(parity_files[name], codebook, negative)
    own = {key for key in detokenizer.state_dict() if not key.startswith(("unet.", "vae."))}
    assert set(converted) == own
    assert ("negative_prompt_embeds" in own) == (conditioning == "lowres")
    with pytest.raises(TypeError, match=r"unknown LaVITDetokenizerConfig argument\(s\) \['decoder_num_head'\]"):
        detokenizer_from_original_state_dict(parity_files[name], codebook, decoder_num_head=4)


def test_sdxl_size_conditions_go_to_the_highres_unet_only():
    highres, lowres = tiny_detokenizer("highres"), tiny_detokenizer("lowres")
    with torch.no_grad():
        conditions = highres.get_conditions(CODES, COUNTS)
        added = highres.condition.added_cond_kwargs(conditions, 24, 40)
        assert lowres.condition.added_cond_kwargs(lowres.get_conditions(CODES, COUNTS), 24, 40) is None
    # original size, crop top-left, target size: the output size for both (official code)
    assert added["time_ids"].tolist() == [[24, 40, 0, 0, 24, 40]] * 3
    assert added["text_embeds"] is conditions.pooled_prompt_embeds
    negative = highres.negative_conditions(3)
    assert not highres.condition.added_cond_kwargs(negative, 24, 40)["text_embeds"].any()


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_decode_pixels_equal_its_own_loop_before_the_pipeline_owned_it():
    """`decode` draws through the pipeline's sampling loop; `fixtures/detokenizer_decode_pixels.safetensors` was
    written by the loop `decode` had of its own (commit in its metadata) on the same tiny models and seeds: one
    generator for the batch, a list of them, another size, no guidance, a stochastic scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(__file__).parent / "fixtures" / "detokenizer_decode_pixels.safetensors"
    with safe_open(path, "pt") as handle:
        assert "before the pipeline owned it" in handle.metadata()["made_by"]
    reference = load_file(path)
    for conditioning in ("highres", "lowres"):
        detokenizer = tiny_detokenizer(conditioning)
        ancestral = EulerAncestralDiscreteScheduler.from_config(detokenizer.scheduler.config)
        drawn = {
            "guided": detokenizer.decode(CODES, COUNTS, guidance_scale=5.0, generator=seeded(3), output_type="pt"),
            "default": detokenizer.decode(CODES, COUNTS, generator=seeded(0), output_type="pt"),
            "wide_unguided": detokenizer.decode(CODES, COUNTS, height=24, width=40, num_inference_steps=2,
                                                guidance_scale=1.0, generator=seeded(1), output_type="pt"),
            # a list of generators now seeds one stream per image from each (diffusers' meaning, as the pipeline
            # does); the loop of the fixture drew each image's initial latents from its generator as it is
            "latent": detokenizer.decode(CODES, COUNTS, generator=[seeded(5), seeded(6), seeded(7)],
                                         latents=torch.cat([torch.randn((1, *reference[f"{conditioning}_latent"]
                                                                        .shape[1:]), generator=seeded(5 + index))
                                                            for index in range(3)]), output_type="latent"),
            "ancestral": detokenizer.decode(CODES, COUNTS, scheduler=ancestral, generator=seeded(2), output_type="pt",
                                            num_inference_steps=3),
        }
        # within float noise across CPUs and thread counts (the fixture was made on another machine: 2.5e-5 seen on
        # latents of unit scale), far below a pixel level (1/255)
        for name, images in drawn.items():
            torch.testing.assert_close(images, reference[f"{conditioning}_{name}"], atol=2e-4, rtol=0,
                                       msg=lambda message, key=f"{conditioning} {name}": f"{key}: {message}")


def test_decode_is_the_pipeline_on_the_same_modules():
    """One sampling loop: `decode` and a pipeline made of the detokenizer give the same images and latents; the
    pipeline's condition encoder is a view of the detokenizer's modules (no copy)."""
    detokenizer = tiny_detokenizer()
    pipe = detokenizer.as_pipeline()
    assert pipe.condition_encoder.decoder is detokenizer.decoder and pipe.unet is detokenizer.unet
    assert pipe.condition_encoder.codebook is detokenizer.codebook
    generators = [seeded(seed) for seed in range(3)]
    tokens = LaVITTokenizationOutput(code_ids=CODES, token_counts=COUNTS)
    latents = detokenizer.decode(CODES, COUNTS, generator=generators, output_type="latent")
    generators = [seeded(seed) for seed in range(3)]
    assert torch.equal(pipe.decode_visual_tokens(tokens, generator=generators, output_type="latent").images, latents)
    images = detokenizer.decode(CODES, COUNTS, latents=latents, num_inference_steps=1, output_type="pt")
    pil_images = detokenizer.decode(CODES, COUNTS, latents=latents, num_inference_steps=1)
    assert [np.asarray(image).tolist() for image in pil_images] == [
        (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).tolist() for image in images
    ]
    with pytest.raises(ValueError, match="output_type must be one of"):
        detokenizer.decode(CODES, COUNTS, output_type="jpeg")
    with pytest.raises(ValueError, match=r"latents must have shape \(3, 4, 8, 8\), got \(3, 4, 16, 16\)"):
        detokenizer.decode(CODES, COUNTS, height=16, width=16, latents=torch.zeros(3, 4, 16, 16))


def test_training_target():
    from diffusers import DDIMScheduler

    shape = (2, 4, 3, 5)
    latents, noise, timesteps = torch.randn(shape), torch.randn(shape), torch.tensor([10, 900])
    assert training_target(DDIMScheduler(), latents, noise, timesteps) is noise
    velocity_scheduler = DDIMScheduler(prediction_type="v_prediction")
    velocity = training_target(velocity_scheduler, latents, noise, timesteps)
    torch.testing.assert_close(velocity, velocity_scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(velocity, noise)
    with pytest.raises(ValueError, match="got 'sample'"):
        training_target(DDIMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_detokenizer_reconstructs_what_its_tokenizer_reconstructs(tiny_model):
    """The detokenizer decodes codes with its own codebook copy through the same path as the tokenizer."""
    detokenizer = LaVITDetokenizer.from_visual_tokenizer(
        tiny_model, conditioning="lowres", prompt_projection_sizes=[24], negative_context_length=5,
        unet_config=tiny_unet_config(24), vae_config=TINY_VAE_CONFIG, image_size=32,
    )
    tokens = tiny_model.tokenize(torch.randn(2, 3, 56, 56, generator=seeded(0)))
    with torch.no_grad():
        features = detokenizer.reconstruct_features(tokens.code_ids, tokens.token_counts)
    assert torch.equal(features, tiny_model.decode_codes(tokens.code_ids, tokens.token_counts))
    for model in (detokenizer.reconstruct_features, tiny_model.decode_codes):
        with pytest.raises(ValueError, match="token_counts sum to 2 but there are 11 code ids"):
            model(CODES, torch.tensor([1, 1]))


def write_lowres_release(parity_files, folder):
    """The lowres half of an official release: `visual_tokenizer/tokenizer_{encoder,decoder}.bin` and
    `pixel_decoding/` (tiny SD-style UNet, VAE, DDIM scheduler, `uncond_embeddings.bin`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from lavit.modeling.configuration_lavit import SD_SCHEDULER_CONFIG

    (folder / "visual_tokenizer").mkdir(parents=True)
    codebook = parity_files["tokenizer_state_dict"]["quantize.embedding.weight"]
    torch.save({"quantize.embedding.weight": codebook}, folder / "visual_tokenizer" / "tokenizer_encoder.bin")
    torch.save(parity_files["decoder_state_dict"], folder / "visual_tokenizer" / "tokenizer_decoder.bin")
    pixel_decoding = folder / "pixel_decoding"
    torch.manual_seed(1)
    UNet2DConditionModel(**tiny_unet_config(24)).save_pretrained(pixel_decoding / "unet")
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(pixel_decoding / "vae")
    DDIMScheduler(**{key: value for key, value in SD_SCHEDULER_CONFIG.items() if key != "_class_name"}).save_pretrained(
        pixel_decoding / "scheduler")
    negative = torch.randn(7, 24)
    torch.save(negative, pixel_decoding / "uncond_embeddings.bin")
    return negative


def test_convert_detokenizer_reads_a_lowres_release(parity_files, tmp_path):
    negative = write_lowres_release(parity_files, tmp_path)
    detokenizer = convert_detokenizer(tmp_path, "lowres", decoder_num_heads=4, pooling_num_heads=4)
    assert detokenizer.config.conditioning == "lowres" and detokenizer.config.image_size == 32
    assert torch.equal(detokenizer.negative_prompt_embeds, negative[None])
    expected = parity_files["expected"]
    with torch.no_grad():
        conditions = detokenizer.get_conditions(expected["code_ids"], expected["token_counts"])
    assert_close(conditions.prompt_embeds, expected["decoder_unet_cond"])
    images = detokenizer.decode(expected["code_ids"][:5], torch.tensor([5]), num_inference_steps=2,
                                generator=seeded(0), output_type="pt")
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="conditioning must be 'highres' or 'lowres', got 'mid'"):
        convert_detokenizer(tmp_path, "mid")
    (tmp_path / "pixel_decoding" / "uncond_embeddings.bin").unlink()
    with pytest.raises(FileNotFoundError, match="uncond_embeddings.bin"):
        convert_detokenizer(tmp_path, "lowres", decoder_num_heads=4, pooling_num_heads=4)


@pytest.mark.parametrize("conditioning", ["lowres", "highres"])
def test_negative_conditions_follow_the_official_recipe(conditioning):
    detokenizer = tiny_detokenizer(conditioning)
    negative = detokenizer.negative_conditions(3)
    assert negative.prompt_embeds.shape == (3, 16, sum(detokenizer.config.prompt_projection_sizes))
    if conditioning == "highres":
        assert not negative.prompt_embeds.any() and not negative.pooled_prompt_embeds.any()
        assert negative.attention_mask.all()
    else:
        # the stored embedding fills the first slots; the mask hides the rest from the UNet
        assert torch.equal(negative.prompt_embeds[:, :5], detokenizer.negative_prompt_embeds.expand(3, -1, -1))
        assert negative.attention_mask[:, :5].all() and not negative.attention_mask[:, 5:].any()


def test_decode_shapes_aspect_ratios_and_seed_determinism():
    detokenizer = tiny_detokenizer()
    images = detokenizer.decode(CODES, COUNTS, generator=seeded(0))
    assert [image.size for image in images] == [(32, 32)] * 3 and all(isinstance(i, Image.Image) for i in images)
    wide = detokenizer.decode(CODES, COUNTS, height=24, width=40, num_inference_steps=2, output_type="pt")
    assert wide.shape == (3, 3, 24, 40) and 0 <= wide.min() and wide.max() <= 1
    first = detokenizer.decode(CODES, COUNTS, generator=seeded(1), output_type="pt")
    again = detokenizer.decode(CODES, COUNTS, generator=seeded(1), output_type="pt")
    other = detokenizer.decode(CODES, COUNTS, generator=seeded(2), output_type="pt")
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    # an image depends on its own codes and latents only, not on the other images of the batch
    latents = torch.randn(3, 4, 16, 16, generator=seeded(4))
    batch = detokenizer.decode(CODES, COUNTS, latents=latents, output_type="pt")
    alone = detokenizer.decode(CODES[4:10], COUNTS[2:], latents=latents[2:], output_type="pt")
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="height must be .*a multiple of 4"):
        detokenizer.decode(CODES, COUNTS, height=30)
    with pytest.raises(ValueError, match="code ids must be in"):
        detokenizer.decode(torch.tensor([40]), torch.tensor([1]))
    with pytest.raises(ValueError, match="token_counts sum to 2"):
        detokenizer.decode(CODES, torch.tensor([1, 1]))


@pytest.mark.parametrize("conditioning", ["lowres", "highres"])
def test_guidance_changes_the_images(conditioning):
    detokenizer = tiny_detokenizer(conditioning)
    guided = detokenizer.decode(CODES, COUNTS, guidance_scale=5.0, generator=seeded(3), output_type="pt")
    unguided = detokenizer.decode(CODES, COUNTS, guidance_scale=1.0, generator=seeded(3), output_type="pt")
    assert (unguided - guided).abs().max() > 1e-4


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_any_diffusers_scheduler_can_be_swapped_in_and_is_saved(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    detokenizer = tiny_detokenizer()
    for scheduler_class in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        scheduler = scheduler_class.from_config(detokenizer.scheduler.config)
        images = detokenizer.decode(CODES, COUNTS, scheduler=scheduler, generator=seeded(0), output_type="pt")
        assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    default = detokenizer.decode(CODES, COUNTS, generator=seeded(0), output_type="pt")
    detokenizer.scheduler = EulerDiscreteScheduler.from_config(detokenizer.scheduler.config)
    euler = detokenizer.decode(CODES, COUNTS, generator=seeded(0), output_type="pt")
    assert (default - euler).abs().max() > 1e-4
    detokenizer.save_pretrained(tmp_path)
    loaded = LaVITDetokenizer.from_pretrained(tmp_path)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    torch.testing.assert_close(loaded.decode(CODES, COUNTS, generator=seeded(0), output_type="pt"), euler)


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_saved_folder_loads_with_remote_code_where_lavit_cannot_be_imported(tmp_path):
    detokenizer = tiny_detokenizer("lowres")
    folder = tmp_path / "detokenizer"
    detokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_lavit_detokenizer.LaVITDetokenizer"
    assert (folder / "modeling_lavit_detokenizer.py").is_file()
    loaded = LaVITDetokenizer.from_pretrained(folder)
    for key, tensor in detokenizer.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    expected = detokenizer.decode(CODES, COUNTS, generator=seeded(0), output_type="pt")
    script = BLOCK_LAVIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        images = model.decode(torch.tensor({CODES.tolist()}), torch.tensor({COUNTS.tolist()}),
                              generator=torch.Generator().manual_seed(0), output_type="pt")
        torch.save(images, {str(tmp_path / "images.pt")!r})
        assert not any(name == "lavit" or name.startswith("lavit.") for name in sys.modules)
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "images.pt", weights_only=True), expected)


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_training_steps_lower_the_loss_on_real_photos():
    detokenizer = tiny_detokenizer().train()
    photos = [Image.fromarray(photo).resize((32, 32), Image.Resampling.BICUBIC) for photo in real_photos()[:4]]
    pixel_values = torch.stack([torch.from_numpy(np.array(photo)).permute(2, 0, 1) for photo in photos])
    pixel_values = pixel_values.float() / 127.5 - 1
    code_ids, token_counts = torch.arange(16), torch.tensor([4, 4, 4, 4])
    generator = seeded(0)
    latents = detokenizer.encode_images(pixel_values)
    fixed = dict(noise=torch.randn(latents.shape, generator=generator),
                 timesteps=torch.randint(0, 1000, (4,), generator=generator),
                 drop_condition=torch.zeros(4, dtype=torch.bool))

    def evaluation_loss():
        with torch.no_grad():
            return float(detokenizer(code_ids, token_counts, latents=latents, **fixed).loss)

    trainable = [param for param in detokenizer.parameters() if param.requires_grad]
    assert not any(param.requires_grad for param in detokenizer.vae.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    before = evaluation_loss()
    for _ in range(40):
        loss = detokenizer(code_ids, token_counts, latents=latents).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluation_loss()
    assert after < 0.7 * before, (before, after)
