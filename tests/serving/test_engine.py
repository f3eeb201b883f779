"""`lavit.serving.engine` in one process on a tiny language model folder: `RequestPreparer` turns requests into jobs
(the answer's room in the context, with images at their budget; the image settings given; prompts past the context
refused naming the field), `request_seed` and `ImageJob` (seeds, per-image streams, batch keys), and `LaVITEngine`
(its EOS ids, `run_batch` rows in job order, `stream`'s items per job, a language model folder refusing images)."""

import asyncio
import base64
import functools
import io

import pytest
import torch
from conftest import real_photos, text_vocab_size, tiny_lavit_config, tiny_text_tokenizer
from lavit.modeling.validation_lavit import SEED
from PIL import Image

from lavit.serving.batching import SamplingSettings
from lavit.serving.engine import ChatJob, ImageJob, LaVITEngine, RequestPreparer, png_base64, request_seed
from lavit.serving.schemas import ChatCompletionRequest, ImageGenerationRequest, OpenAIError, ServeLimits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny LaVIT language model folder with its processor (no pixel decoder)."""
    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("engine") / "lavit"
    LaVITForCausalLM(tiny_lavit_config(text_vocab_size(tokenizer))).save_pretrained(folder)
    LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def preparer(folder):
    return RequestPreparer(folder, ServeLimits(max_tokens=1024))


@pytest.fixture(scope="module")
def engine(folder):
    return LaVITEngine(folder, device="cpu")


@functools.cache
def cat() -> Image.Image:
    return Image.fromarray(real_photos()[1]).resize((32, 24))


@functools.cache
def photo_url() -> str:
    buffer = io.BytesIO()
    cat().save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(words: int, images: int = 0, **fields) -> ChatCompletionRequest:
    content = [{"type": "image_url", "image_url": {"url": photo_url()}} for _ in range(images)]
    content.append({"type": "text", "text": " ".join(["cat"] * words)})
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": content}], **fields)


def test_a_chat_job_carries_the_requests_settings(preparer):
    request = chat(3, images=2, temperature=0.5, top_p=0.9, top_k=7, seed=11, n=2, max_tokens=4, stop=["x", ""],
                   image_max_tokens=5)
    job = preparer.chat_job(request)
    assert job.sampling == SamplingSettings(0.5, 0.9, 7, 11)
    assert (job.n, job.max_tokens, job.stop, job.image_max_tokens, job.cancelled) == (2, 4, ["x"], 5, False)
    assert job.pixel_values.shape[0] == 2
    assert "cat cat cat" in preparer.processor.tokenizer.decode(job.input_ids, skip_special_tokens=True)


def test_without_max_tokens_the_answer_gets_the_room_left_up_to_the_limit(folder, preparer):
    for words in (3, 200):
        job = preparer.chat_job(chat(words))
        assert job.max_tokens == preparer.context_length - len(job.input_ids)  # the limit, 1024, is past the context
    assert RequestPreparer(folder, ServeLimits(max_tokens=5)).chat_job(chat(3)).max_tokens == 5


def test_images_count_at_their_budget_against_the_context(preparer):
    words = 120
    base = preparer.chat_job(chat(words, images=1, max_tokens=1))
    room = preparer.context_length - len(base.input_ids) - preparer.tokens_per_image
    assert room > 1
    preparer.chat_job(chat(words, images=1, max_tokens=room))
    with pytest.raises(OpenAIError) as raised:
        preparer.chat_job(chat(words, images=1, max_tokens=room + 1))
    error = raised.value
    assert error.param == "messages" and error.code == "context_length_exceeded"
    assert f"{preparer.context_length}" in error.message and "image_max_tokens" in error.message
    # a lower visual token budget leaves the answer more room; one above the model's counts as the model's
    preparer.chat_job(chat(words, images=1, max_tokens=room + 1, image_max_tokens=preparer.tokens_per_image - 1))
    with pytest.raises(OpenAIError):
        preparer.chat_job(chat(words, images=1, max_tokens=room + 1, image_max_tokens=10**6))


def test_an_allowed_media_path_must_be_a_folder(folder, tmp_path):
    with pytest.raises(ValueError, match="--allowed-local-media-path .* is not a folder"):
        RequestPreparer(folder, ServeLimits(), allowed_local_media_path=str(tmp_path / "missing"))


def test_an_image_job_keeps_only_the_settings_given(preparer):
    job = preparer.image_job(ImageGenerationRequest(prompt="a cat", seed=4, n=2, size="64x32"))
    assert (job.prompt, job.n, job.seed, job.size, job.settings) == ("a cat", 2, 4, (32, 64), {})
    job = preparer.image_job(ImageGenerationRequest(prompt="a cat", guidance_scale=3.0, num_inference_steps=2,
                                                    image_max_tokens=10**6))
    assert job.settings == {"guidance_scale": 3.0, "num_inference_steps": 2,
                            "max_new_tokens": preparer.tokens_per_image,
                            "min_new_tokens": min(20, preparer.tokens_per_image)}
    assert preparer.image_job(ImageGenerationRequest(prompt="a cat", image_max_tokens=3)).settings == {
        "max_new_tokens": 3, "min_new_tokens": 3}


def test_an_image_prompt_past_the_context_is_refused(preparer):
    with pytest.raises(OpenAIError) as raised:
        preparer.image_job(ImageGenerationRequest(prompt=" ".join(["cat"] * 600)))
    assert raised.value.param == "prompt" and raised.value.code == "context_length_exceeded"


def test_a_request_seed_is_its_own_or_a_random_one_in_range():
    assert request_seed(chat(1, seed=0)) == 0 and request_seed(ImageGenerationRequest(prompt="a", seed=7)) == 7
    drawn = {request_seed(chat(1)) for _ in range(20)}
    assert len(drawn) > 1 and all(SEED.low <= seed <= SEED.high for seed in drawn)


def test_an_image_jobs_streams_come_from_its_seed():
    def draws(seed, n):
        return [torch.rand(3, generator=g).tolist() for g in ImageJob("a", [1], n, seed, None, {}).generators("cpu")]

    assert draws(4, 3) == draws(4, 3) and len(draws(4, 3)) == 3
    assert draws(4, 3)[0] != draws(4, 3)[1] and draws(4, 1) != draws(5, 1)
    assert draws(4, 1) == draws(4, 3)[:1]  # the first image does not depend on how many are asked


def test_batch_keys_group_equal_sizes_and_settings():
    def key(size, settings):
        return ImageJob("a", [1], 1, 0, size, settings).batch_key()

    assert key((32, 32), {"a": 1, "b": 2}) == key((32, 32), {"b": 2, "a": 1})
    assert key((32, 32), {"a": 1}) != key((32, 64), {"a": 1}) != key((32, 64), {"a": 2})


def test_png_base64_round_trips_an_image():
    decoded = Image.open(io.BytesIO(base64.b64decode(png_base64(cat()))))
    assert decoded.format == "PNG" and decoded.size == (32, 24) and list(decoded.getdata()) == list(cat().getdata())


def job(preparer, words, **fields) -> ChatJob:
    return preparer.chat_job(chat(words, **fields))


def test_run_batch_gives_each_jobs_rows_in_order(engine, preparer):
    jobs = [job(preparer, 2, temperature=0, n=2, max_tokens=3), job(preparer, 5, temperature=1.0, seed=1, max_tokens=2)]
    steps = []
    rows = engine.run_batch(jobs, steps.append)
    assert len(rows) == 3 and all(len(step) == 3 for step in steps)
    assert rows[0].text == rows[1].text and rows[0].tokens == rows[1].tokens  # greedy rows agree
    assert all(len(row.tokens) <= row.max_tokens for row in rows) and rows[2].max_tokens == 2
    assert all(row.finish_reason in ("stop", "length") for row in rows)


def test_stream_yields_per_job_items_then_stop_iteration_and_cancels_at_the_end(engine, preparer):
    short, long = job(preparer, 2, temperature=0, max_tokens=1), job(preparer, 3, temperature=0, n=2, max_tokens=4)

    async def items():
        return [step async for step in engine.stream([short, long])]

    steps = asyncio.run(items())
    assert all(len(step) == 2 for step in steps) and all(len(step[1]) == 2 for step in steps)
    finished = next(index for index, step in enumerate(steps) if step[0][0] is not None and step[0][0][1])
    assert finished == 0 and len(steps) > 1, "the test needs the longer job to run on after the short one"
    assert all(step[0] is StopIteration for step in steps[finished + 1:])
    assert short.cancelled and long.cancelled  # the reader is gone: nothing decodes for it any more


def test_the_engine_reads_eos_and_refuses_images_without_a_decoder(engine):
    assert engine.pipeline is None and engine.device == torch.device("cpu")
    assert engine.eos_token_ids == {engine.model.generation_config.eos_token_id}
    jobs = [ImageJob("a", [1], 1, 0, None, {}), ImageJob("b", [1], 2, 0, (32, 32), {})]
    errors = engine.render_images(jobs)
    assert len(errors) == 2 and all(isinstance(error, OpenAIError) and error.param == "model" for error in errors)
    assert "pixel decoder" in errors[0].message
