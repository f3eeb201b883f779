"""Requests batched by the server get what `generate` gives each alone (greedy and seeded sampling, mixed n,
max_tokens, stop strings and visual token budgets), with no Ray: the engine and the preparer run in this process."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serving_helpers import alone, data_url, write_tiny_lavit

from lavit.serving.engine import LaVITEngine, RequestPreparer, png_base64
from lavit.serving.schemas import ChatCompletionRequest, OpenAIError, ServeLimits


def chat(text, images=(), **settings) -> ChatCompletionRequest:
    content = [{"type": "image_url", "image_url": {"url": data_url(seed)}} for seed in images]
    content.append({"type": "text", "text": text})
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": content}], **settings)


REQUESTS = [
    chat("a photo of a cat", temperature=0, max_tokens=6),
    chat("two dogs play", images=[1], temperature=0.8, top_p=0.9, seed=3, n=2, max_tokens=9),
    chat("what is in the picture?", images=[2, 3], temperature=1.0, seed=11, max_tokens=4, image_max_tokens=5),
    chat("a man rides", temperature=1.3, top_k=20, seed=5, max_tokens=7, stop=["e"]),
    chat("the quick brown fox", images=[4], temperature=0, n=3, max_tokens=5, image_max_tokens=3),
]


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    return write_tiny_lavit(tmp_path_factory.mktemp("served") / "tiny-lavit")


@pytest.fixture(scope="module")
def engine_and_preparer(served_folder):
    return LaVITEngine(str(served_folder), device="cpu"), RequestPreparer(str(served_folder), ServeLimits())


def test_batched_rows_equal_each_request_alone(engine_and_preparer):
    engine, preparer = engine_and_preparer
    jobs = [preparer.chat_job(request) for request in REQUESTS]
    steps = []
    rows = engine.run_batch(jobs, steps.append)
    expected = [answer for job in jobs for answer in alone(engine, job)]
    assert [row.text for row in rows] == expected
    # streamed deltas add up to the same texts, and every row is finished exactly once
    streamed = ["" for _ in rows]
    finished = [0 for _ in rows]
    for deltas in steps:
        for index, delta in enumerate(deltas):
            if delta is not None:
                streamed[index] += delta[0]
                finished[index] += delta[1] is not None
    assert streamed == expected and finished == [1] * len(rows)
    assert all(row.finish_reason in ("stop", "length") for row in rows)
    # a different batch order and batch mates change nothing
    reordered = engine.run_batch(jobs[::-1][:3], lambda deltas: None)
    assert [row.text for row in reordered] == [answer for job in jobs[::-1][:3] for answer in alone(engine, job)]


def test_a_sampling_selector_draws_from_each_request_seed(engine_and_preparer):
    engine, preparer = engine_and_preparer
    config = engine.model.visual_tokenizer.config
    jobs = [preparer.chat_job(request) for request in REQUESTS]

    def texts(batch):
        return [row.text for row in engine.run_batch(batch, lambda deltas: None)]

    previous, config.selection_mode = config.selection_mode, "sample"
    try:
        each_alone = [text for job in jobs for text in texts([job])]
        assert texts(jobs) == each_alone
        assert texts(jobs[::-1]) == [text for job in jobs[::-1] for text in texts([job])]
    finally:
        config.selection_mode = previous


def visual_tokens(tokens) -> list[list[int]]:
    """Each image's code ids, from the packed tokens the pipeline hands its decoder."""
    return [ids.tolist() for ids in tokens.code_ids.split(tokens.token_counts.tolist())]


