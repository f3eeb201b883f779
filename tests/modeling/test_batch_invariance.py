"""A row's result never depends on its neighbours or on the padding side: every generation path, batched versus alone,
with images of different token counts (fixed by `image_keep_mask`) and text-only rows in the same batch."""

import pytest
import torch
from conftest import real_photos

# (text, images): two images keeping 5 and 12 of their 16 patches, and a text-only row between them
ROWS = [
    ("<image>a photo of", [0]),
    ("a red bus on the street", []),
    ("<image>question: what is in the picture? answer:", [3]),
]
KEPT_PATCHES = {0: 5, 3: 12}


def keep_mask(photo_indices, num_patches):
    masks = torch.zeros(len(photo_indices), num_patches, dtype=torch.bool)
    for row, index in enumerate(photo_indices):
        order = torch.randperm(num_patches, generator=torch.Generator().manual_seed(index))
        masks[row, order[: KEPT_PATCHES[index]]] = True
    return masks


def encode(processor, model, rows, padding_side):
    photos = real_photos()
    indices = [index for _, images in rows for index in images]
    inputs = processor(images=[photos[index] for index in indices] or None, text=[text for text, _ in rows],
                       padding_side=padding_side)
    if indices:
        inputs["image_keep_mask"] = keep_mask(indices, model.config.tokenizer_config.num_patches)
    return inputs


def new_tokens(output, inputs):
    return output[:, inputs["input_ids"].shape[1]:]


def strip_pads(ids, pad_token_id):
    ids = ids.tolist()
    while ids and ids[-1] == pad_token_id:
        ids.pop()
    return ids


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("settings", [
    dict(do_sample=False, max_new_tokens=4),
    dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=4, length_penalty=0.0),
    # processors that read each row's history (atk37: the penalty skipped a batched image row's first new tokens)
    dict(do_sample=False, max_new_tokens=12, repetition_penalty=3.0),
    dict(do_sample=False, num_beams=2, max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2),
], ids=["greedy", "beams", "repetition-penalty", "beams-penalty-ngrams"])
def test_text_generation_gives_each_row_what_it_gives_alone(lavit_model, lavit_processor, padding_side, settings):
    batch = encode(lavit_processor, lavit_model, ROWS, padding_side)
    batched = new_tokens(lavit_model.generate(**batch, **settings), batch)
    per_prompt = settings.get("num_return_sequences", 1)
    pad = lavit_model.generation_config.pad_token_id
    for row, single_row in enumerate(ROWS):
        single = encode(lavit_processor, lavit_model, [single_row], padding_side)
        alone = new_tokens(lavit_model.generate(**single, **settings), single)
        for sequence in range(per_prompt):
            assert strip_pads(batched[row * per_prompt + sequence], pad) == strip_pads(alone[sequence], pad), row


