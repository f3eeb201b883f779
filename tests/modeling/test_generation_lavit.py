"""Text generation with images (cache, padding, beams, few-shot) and image-token generation with batched CFG."""

import pytest
import torch
from conftest import real_photos


def caption_batch(processor):
    photos = real_photos()
    texts = ["<image>a photo of", "question: what is <image> answer:",
             "<image>a cat.<image>two dogs.<image>"]  # few-shot: two examples, then the query image
    return processor(images=[photos[0], photos[3], photos[1], photos[2], photos[4]], text=texts, padding_side="left")


def new_tokens(output, batch):
    return output[:, batch["input_ids"].shape[1]:]


def test_greedy_with_cache_equals_without_cache(lavit_model, lavit_processor):
    batch = caption_batch(lavit_processor)
    cached = lavit_model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = lavit_model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_batched_generation_equals_one_prompt_at_a_time(lavit_model, lavit_processor):
    photos = real_photos()
    texts = ["<image>a photo of", "question: what is in the picture <image> answer:"]
    images = [photos[0], photos[3]]
    batch = lavit_processor(images=images, text=texts, padding_side="left")
    batched = new_tokens(lavit_model.generate(**batch, max_new_tokens=5, do_sample=False), batch)
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        single = lavit_processor(images=[image], text=text)
        alone = new_tokens(lavit_model.generate(**single, max_new_tokens=5, do_sample=False), single)
        assert torch.equal(alone[0], batched[row]), row


def test_text_mode_never_emits_image_ids_and_supports_beams_and_sampling(lavit_model, lavit_processor):
    batch = caption_batch(lavit_processor)
    # bias the head towards visual ids: they must still be suppressed in text mode
    with torch.no_grad():
        lavit_model.lm_head.weight[lavit_model.config.text_vocab_size :] *= 50
    beams = lavit_model.generate(**batch, num_beams=3, length_penalty=0.0, max_new_tokens=6, min_new_tokens=2,
                                 do_sample=False, num_return_sequences=2)
    assert beams.shape[0] == 2 * batch["input_ids"].shape[0]
    assert int(new_tokens(beams, batch).max()) < lavit_model.config.text_vocab_size
    torch.manual_seed(0)
    first = lavit_model.generate(**batch, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=6)
    torch.manual_seed(0)
    second = lavit_model.generate(**batch, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=6)
    assert torch.equal(first, second)
    assert int(new_tokens(first, batch).max()) < lavit_model.config.text_vocab_size
    text = lavit_processor.batch_decode(new_tokens(first, batch), skip_special_tokens=True)
    assert len(text) == 3 and all(isinstance(item, str) for item in text)


def test_image_token_generation_respects_lengths_and_vocabulary(lavit_model, lavit_processor):
    prompts = lavit_processor(text=["a red bus", "an astronaut in a suit"], padding_side="left")
    generator = torch.Generator().manual_seed(0)
    tokens = lavit_model.generate_image_tokens(**prompts, min_new_tokens=3, max_new_tokens=9, generator=generator,
                                               num_images_per_prompt=2)
    codebook_size = lavit_model.config.tokenizer_config.codebook_size
    assert tokens.token_counts.shape == (4,)
    assert bool((tokens.token_counts >= 3).all()) and bool((tokens.token_counts <= 9).all())
    assert int(tokens.token_counts.sum()) == tokens.code_ids.numel()
    assert 0 <= int(tokens.code_ids.min()) and int(tokens.code_ids.max()) < codebook_size
    again = lavit_model.generate_image_tokens(**prompts, min_new_tokens=3, max_new_tokens=9,
                                              generator=torch.Generator().manual_seed(0), num_images_per_prompt=2)
    assert torch.equal(again.code_ids, tokens.code_ids)
    # the generated tokens are in the tokenizer's packed form: the feature decoder reads them directly
    features = lavit_model.visual_tokenizer.decode_codes(tokens.code_ids, tokens.token_counts)
    assert features.shape[:2] == (4, lavit_model.config.tokenizer_config.num_patches)


