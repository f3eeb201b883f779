"""`LaVITPipeline` tested like a diffusers pipeline.

diffusers checks its pipelines with `PipelineTesterMixin` (`tests/pipelines/test_pipelines_common.py` in its source
tree). Its invariants that apply here, each tested below with our own code:

- a batch gives each prompt what it gets alone (`test_inference_batch_single_identical`)
- save / load gives equal images, `torch_dtype` reaches every model (`test_save_load_local`, `test_to_dtype`)
- dict and tuple outputs agree (`test_dict_tuple_outputs_equivalent`), every `output_type`
- `to(...)`, model and sequential CPU offload give the images of the pipeline kept whole (`test_to_device`,
  `test_model_cpu_offload_forward_pass`, `test_sequential_cpu_offload_forward_pass`)
- `num_images_per_prompt`, with one generator or a list of them (`test_num_images_per_prompt`)
- step-end callbacks see the tensors they ask for, can edit the latents and can stop the loop
  (`test_callback_inputs`, `test_callback_cfg`)
- progress bars can be turned off (`test_progress_bar`)
- components can be swapped (`test_components_function`, a scheduler from another's config)
- `callback_on_step_end_tensor_inputs` and `output_type` are checked

Invariants that do not apply, and why:

- `test_attention_slicing_forward_pass`, `test_xformers_attention_forwardGenerator_pass`, `test_layerwise_casting`,
  `test_group_offloading`, FreeU/fused-QKV/VAE slicing/tiling: properties of the UNet and VAE, which are diffusers'
  own classes tested by diffusers; the pipeline adds nothing to them.
- `test_float16_inference`, `test_save_load_float16` and offload to an accelerator: need a GPU (diffusers' offload
  moves models between the CPU and an accelerator; on CPU, `enable_model_cpu_offload(device="cpu")` and
  `enable_sequential_cpu_offload(device="cpu")` run, and are tested here). `tests/gpu/` holds the GPU checks.
- `test_encode_prompt_works_in_isolation`, `test_pipeline_call_signature` for `prompt_embeds`: LaVIT's prompt is not
  embedded once and reused; the language model samples visual tokens from it, so stage 1 takes prompts (or the
  visual tokens, through `decode_visual_tokens`).
- `test_StableDiffusionMixin_component`, `test_cfg` with `guidance_rescale`, IP adapters, LoRA loading: SD-specific
  mixins this pipeline does not have.

The pixels equal those of the released path (`LaVITForCausalLM.generate_images` / `reconstruct` of lavit <= 0.x, now
removed) for the same seeds: `fixtures/released_path_pixels.safetensors` was written by that code (commit in its
metadata) on the same tiny model.
"""

import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_photos, text_vocab_size, tiny_detokenizer_config, tiny_lavit_config
from PIL import Image
from test_hub import BLOCK_LAVIT

pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from lavit import LaVITDetokenizer, LaVITForCausalLM, LaVITPipeline  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = dict(max_new_tokens=6, min_new_tokens=2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_pipeline(lavit_processor, text_tokenizer) -> LaVITPipeline:
    """The tiny model of the fixtures (seeded as the reference pixels were made)."""
    torch.manual_seed(0)
    language_model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()
    torch.manual_seed(0)
    detokenizer = LaVITDetokenizer(tiny_detokenizer_config()).eval()
    pipe = LaVITPipeline.from_detokenizer(language_model, lavit_processor, detokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(lavit_processor, text_tokenizer):
    return tiny_pipeline(lavit_processor, text_tokenizer)


def images(pipe, prompt="a red bus", seed=0, **kwargs):
    kwargs = {**TOKENS, "output_type": "pt", **kwargs}
    return pipe(prompt, generator=seeded(seed), **kwargs).images


def test_pixels_equal_the_released_path_for_the_same_seeds(pipe):
    from safetensors.torch import load_file

    reference = load_file(FIXTURES / "released_path_pixels.safetensors")
    generated = images(pipe, ["a red bus", "a cat"], num_images_per_prompt=2, token_guidance_scale=3.0,
                       guidance_scale=5.0, num_inference_steps=3)
    torch.testing.assert_close(generated, reference["generated"], atol=1e-5, rtol=0)
    photos = [Image.fromarray(photo) for photo in real_photos()[:2]]
    # the released path drew each image's initial latents from its own list entry as it was; the pipeline draws
    # them from a stream seeded by it (`row_generators`, so that `g` and `[g]` agree): the same latents, given
    latents = randn_tensor((2, pipe.unet.config.in_channels, 16 // pipe.vae_scale_factor, 24 // pipe.vae_scale_factor),
                           generator=[seeded(1), seeded(2)])
    reconstructed = pipe.reconstruct(photos, image_selection={"max_tokens": 4}, latents=latents, output_type="pt",
                                     height=16, width=24).images
    torch.testing.assert_close(reconstructed, reference["reconstructed"], atol=1e-5, rtol=0)


PROMPTS = ["a red bus", "a cat", "two dogs play in the park"]


@pytest.fixture
def sharp_pipe(lavit_processor, text_tokenizer):
    """The tiny pipeline with a language model whose weights are large enough that different prompts get different
    visual tokens (the fixtures' model gives every prompt the same ones, so a batch that mixed its rows up between
    prompts would pass a batch-vs-alone check with it)."""
    pipe = tiny_pipeline(lavit_processor, text_tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in pipe.language_model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0, 0.5)
    tokens = [pipe.language_model.generate_image_tokens(**pipe.encode_prompt(prompt), guidance_scale=1.0,
                                                        **TOKENS).code_ids.tolist() for prompt in PROMPTS]
    assert len({tuple(ids) for ids in tokens}) == len(PROMPTS), tokens  # the check below can fail
    return pipe


def test_batch_gives_each_prompt_what_it_gets_alone(sharp_pipe):
    batch = images(sharp_pipe, PROMPTS, num_images_per_prompt=2)
    assert batch.shape == (6, 3, 32, 32)
    for index, prompt in enumerate(PROMPTS):
        alone = images(sharp_pipe, prompt, num_images_per_prompt=2)
        torch.testing.assert_close(batch[2 * index : 2 * index + 2], alone, atol=1e-5, rtol=0)
    assert not torch.equal(batch[0], batch[1])  # the images of one prompt differ from each other
    assert not torch.equal(batch[0], batch[2])  # and from those of another prompt (other tokens)


def test_num_images_per_prompt_with_a_list_of_generators(sharp_pipe):
    prompts = PROMPTS[:2]
    batch = sharp_pipe(prompts, num_images_per_prompt=2, generator=[seeded(seed) for seed in range(4)],
                       output_type="pt", **TOKENS).images
    assert batch.shape == (4, 3, 32, 32)
    # image k is what its own generator gives its prompt alone, as a list of one and as one generator (diffusers)
    for k in range(4):
        for generator in ([seeded(k)], seeded(k)):
            alone = sharp_pipe(prompts[k // 2], generator=generator, output_type="pt", **TOKENS).images
            torch.testing.assert_close(batch[k : k + 1], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per image"):
        sharp_pipe(prompts, generator=[seeded(0)], **TOKENS)


def test_one_generator_and_a_list_of_it_give_one_image_the_same_pixels(sharp_pipe):
    """The attack's repro (#26 item 1): `generator=g(0)` and `generator=[g(0)]` gave different images."""
    for settings in ({}, {"do_sample": False}, {"token_guidance_scale": 1.0, "guidance_scale": 1.0}):
        one = images(sharp_pipe, **settings)
        listed = sharp_pipe("a red bus", generator=[seeded(0)], output_type="pt", **TOKENS, **settings).images
        torch.testing.assert_close(one, listed, atol=1e-6, rtol=0)
    reconstructed = [sharp_pipe.reconstruct(Image.fromarray(real_photos()[0]), generator=generator, output_type="pt",
                                            num_inference_steps=2).images for generator in (seeded(3), [seeded(3)])]
    torch.testing.assert_close(*reconstructed, atol=1e-6, rtol=0)


def test_dict_and_tuple_outputs_and_every_output_type_agree(pipe):
    output = pipe("a red bus", generator=seeded(0), output_type="pt", **TOKENS)
    assert isinstance(output, ImagePipelineOutput)
    as_tuple = pipe("a red bus", generator=seeded(0), output_type="pt", return_dict=False, **TOKENS)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(output.images, as_tuple[0], atol=0, rtol=0)
    as_numpy = pipe("a red bus", generator=seeded(0), output_type="np", **TOKENS).images
    assert as_numpy.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(as_numpy, output.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    as_pil = pipe("a red bus", generator=seeded(0), **TOKENS).images
    assert as_pil[0].size == (32, 32)
    assert np.abs(np.asarray(as_pil[0]).astype(int) - (as_numpy[0] * 255).round().astype(int)).max() <= 1
    latents = pipe("a red bus", generator=seeded(0), output_type="latent", **TOKENS).images
    assert latents.shape == (1, 4, 16, 16)
    torch.testing.assert_close(pipe.image_processor.postprocess(pipe.decode_latents(latents), output_type="pt"),
                               output.images, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a red bus", output_type="jpeg", **TOKENS)
    with pytest.raises(ValueError, match=f"a multiple of {pipe.size_multiple}"):
        pipe("a red bus", height=pipe.size_multiple + 1, **TOKENS)


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_save_load_round_trip_gives_equal_images_and_dtypes(pipe, tmp_path):
    expected = images(pipe, num_images_per_prompt=2)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_lavit", "LaVITPipeline"]
    assert index["language_model"] == ["modeling_lavit", "LaVITForCausalLM"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for name in ("language_model", "processor", "condition_encoder", "unet", "vae", "scheduler"):
        assert (tmp_path / "pipe" / name).is_dir(), name
    assert not (tmp_path / "pipe" / "language_model" / "detokenizer").exists()
    loaded = LaVITPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(loaded, num_images_per_prompt=2), expected, atol=1e-6, rtol=0)
    # the generic entry point gives this class too where lavit is importable
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    generic.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(generic, num_images_per_prompt=2), expected, atol=1e-6, rtol=0)
    half = LaVITPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    for name in ("language_model", "condition_encoder", "unet", "vae"):
        assert getattr(half, name).dtype == torch.bfloat16, name


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_to_and_model_offload_give_the_images_of_the_whole_pipeline(pipe, tmp_path):
    expected = images(pipe)
    assert pipe.to("cpu") is pipe
    torch.testing.assert_close(images(pipe), expected, atol=0, rtol=0)
    pipe.to(torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.language_model.dtype == torch.float64
    pipe.to(torch.float32)
    # model offload with the CPU as the execution device (the only one a CPU machine has): hooks installed on
    # every model of `model_cpu_offload_seq`, each run through them
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("language_model", "condition_encoder", "unet"))
    torch.testing.assert_close(images(pipe), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conditioning", ["highres", "lowres"])
def test_sequential_offload_gives_the_images_of_the_whole_pipeline(lavit_processor, text_tokenizer, conditioning):
    """Sequential CPU offload (accelerate hooks on every submodule: weights on the meta device between forwards) on
    the CPU, the only execution device a CPU machine has: the images of the pipeline kept whole, from prompts and in
    reconstruction; without a device, diffusers' own error on a machine without an accelerator."""
    torch.manual_seed(0)
    language_model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()
    torch.manual_seed(0)
    detokenizer = LaVITDetokenizer(tiny_detokenizer_config(conditioning)).eval()
    pipe = LaVITPipeline.from_detokenizer(language_model, lavit_processor, detokenizer)
    pipe.set_progress_bar_config(disable=True)
    photos = [Image.fromarray(photo) for photo in real_photos()[:2]]

    def drawn():
        reconstructed = pipe.reconstruct(photos, image_selection={"max_tokens": 4}, generator=seeded(1),
                                         output_type="pt").images
        return images(pipe, ["a red bus", "a cat"], guidance_scale=5.0), reconstructed

    expected = drawn()
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        with pytest.raises(RuntimeError, match="requires accelerator, but not found"):
            pipe.enable_sequential_cpu_offload()
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.unet.conv_in.weight.device.type == "meta"  # offloaded between forwards
    for got, want in zip(drawn(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_callbacks_see_edit_and_stop_the_denoising(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors), tensors["prompt_embeds"].shape[0]))
        return tensors

    pipe("a red bus", generator=seeded(0), num_inference_steps=3, output_type="latent",
         callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **TOKENS)
    assert seen == [(step, ["latents", "prompt_embeds"], 2) for step in range(3)]  # both guidance halves

    def zero_latents(pipeline, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    latents = pipe("a red bus", generator=seeded(0), num_inference_steps=3, output_type="latent",
                   callback_on_step_end=zero_latents, **TOKENS).images
    assert torch.equal(latents, torch.zeros_like(latents))

    steps = []

    def stop_after_two(pipeline, step, timestep, tensors):
        steps.append(step)
        pipeline._interrupt = step == 1
        return tensors

    stopped = pipe("a red bus", generator=seeded(0), num_inference_steps=4, output_type="latent",
                   callback_on_step_end=stop_after_two, **TOKENS).images
    assert steps == [0, 1]
    full = pipe("a red bus", generator=seeded(0), num_inference_steps=4, output_type="latent", **TOKENS).images
    assert not torch.allclose(stopped, full)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a red bus", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"], **TOKENS)


def test_progress_bar_can_be_turned_off(pipe):
    pipe.set_progress_bar_config(disable=False)
    shown = io.StringIO()
    with redirect_stderr(shown):
        pipe("a red bus", num_inference_steps=3, **TOKENS)
    assert "3/3" in shown.getvalue()
    pipe.set_progress_bar_config(disable=True)
    hidden = io.StringIO()
    with redirect_stderr(hidden):
        pipe("a red bus", num_inference_steps=3, **TOKENS)
    assert hidden.getvalue() == ""


def test_components_can_be_swapped_and_the_swap_is_saved(pipe, tmp_path):
    expected = images(pipe)
    rebuilt = LaVITPipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(rebuilt), expected, atol=0, rtol=0)
    pipe.save_pretrained(tmp_path / "pipe")
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    swapped = LaVITPipeline.from_pretrained(tmp_path / "pipe", scheduler=scheduler)
    assert swapped.scheduler is scheduler
    swapped.set_progress_bar_config(disable=True)
    with_dpm = images(swapped, num_inference_steps=3)
    assert with_dpm.shape == expected.shape and not torch.allclose(with_dpm, expected)
    swapped.save_pretrained(tmp_path / "swapped")
    reloaded = LaVITPipeline.from_pretrained(tmp_path / "swapped")
    assert type(reloaded.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_image_and_text_prompt_and_guidance_settings(pipe):
    photo = Image.fromarray(real_photos()[0])
    conditioned = images(pipe, "<image> the same, in red", image=[photo])
    assert conditioned.shape == (1, 3, 32, 32)
    torch.testing.assert_close(images(pipe, "<image> the same, in red", image=[photo]), conditioned, atol=0, rtol=0)
    # the two guidance scales are different knobs: the LM's changes the tokens, the decoder's only the denoising
    unguided_decoder = images(pipe, guidance_scale=1.0)
    assert not torch.allclose(unguided_decoder, images(pipe))
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a red bus", token_guidance_scale=0.5, **TOKENS)
    with pytest.raises(TypeError, match=r"LaVITPipeline.__call__\(\) got unexpected keyword argument\(s\) "
                                        r"'guidance_rescale' \(did you mean 'guidance_scale'\?\)"):
        pipe("a red bus", guidance_rescale=0.7, **TOKENS)


def test_float16_vae_is_upcast_to_decode_and_bfloat16_is_not(pipe):
    latents = torch.randn(1, 4, 16, 16, generator=seeded(3))
    expected = pipe.decode_latents(latents)
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    decoded = pipe.decode_latents(latents)
    assert pipe.vae.dtype == torch.float16 and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, expected, atol=5e-3, rtol=0)  # float16-rounded weights, float32 math
    pipe.vae.register_to_config(force_upcast=False)
    assert pipe.decode_latents(latents).dtype == torch.float16
    pipe.vae.to(torch.bfloat16)
    assert pipe.decode_latents(latents).dtype == torch.bfloat16


@pytest.mark.slow
def test_pipeline_folder_loads_where_lavit_cannot_be_imported(pipe, tmp_path):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    expected = images(pipe, ["a red bus", "a cat"])
    script = BLOCK_LAVIT + textwrap.dedent(f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "LaVITPipeline", type(pipe)
        assert type(pipe.language_model).__name__ == "LaVITForCausalLM"
        images = pipe(["a red bus", "a cat"], generator=torch.Generator().manual_seed(0), output_type="pt",
                      max_new_tokens=6, min_new_tokens=2).images
        torch.save(images, {str(tmp_path / "images.pt")!r})
        pipe.save_pretrained({str(tmp_path / "again")!r})
        type(pipe).from_pretrained({str(tmp_path / "again")!r}, trust_remote_code=True)
        assert not any(name == "lavit" or name.startswith("lavit.") for name in sys.modules)
    """)
    environment = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "HF_HUB_OFFLINE": "1",
                   "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # the child runs one thread: another summation order than this process, so float32 rounding, not more
    torch.testing.assert_close(torch.load(tmp_path / "images.pt", weights_only=True), expected, atol=1e-5, rtol=0)


def test_released_folders_load_and_convert_with_one_command(pipe, lavit_processor, text_tokenizer, tmp_path):
    """A folder of lavit <= 0.x: the language model's folder, its processor, the whole decoder in `detokenizer/`."""
    torch.manual_seed(0)
    language_model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()
    torch.manual_seed(0)
    detokenizer = LaVITDetokenizer(tiny_detokenizer_config()).eval()
    released = tmp_path / "released"
    language_model.save_pretrained(released)
    lavit_processor.save_pretrained(released)
    detokenizer.save_pretrained(released / "detokenizer")
    expected = images(pipe, ["a red bus", "a cat"])
    loaded = LaVITPipeline.from_pretrained(released)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(loaded, ["a red bus", "a cat"]), expected, atol=1e-6, rtol=0)
    # the documented conversion: load, then save in the pipeline's layout
    LaVITPipeline.from_pretrained(released).save_pretrained(tmp_path / "converted")
    converted = LaVITPipeline.from_pretrained(tmp_path / "converted")
    converted.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(converted, ["a red bus", "a cat"]), expected, atol=1e-6, rtol=0)
    # #26 item 6: in place, each refusal named the other folder as the fix (a loop); now both name a new folder
    # outside the released one, and nothing is written
    from lavit.modeling.saving_lavit import SourceFolderError

    before = sorted(str(path) for path in released.rglob("*"))
    for destination in (released, released / "detokenizer"):
        with pytest.raises(SourceFolderError, match=f"cannot be saved in place: save into a new folder outside "
                                                    f"{released.resolve()}$"):
            loaded.save_pretrained(destination)
    assert sorted(str(path) for path in released.rglob("*")) == before


def test_any_to_any_sequences_decode_through_the_pipeline(pipe, lavit_processor):
    """`generate(generation_mode="image")` (the `any-to-any` pipeline's image mode) returns tokens; the pipeline draws
    them."""
    from lavit.modeling.pipeline_lavit import image_tokens_from_sequences

    model = pipe.language_model
    assert not hasattr(model, "detokenizer") and not hasattr(model, "generate_images")
    inputs = lavit_processor(text="a red bus")
    sequences = model.generate(**inputs, generation_mode="image", max_new_tokens=5, min_new_tokens=5,
                               generator=seeded(1), num_images_per_prompt=2)
    config = model.config
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"].repeat(2, 1))
    assert (sequences[:, prompt_length] == config.image_start_token_id).all()
    assert (sequences[:, -1] == config.image_end_token_id).all()
    tokens = image_tokens_from_sequences(sequences, config)
    codes = sequences[:, prompt_length + 1 : -1] - config.visual_token_offset
    assert torch.equal(tokens.code_ids, codes.flatten()) and tokens.token_counts.tolist() == [5, 5]
    drawn = pipe.decode_visual_tokens(tokens, generator=seeded(2), output_type="pt").images
    direct = pipe(prompt="a red bus", generator=seeded(1), num_images_per_prompt=2, max_new_tokens=5,
                  min_new_tokens=5, output_type="pt").images
    assert drawn.shape == direct.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[IMG\]"):
        image_tokens_from_sequences(inputs["input_ids"], config)


def test_the_pipeline_imports_every_model_file_directly():
    """diffusers copies into its module cache only the files a remote-code module imports directly: a model file the
    pipeline reaches only through another one is missing from a folder loaded with `trust_remote_code` (this broke
    once when a new sibling module was added). Every file of `modeling_lavit/` but the converter is imported here."""
    import ast

    import lavit.modeling

    folder = Path(lavit.modeling.__file__).parent
    tree = ast.parse((folder / "pipeline_lavit.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    shipped = {path.stem for path in folder.glob("*.py")} - {"__init__", "pipeline_lavit", "convert_original_lavit"}
    assert shipped <= imported, f"pipeline_lavit.py must import {sorted(shipped - imported)} directly"


def test_a_decoder_alone_and_detokenizer_folders_load_and_take_a_language_model(pipe, tmp_path):
    """A pipeline without its language model (what `lavit train-detokenizer` writes when it has none) saves and loads
    with both loaders and draws given visual tokens; `from_pretrained(folder, language_model=..., processor=...)`
    completes it, and also reads a `LaVITDetokenizer` folder (what that command wrote in lavit <= 0.x)."""
    from lavit.modeling.modeling_lavit_tokenizer import LaVITTokenizationOutput

    tokens = LaVITTokenizationOutput(code_ids=torch.tensor([1, 2, 3, 4, 5]), token_counts=torch.tensor([2, 3]))
    expected = pipe.decode_visual_tokens(tokens, generator=seeded(0), output_type="pt").images
    whole = images(pipe)
    decoder = LaVITPipeline(**{**pipe.components, "language_model": None, "processor": None})
    decoder.save_pretrained(tmp_path / "decoder")
    index = json.loads((tmp_path / "decoder" / "model_index.json").read_text())
    assert index["language_model"] == index["processor"] == [None, None]
    for loaded in (LaVITPipeline.from_pretrained(tmp_path / "decoder"),
                   DiffusionPipeline.from_pretrained(tmp_path / "decoder", trust_remote_code=True)):
        assert loaded.language_model is None
        loaded.set_progress_bar_config(disable=True)
        drawn = loaded.decode_visual_tokens(tokens, generator=seeded(0), output_type="pt").images
        torch.testing.assert_close(drawn, expected, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="needs the pipeline's language_model and processor"):
            loaded("a red bus")
    from lavit.hub_cards import export_model

    with pytest.raises(ValueError, match="a pixel decoder without a language model"):
        export_model(tmp_path / "decoder", tmp_path / "export")
    given = dict(language_model=pipe.language_model, processor=pipe.processor)
    completed = LaVITPipeline.from_pretrained(tmp_path / "decoder", **given)
    completed.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(completed), whole, atol=1e-6, rtol=0)
    # a detokenizer folder of lavit <= 0.x: the same decoder (same seed), converted by one load + save
    torch.manual_seed(0)
    LaVITDetokenizer(tiny_detokenizer_config()).save_pretrained(tmp_path / "detokenizer")
    LaVITPipeline.from_pretrained(tmp_path / "detokenizer", **given).save_pretrained(tmp_path / "converted")
    for folder in ("detokenizer", "converted"):
        loaded = LaVITPipeline.from_pretrained(tmp_path / folder, **given)
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(images(loaded), whole, atol=1e-6, rtol=0)


# one bad value for every argument of `LaVITPipeline.__call__` (the test below fails when an argument is added
# without its check): each must be refused where it enters, in one line naming it
BAD_ARGUMENTS = {
    "prompt": 5, "negative_prompt": 5, "image": 5, "num_images_per_prompt": "2",
    "token_guidance_scale": float("nan"), "guidance_scale": -1.0, "num_inference_steps": "2", "generator": 0,
    "latents": [torch.zeros(1, 4, 16, 16)], "height": "32", "width": 32.5, "output_type": "PIL", "return_dict": "yes",
    "callback_on_step_end": "nope", "callback_on_step_end_tensor_inputs": ["nope"],
    "token_generation_config": {"do_sample": False}, "token_generation_kwargs": {"temperature": float("nan")},
}


def test_every_argument_of_call_is_checked_where_it_enters(pipe):
    """#26 items 7-8: `token_guidance_scale=nan` said "guidance_scale must be..." (the decoder's knob);
    `num_images_per_prompt="2"` gave a TypeError, `latents=[tensor]` an AttributeError."""
    import inspect

    from lavit.modeling.pipeline_lavit import CALL_ARGUMENTS

    parameters = [name for name in inspect.signature(LaVITPipeline.__call__).parameters if name != "self"]
    assert set(parameters) == set(BAD_ARGUMENTS) == set(CALL_ARGUMENTS)
    for name, bad in BAD_ARGUMENTS.items():
        kwargs = {"prompt": "a red bus", **TOKENS}
        if name == "token_generation_kwargs":
            kwargs.update(bad)
            name = "temperature"
        else:
            kwargs[name] = bad
        with pytest.raises(ValueError) as error:
            pipe(**kwargs)
        message = str(error.value)
        assert message.startswith(name) and "\n" not in message, (name, message)
    for negative_prompt in (["a", "b"], ""):  # two for one prompt; empty
        with pytest.raises(ValueError, match="^negative_prompt "):
            pipe("a red bus", negative_prompt=negative_prompt, **TOKENS)
    # the decoder alone takes the same arguments, checked alike
    tokens = pipe.language_model.generate_image_tokens(**pipe.encode_prompt("a red bus"), **TOKENS)
    with pytest.raises(ValueError, match="^num_images_per_prompt must be"):
        pipe.decode_visual_tokens(tokens, num_images_per_prompt="2")


def test_a_scheduler_the_pipeline_cannot_run_is_refused_by_name(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    for scheduler in (FlowMatchEulerDiscreteScheduler(), "nope"):  # refused where it enters: the assignment
        with pytest.raises(ValueError, match=f"^pipe.scheduler must be .* got {type(scheduler).__name__}$"):
            pipe.scheduler = scheduler
    assert images(pipe, num_inference_steps=2).shape == (1, 3, 32, 32)  # the pipeline kept its own


def test_callbacks_must_return_a_dict_keeping_the_latents_shape(pipe):
    """#26 items 8-9: a callback returning None gave AttributeError 'pop'; latents of shape (1, 4, 8, 8) gave a
    16x16 image instead of 32x32."""
    returns = {"None": lambda *_: None, "smaller latents": lambda *_: {"latents": torch.zeros(1, 4, 8, 8)},
               "NaN latents": lambda *_: {"latents": torch.full((1, 4, 16, 16), float("nan"))}}
    for callback in returns.values():
        with pytest.raises(ValueError, match="^callback_on_step_end (must return a dict|returned latents)"):
            images(pipe, callback_on_step_end=callback, num_inference_steps=2)
    assert images(pipe, callback_on_step_end=lambda p, s, t, tensors: tensors, num_inference_steps=2).shape == (
        1, 3, 32, 32)


def test_nan_latents_are_refused_and_nan_images_warned_about(pipe, caplog):
    """#26 item 9: NaN latents gave an all-black image with only numpy's RuntimeWarning. Given latents must be finite
    (an error); decoded images that hold NaN (a float16 overflow, weights with NaN) are returned with one warning
    (docs/pipeline.md)."""
    with pytest.raises(ValueError, match="^latents must be .* finite"):
        images(pipe, latents=torch.full((1, 4, 16, 16), float("nan")))
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with caplog.at_level("WARNING", logger="lavit.modeling.pipeline_lavit"):
        drawn = images(pipe, num_inference_steps=2)
    assert torch.isnan(drawn).all()
    assert [record.message for record in caplog.records if "NaN" in record.message][0].startswith(
        "1 of 1 decoded images hold NaN")


def test_a_swapped_vae_brings_its_own_scale_factor(pipe):
    """#26 item 9: a VAE of another scale factor gave 16x16 images for 32x32 (the factor was read at __init__)."""
    from diffusers import AutoencoderKL

    config = dict(pipe.vae.config)
    config["block_out_channels"] = list(config["block_out_channels"])[:-1]
    config["down_block_types"] = list(config["down_block_types"])[:-1]
    config["up_block_types"] = list(config["up_block_types"])[:-1]
    pipe.vae = AutoencoderKL.from_config(config)
    assert pipe.vae_scale_factor == 2 ** (len(config["block_out_channels"]) - 1)
    assert images(pipe, num_inference_steps=2).shape == (1, 3, 32, 32)


# the public methods of lavit's classes that pass keyword arguments on (`**kwargs`) and how each is called here; the
# Hub plumbing (`from_pretrained`, `save_pretrained`, ...) passes them to transformers/diffusers, which check them
PASSES_KEYWORDS_ON = {
    (LaVITPipeline, "__call__"): lambda pipe, photo, typo: pipe("a red bus", **TOKENS, **typo),
    (LaVITPipeline, "reconstruct"): lambda pipe, photo, typo: pipe.reconstruct(photo, **typo),
    ("LaVITForCausalLM", "generate_image_tokens"): lambda pipe, photo, typo: pipe.language_model.generate_image_tokens(
        **pipe.processor(text="a red bus"), **typo),
}
# `forward` passes on transformers' attention/loss keywords, whatever they are: it refuses only the names a letter or
# two away from its own (and `LaVITModel.forward`'s) parameters, which the language model would drop in silence
# (`validation_lavit.refuse_typos`)
REFUSES_TYPOS = {
    ("LaVITForCausalLM", "forward"): lambda pipe, photo, typo: pipe.language_model(
        **pipe.processor(images=photo, text="<image> a cat", return_tensors="pt"), **typo),
}
# methods whose keywords transformers owns: `generate` refuses unknown ones itself ("model_kwargs are not used by the
# model ... typos"), `prepare_inputs_for_generation` takes what `generate` passes, and `from_components` passes config
# keywords to `LaVITConfig` (a `PretrainedConfig`, which takes any name)
CHECKED_BY_TRANSFORMERS = {("LaVITForCausalLM", "generate"), ("LaVITForCausalLM", "prepare_inputs_for_generation"),
                           ("LaVITForCausalLM", "from_components")}
HUB_PLUMBING = {"from_pretrained", "save_pretrained", "load_config", "get_config_dict", "from_dict", "from_config",
                "resize_token_embeddings", "push_to_hub", "register_to_config", "to", "enable_model_cpu_offload",
                "enable_sequential_cpu_offload", "set_progress_bar_config", "progress_bar", "register_modules",
                "__init__", "download"}


def forwarding_methods():
    """(class name, method name) of every public method defined by lavit on its pipeline and its causal LM that takes
    `**kwargs` (found from the classes)."""
    from lavit import LaVITForCausalLM

    for cls in (LaVITPipeline, LaVITForCausalLM):
        for klass in cls.__mro__:
            if not klass.__module__.startswith("lavit"):
                continue
            for name, function in vars(klass).items():
                function = getattr(function, "__func__", function)
                if not callable(function) or name in HUB_PLUMBING or (name.startswith("_") and name != "__call__"):
                    continue
                parameters = inspect.signature(function).parameters.values()
                if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
                    yield (cls if cls is LaVITPipeline else cls.__name__), name


def test_a_mistyped_keyword_names_the_method_called_and_the_one_meant(pipe):
    """#24 §8: `pipe.reconstruct(image_selecton=...)` was refused by `decode_visual_tokens`, a method the user never
    called. Every method that passes keywords on checks them itself (`validation_lavit.check_keywords`)."""
    assert set(forwarding_methods()) == set(PASSES_KEYWORDS_ON) | set(REFUSES_TYPOS) | CHECKED_BY_TRANSFORMERS
    photo = Image.fromarray(real_photos()[0])
    for (owner, name), call in PASSES_KEYWORDS_ON.items():
        meant = "image_selection" if name == "reconstruct" else "guidance_scale"
        with pytest.raises(TypeError) as error:
            call(pipe, photo, {meant[:-3] + meant[-2] + meant[-3] + meant[-1]: 1})
        message = str(error.value)
        owner_name = owner if isinstance(owner, str) else owner.__name__
        assert message.startswith(f"{owner_name}.{name}() got unexpected keyword"), message
        assert f"(did you mean {meant!r}?)" in message and "decode_visual_tokens" not in message, message


def test_forward_refuses_a_mistyped_parameter_and_passes_transformers_keywords_on(pipe):
    """#24 §8: `model(**inputs, imge_selection=...)` ran with the default selection (the language model dropped the
    name). A name near one of LaVIT's parameters is refused with the one meant; transformers' keywords still pass."""
    photo = Image.fromarray(real_photos()[0])
    for (owner, name), call in REFUSES_TYPOS.items():
        for typo, meant in (("imge_selection", "image_selection"), ("pixel_value", "pixel_values"),
                            ("image_patch_feature", "image_patch_features"), ("loss_modality", "loss_modalities")):
            with pytest.raises(TypeError) as error:
                call(pipe, photo, {typo: None})
            assert str(error.value).startswith(f"{owner}.{name}() got unexpected keyword argument(s) {typo!r} "
                                               f"(did you mean {meant!r}?)"), str(error.value)
        outputs = call(pipe, photo, {"output_hidden_states": True, "output_attentions": False, "return_dict": True})
        assert outputs.hidden_states is not None


def test_auto_model_of_a_pipelines_condition_encoder_folder_is_the_condition_encoder(pipeline_folder):
    """atk38/39: its config class is the detokenizer's, which `AutoModel` maps to `LaVITDetokenizer`: the folder came
    back as a whole decoder with a random UNet and VAE (said only in the load report). It loads as itself."""
    from transformers import AutoModel

    from lavit import LaVITConditionEncoder, LaVITDetokenizer, LaVITPipeline

    loaded = AutoModel.from_pretrained(pipeline_folder / "condition_encoder")
    assert type(loaded) is LaVITConditionEncoder
    reference = LaVITPipeline.from_pretrained(pipeline_folder).condition_encoder
    assert all(torch.equal(value, reference.state_dict()[name]) for name, value in loaded.state_dict().items())
    assert type(LaVITDetokenizer.from_pretrained(pipeline_folder / "condition_encoder")) is LaVITConditionEncoder