def pixels(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))).astype(int)


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_batched_image_requests_equal_each_alone(engine_and_preparer, monkeypatch):
    """Image requests of mixed prompts, `n`, seeds and settings in one `render_images` call: each gets the visual
    tokens the pipeline writes for its prompt alone with its seed's generators (the two settings groups are two
    calls), and the pixels drawn from them within one intensity level of the lone ones (docs/serving.md: the decoder's
    batched convolutions may round differently from a batch of one)."""
    from lavit.serving.schemas import ImageGenerationRequest

    engine, preparer = engine_and_preparer
    decoded, decode = [], engine.pipeline.decode_visual_tokens
    monkeypatch.setattr(engine.pipeline, "decode_visual_tokens",  # records what the decoder is given, changes nothing
                        lambda tokens, **kwargs: decoded.append(visual_tokens(tokens)) or decode(tokens, **kwargs))
    requests = [
        ImageGenerationRequest(prompt="a red bus", n=2, seed=4, num_inference_steps=2),
        ImageGenerationRequest(prompt="a cat on a long sofa by the window", seed=9, num_inference_steps=2),
        ImageGenerationRequest(prompt="a red bus", seed=5, num_inference_steps=3, guidance_scale=2.0),
        ImageGenerationRequest(prompt="two dogs", n=2, seed=4, num_inference_steps=2),
    ]
    jobs = [preparer.image_job(request) for request in requests]
    batched = engine.render_images(jobs)
    # the calls' rows: the groups in `render_images`' order (sorted by settings), each group's jobs in request order
    rows = [row for call in decoded for row in call]
    order = sorted(range(len(jobs)), key=lambda index: repr(jobs[index].batch_key()))
    starts = {index: sum(jobs[before].n for before in order[: order.index(index)]) for index in order}
    assert len(decoded) == 2 and len(rows) == sum(job.n for job in jobs)
    for index, (job, images) in enumerate(zip(jobs, batched, strict=True)):
        settings = dict(job.settings)
        decoded.clear()
        alone_images = engine.pipeline(
            job.prompt, num_images_per_prompt=job.n, generator=job.generators(engine.device),
            token_guidance_scale=settings.pop("guidance_scale", None), **settings).images
        assert decoded[0] == rows[starts[index] : starts[index] + job.n], job  # the same visual tokens
        for png, image in zip(images, alone_images, strict=True):
            assert np.abs(pixels(png) - pixels(png_base64(image))).max() <= 1, job
    assert batched[0] != batched[3] and batched[0][0] != batched[0][1]  # prompts and images apart draw apart
    # a failure stays with its request: one bad size among good ones
    bad = preparer.image_job(ImageGenerationRequest(prompt="a cat", size="37x37", num_inference_steps=2))
    mixed = engine.render_images([jobs[1], bad])
    assert mixed[0] == batched[1] and isinstance(mixed[1], OpenAIError) and mixed[1].param == "size"


def test_a_size_the_decoder_cannot_draw_is_an_error_naming_size(engine_and_preparer):
    """Sizes past the decoder's own bounds (its multiple, its largest side) fail before any drawing, naming `size`."""
    from lavit.serving.schemas import ImageGenerationRequest

    engine, preparer = engine_and_preparer
    sizes = ["1x1", "9x7", "1024x1", "37x37"]
    jobs = [preparer.image_job(ImageGenerationRequest(prompt="a cat", size=size)) for size in sizes]
    for size, error in zip(sizes, engine.render_images(jobs), strict=True):
        assert isinstance(error, OpenAIError) and error.param == "size" and size in error.message, (size, error)


def test_a_cancelled_request_stops_and_its_batch_mates_go_on(engine_and_preparer):
    """A job given up mid-batch (timeout, closed connection: `job.cancelled`) stops at the next step; the rows
    batched with it still get what they get alone."""
    engine, preparer = engine_and_preparer
    given_up = preparer.chat_job(chat("a photo of a cat", temperature=1.0, seed=1, max_tokens=60))
    others = [preparer.chat_job(request) for request in REQUESTS[1:3]]
    steps = []

    def on_step(deltas):
        steps.append(deltas)
        if len(steps) == 2:
            given_up.cancelled = True

    rows = engine.run_batch([given_up, *others], on_step)
    assert rows[0].finish_reason == "cancelled" and len(rows[0].tokens) == 2
    assert [row.text for row in rows[1:]] == [answer for job in others for answer in alone(engine, job)]