def reference_guided_greedy(model, prompt_ids, guidance_scale, steps):
    """Unbatched reference: conditional and unconditional prompts decoded separately, without any cache."""
    config = model.config
    start = torch.tensor([config.image_start_token_id])
    conditional, unconditional = torch.cat([prompt_ids, start]), start.clone()
    codes = []
    for _ in range(steps):
        scores = []
        for sequence in (conditional, unconditional):
            logits = model(input_ids=sequence[None]).logits[0, -1]
            scores.append(logits[config.image_end_token_id : config.visual_token_end].log_softmax(dim=-1))
        guided = scores[1] + guidance_scale * (scores[0] - scores[1])
        guided[0] = -float("inf")  # min_new_tokens = steps: [/IMG] not allowed yet
        token = int(guided.argmax())
        codes.append(token - 1)
        next_id = torch.tensor([token + config.image_end_token_id])
        conditional, unconditional = torch.cat([conditional, next_id]), torch.cat([unconditional, next_id])
    return codes


def test_batched_cfg_equals_two_separate_passes(lavit_model, lavit_processor):
    prompt = lavit_processor(text="a photo of a cat")
    tokens = lavit_model.generate_image_tokens(**prompt, guidance_scale=3.0, do_sample=False,
                                               min_new_tokens=6, max_new_tokens=6)
    expected = reference_guided_greedy(lavit_model, prompt["input_ids"][0], 3.0, 6)
    assert tokens.code_ids.tolist() == expected
    unguided = lavit_model.generate_image_tokens(**prompt, guidance_scale=1.0, do_sample=False,
                                                 min_new_tokens=6, max_new_tokens=6)
    assert unguided.code_ids.tolist() != expected  # guidance changes the result


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_static_cache_gives_the_tokens_of_the_dynamic_cache(lavit_model, lavit_processor):
    prompts = lavit_processor(text=["a photo of a cat", "a red bus on the street"], padding=True)
    for settings in (dict(do_sample=False, guidance_scale=3.0), dict(do_sample=True, guidance_scale=4.0, top_k=8)):
        tokens = {
            implementation: lavit_model.generate_image_tokens(
                **prompts, cache_implementation=implementation, min_new_tokens=2, max_new_tokens=7,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **settings,
            )
            for implementation in ("dynamic", "static")
        }
        assert tokens["static"].code_ids.tolist() == tokens["dynamic"].code_ids.tolist()
        assert tokens["static"].token_counts.tolist() == tokens["dynamic"].token_counts.tolist()
    with pytest.raises(ValueError, match="cache_implementation"):
        lavit_model.generate_image_tokens(**prompts, cache_implementation="paged")
    # the compiled decoding step (inductor on the CPU here; about 25 s to compile) keeps the tokens too
    settings = dict(do_sample=False, guidance_scale=3.0, min_new_tokens=2, max_new_tokens=7)
    compiled = lavit_model.generate_image_tokens(**prompts, cache_implementation="static", compile_decoding=True,
                                                 **settings)
    assert compiled.code_ids.tolist() == lavit_model.generate_image_tokens(**prompts, **settings).code_ids.tolist()


def test_multimodal_prompt_with_image_as_discrete_ids(lavit_model, lavit_processor):
    photos = real_photos()
    prompt = lavit_processor(images=[photos[1]], text="<image>the same cat, but red")
    config = lavit_model.config
    conditional, _ = lavit_model._image_generation_prompt(prompt["input_ids"], prompt["attention_mask"],
                                                          prompt["pixel_values"])
    codes = lavit_model.visual_tokenizer.tokenize(prompt["pixel_values"]).code_ids
    code_embeddings = lavit_model.get_input_embeddings()(codes + config.visual_token_offset)
    start = 1 + int((prompt["input_ids"][0] == config.image_start_token_id).nonzero()[0])
    assert torch.equal(conditional[0, start : start + codes.numel()], code_embeddings)
    tokens = lavit_model.generate_image_tokens(**prompt, min_new_tokens=2, max_new_tokens=5,
                                               generator=torch.Generator().manual_seed(1))
    assert tokens.token_counts.shape == (1,)


def test_image_generation_bad_inputs(lavit_model, lavit_processor):
    prompt = lavit_processor(text="a cat")
    limit = lavit_model.config.tokenizer_config.num_patches
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        lavit_model.generate_image_tokens(**prompt, max_new_tokens=limit + 1)
    with pytest.raises(ValueError, match="min_new_tokens"):
        lavit_model.generate_image_tokens(**prompt, min_new_tokens=8, max_new_tokens=4)
    empty = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="empty prompt"):
        lavit_model.generate_image_tokens(empty, attention_mask=torch.zeros_like(empty))
    with pytest.raises(ValueError, match="is empty"):
        lavit_processor(text="")