def test_right_padding_no_longer_predicts_from_a_pad(lavit_model, lavit_processor):
    """The issue's example: two photos, right padding (the tokenizer's default), greedy, 4 new tokens."""
    photos = real_photos()
    texts = ["<image>a photo of", "<image>question: what is in the picture? answer:"]
    outputs = {}
    for side in ("right", "left"):
        batch = lavit_processor(images=[photos[0], photos[1]], text=texts, padding_side=side)
        outputs[side] = new_tokens(lavit_model.generate(**batch, max_new_tokens=4, do_sample=False), batch)
    alone_inputs = lavit_processor(images=[photos[0]], text=texts[0])
    alone = new_tokens(lavit_model.generate(**alone_inputs, max_new_tokens=4, do_sample=False), alone_inputs)
    assert torch.equal(outputs["right"], outputs["left"])
    assert torch.equal(outputs["right"][0], alone[0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("settings", [
    dict(do_sample=False, guidance_scale=1.0),
    dict(do_sample=False, guidance_scale=3.0),
    dict(do_sample=True, guidance_scale=4.0, top_k=8, num_images_per_prompt=2),
], ids=["greedy", "guided", "seeded-sampling"])
def test_image_generation_gives_each_prompt_what_it_gives_alone(lavit_model, lavit_processor, padding_side,
                                                                settings):
    settings = dict(min_new_tokens=2, max_new_tokens=7, image_inputs="features", **settings)
    batch = encode(lavit_processor, lavit_model, ROWS, padding_side)
    batched = lavit_model.generate_image_tokens(**batch, generator=torch.Generator().manual_seed(0), **settings)
    per_prompt = settings.get("num_images_per_prompt", 1)
    batched_images = batched.per_image()
    assert len(batched_images) == per_prompt * len(ROWS)
    for row, single_row in enumerate(ROWS):
        single = encode(lavit_processor, lavit_model, [single_row], padding_side)
        alone = lavit_model.generate_image_tokens(**single, generator=torch.Generator().manual_seed(0), **settings)
        for index, image in enumerate(alone.per_image()):
            assert batched_images[row * per_prompt + index].tolist() == image.tolist(), (row, index)
    if per_prompt > 1:  # the images of one prompt still differ from each other
        assert batched_images[0].tolist() != batched_images[1].tolist()


def test_generate_image_tokens_streams_every_step(lavit_model, lavit_processor):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    prompt = lavit_processor(text="a red bus")
    recorder = Recorder()
    tokens = lavit_model.generate_image_tokens(**prompt, do_sample=False, min_new_tokens=3, max_new_tokens=5,
                                               streamer=recorder)
    config = lavit_model.config
    assert recorder.ended and recorder.chunks[0] == prompt["input_ids"].tolist()
    streamed = [chunk[0] for chunk in recorder.chunks[1:]]
    assert streamed[-1] == config.image_end_token_id
    assert [token - config.visual_token_offset for token in streamed[:-1]] == tokens.code_ids.tolist()


def test_pipelines_with_batch_size_give_each_input_what_it_gives_alone(lavit_model, lavit_processor, tmp_path):
    from PIL import Image
    from transformers import pipeline

    lavit_model.save_pretrained(tmp_path)
    lavit_processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    photos = [Image.fromarray(photo) for photo in real_photos()[:3]]
    prompts = ["<image>a photo of", "<image>question: what is in the picture? answer:", "<image>a"]
    settings = dict(generate_kwargs={"do_sample": False, "max_new_tokens": 4}, return_full_text=False)
    batched = pipe(images=photos, text=prompts, batch_size=3, **settings)
    for photo, prompt, result in zip(photos, prompts, batched, strict=True):
        assert result["generated_text"] == pipe(images=photo, text=prompt, **settings)[0]["generated_text"]

    text_to_image = pipeline("lavit-text-to-image", model=str(tmp_path), trust_remote_code=True)
    settings = dict(max_new_tokens=6, min_new_tokens=2, num_images_per_prompt=2)
    prompts = ["a red bus", "an astronaut in a suit on the moon"]
    batched = text_to_image(prompts, batch_size=2, generator=torch.Generator().manual_seed(0), **settings)
    for prompt, results in zip(prompts, batched, strict=True):
        assert results == text_to_image(prompt, generator=torch.Generator().manual_seed(0), **settings)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_seeded_text_sampling_gives_each_row_what_it_gives_alone(lavit_model, lavit_processor, padding_side):
    settings = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=5, num_return_sequences=2)
    batch = encode(lavit_processor, lavit_model, ROWS, padding_side)
    batched = new_tokens(lavit_model.generate(**batch, generator=torch.Generator().manual_seed(0), **settings), batch)
    pad = lavit_model.generation_config.pad_token_id
    for row, single_row in enumerate(ROWS):
        single = encode(lavit_processor, lavit_model, [single_row], padding_side)
        alone = new_tokens(lavit_model.generate(**single, generator=torch.Generator().manual_seed(0), **settings),
                           single)
        for sequence in range(2):
            assert strip_pads(batched[2 * row + sequence], pad) == strip_pads(alone[sequence], pad), row
    assert batched[0].tolist() != batched[1].tolist()  # the sequences of one prompt still differ
    vocabulary = lavit_model.config.text_vocab_size
    assert int(batched.max()) < vocabulary  # the image ids stay suppressed under the row sampler
    greedy_top = lavit_model.generate(**batch, generator=torch.Generator().manual_seed(0), do_sample=True, top_k=1,
                                      max_new_tokens=5)
    greedy = lavit_model.generate(**batch, do_sample=False, max_new_tokens=5)
    assert torch.equal(greedy_top, greedy)  # top_k=1 sampling is greedy: the warpers run before the draw


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_image_prompts_without_their_attention_mask_are_padded_as_transformers_infers_or_refused(
        lavit_model, lavit_processor, padding_side):
    """atk37 F3: a padded batch of image prompts given without `attention_mask` read its pads as prompt, silently
    (the text path infers the mask from the pad token, or warns). The mask is inferred as transformers infers it
    (`input_ids != pad_token_id`) and gives what the processor's mask gives; where the pad token is also the end of
    text (this tokenizer's), padding cannot be told from text and the call is refused."""
    rows = [ROWS[0], ROWS[2]]
    batch = encode(lavit_processor, lavit_model, rows, padding_side)
    settings = dict(do_sample=False, max_new_tokens=4)
    pad = lavit_model.generation_config.pad_token_id
    assert pad == lavit_model.generation_config.eos_token_id
    without_mask = {name: value for name, value in batch.items() if name != "attention_mask"}
    with pytest.raises(ValueError, match="needs its attention_mask to tell padding from text"):
        lavit_model.generate(**without_mask, **settings)
    other_end = dict(settings, eos_token_id=pad + 1)  # an end of text that is not the pad token: the mask is inferred
    assert torch.equal(lavit_model.generate(**without_mask, **other_end), lavit_model.generate(**batch, **other_end))


def test_settings_from_a_generation_config_object_or_the_models_defaults_are_read_as_transformers_merges_them(
        lavit_model, lavit_processor):
    """atk38: the repetition penalty and the pad token were read from a `GenerationConfig` object as given, not as
    transformers merges it with the model's defaults (None there takes the model's): a model default penalty came back
    with the left-pad offset, and a config without pad_token_id left an unmasked batch's pads in the prompt. A
    keyword lavit added beside the object also drew transformers' deprecation warning."""
    import warnings

    from transformers import GenerationConfig

    rows = [ROWS[0], ROWS[2]]
    batch = encode(lavit_processor, lavit_model, rows, "left")
    default = lavit_model.generation_config.repetition_penalty
    lavit_model.generation_config.repetition_penalty = 1.8  # the model's default, as a saved generation config sets it
    try:
        config = GenerationConfig(max_new_tokens=12, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.filterwarnings("error", message=".*generation_config.*together.*")
            batched = new_tokens(lavit_model.generate(**batch, generation_config=config), batch)
        for row, single_row in enumerate(rows):
            single = encode(lavit_processor, lavit_model, [single_row], "left")
            alone = new_tokens(lavit_model.generate(**single, generation_config=config), single)
            assert batched[row].tolist() == alone[0].tolist(), row
        unmasked = {name: value for name, value in batch.items() if name != "attention_mask"}
        pad = lavit_model.generation_config.pad_token_id  # the config object leaves it None: the model's is merged in
        other_end = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=pad + 1)
        assert torch.equal(lavit_model.generate(**unmasked, generation_config=other_end),
                           lavit_model.generate(**batch, generation_config=other_end))
    finally:
        lavit_model.generation_config.repetition_penalty = default


def test_seeded_sampling_reads_a_generation_config_object_as_transformers_merges_it(lavit_model, lavit_processor):
    """atk39: `generate(generator=..., generation_config=GenerationConfig(...))` read the sampling settings from the
    object alone: the model's `do_sample` and `temperature` were dropped (the generator ignored, the output changing
    with torch's global seed), and the keywords lavit set beside the object drew transformers' deprecation warning.
    The object's path gives what the same settings as keywords give, whatever the global seed."""
    import warnings

    from transformers import GenerationConfig

    batch = encode(lavit_processor, lavit_model, ROWS, "left")
    config = lavit_model.generation_config
    saved = config.do_sample, config.temperature
    config.do_sample, config.temperature = True, 0.7  # the model's defaults, left unset in the object below
    try:
        outputs = []
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*generation_config.*together.*")
                outputs.append(lavit_model.generate(**batch, generator=torch.Generator().manual_seed(0),
                                                    generation_config=GenerationConfig(max_new_tokens=6)))
        as_keywords = lavit_model.generate(**batch, generator=torch.Generator().manual_seed(0), max_new_tokens=6,
                                           do_sample=True, temperature=0.7)
    finally:
        config.do_sample, config.temperature = saved
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], as_keywords)