def test_image_generation_config_is_the_keyword_arguments(lavit_model, lavit_processor):
    from lavit.modeling.generation_lavit import LaVITImageGenerationConfig

    prompts = lavit_processor(text=["a photo of a cat", "a red bus"], padding=True)
    settings = dict(guidance_scale=3.0, top_k=8, min_new_tokens=2, max_new_tokens=7, num_images_per_prompt=2)
    by_keywords = lavit_model.generate_image_tokens(**prompts, generator=torch.Generator().manual_seed(0), **settings)
    by_config = lavit_model.generate_image_tokens(**prompts, generator=torch.Generator().manual_seed(0),
                                                  generation_config=LaVITImageGenerationConfig(**settings))
    assert by_config.code_ids.tolist() == by_keywords.code_ids.tolist()
    assert by_config.token_counts.tolist() == by_keywords.token_counts.tolist()
    # keyword arguments win over the config's fields
    config = LaVITImageGenerationConfig(do_sample=False, min_new_tokens=4, max_new_tokens=4)
    overridden = lavit_model.generate_image_tokens(**prompts, generation_config=config, max_new_tokens=2,
                                                   min_new_tokens=2)
    assert overridden.token_counts.tolist() == [2, 2]
    assert config.max_new_tokens == 4  # the given config is not changed


def test_image_generation_config_from_another_copy_of_the_code_is_taken_by_name(lavit_model, lavit_processor,
                                                                               lavit_folder):
    """A model loaded with trust_remote_code runs its folder's copy of generation_lavit.py, whose config class is
    another object than `lavit.LaVITImageGenerationConfig`: either config gives the tokens of the same keywords."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder_config_class = get_class_from_dynamic_module("generation_lavit.LaVITImageGenerationConfig", lavit_folder)
    assert folder_config_class.__module__ != "lavit.modeling.generation_lavit"  # the folder's copy
    prompt = lavit_processor(text=["a photo of a cat", "a red bus"], padding=True)
    settings = dict(guidance_scale=2.0, top_k=8, min_new_tokens=2, max_new_tokens=5)
    by_config = lavit_model.generate_image_tokens(**prompt, generator=torch.Generator().manual_seed(0),
                                                  generation_config=folder_config_class(**settings))
    by_keywords = lavit_model.generate_image_tokens(**prompt, generator=torch.Generator().manual_seed(0), **settings)
    assert by_config.code_ids.tolist() == by_keywords.code_ids.tolist()
    assert by_config.token_counts.tolist() == by_keywords.token_counts.tolist()


def test_unknown_image_generation_arguments_raise(lavit_model, lavit_processor):
    from lavit.modeling.generation_lavit import LaVITImageGenerationConfig

    prompt = lavit_processor(text="a cat")
    with pytest.raises(TypeError, match=r"LaVITForCausalLM.generate_image_tokens\(\) got unexpected keyword "
                                        r"argument\(s\) 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        lavit_model.generate_image_tokens(**prompt, max_new_token=3)
    with pytest.raises(TypeError, match="num_beams"):
        lavit_model.generate_image_tokens(**prompt, num_beams=2)
    with pytest.raises(TypeError, match=r"must be a LaVITImageGenerationConfig, got transformers\..*GenerationConfig"):
        lavit_model.generate_image_tokens(**prompt, generation_config=lavit_model.generation_config)
    with pytest.raises(TypeError, match="num_beams"):
        LaVITImageGenerationConfig(num_beams=2)
    with pytest.raises(ValueError,
                       match=r"cache_implementation must be one of \['dynamic', 'static'\] or None, got 'paged'"):
        LaVITImageGenerationConfig(cache_implementation="paged")
    with pytest.raises(ValueError, match="image_inputs must be one of"):
        LaVITImageGenerationConfig(image_inputs="pixels")
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1, got 0"):
        LaVITImageGenerationConfig(num_images_per_prompt=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, or None, got 0"):
        LaVITImageGenerationConfig(max_new_tokens=0)
    assert LaVITImageGenerationConfig().token_limits(16) == (16, 16)
    assert LaVITImageGenerationConfig().token_limits(256) == (20, 256)


def test_modeling_files_import_upwards_only():
    """The converter sits on top (no model file imports it); image generation does not import the model file."""
    import ast
    from pathlib import Path

    import lavit.modeling

    folder = Path(lavit.modeling.__file__).parent

    def sibling_imports(name):
        tree = ast.parse((folder / name).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert "convert_original_lavit" not in sibling_imports("modeling_lavit.py")
    assert "modeling_lavit" not in sibling_imports("generation_lavit.py")
    assert sibling_imports("image_placeholders_lavit.py") == {"configuration_lavit"}
