"""The pieces of `lavit.serving.app` in process, without a model: the error bodies (`timed_out`, `internal_error`,
`content_type_error`), `collect` and `sse_chunks` (what a client reads, and how a failure or the deadline ends a
stream), `LocalBackend` (one request at a time, failures raised), and `create_app`'s checks that answer before the
backend or the preparer get any work (model name, limits, the time limit)."""

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from lavit.serving.app import (
    LocalBackend,
    collect,
    content_type_error,
    create_app,
    image_result,
    internal_error,
    sse_chunks,
    timed_out,
)
from lavit.serving.batching import SamplingSettings
from lavit.serving.engine import ChatJob
from lavit.serving.schemas import OpenAIError, ServeLimits

HEADER = {"id": "chatcmpl-1", "created": 0, "model": "tiny"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


async def updates(*steps, then=None):
    for step in steps:
        yield step
    if then is not None:
        raise then


def events(stream) -> list:
    async def read():
        return [chunk async for chunk in stream]

    chunks = asyncio.run(read())
    assert all(chunk.startswith("data: ") and chunk.endswith("\n\n") for chunk in chunks)
    return [chunk[len("data: "):-2] if chunk == "data: [DONE]\n\n" else json.loads(chunk[len("data: "):])
            for chunk in chunks]


def job(n=1) -> ChatJob:
    return ChatJob([1, 2, 3], None, SamplingSettings(temperature=0), n, 4, [], None)


def test_timed_out_is_a_408_naming_the_limit():
    error = timed_out(1.5)
    assert (error.status, error.error_type, error.code, error.param) == (408, "timeout_error", "request_timeout", None)
    assert "1.5 s" in error.message and "--request-timeout" in error.message


def test_an_internal_error_names_the_exception_and_is_cut_short():
    error = internal_error(KeyError("x" * 1000))
    assert (error.status, error.error_type) == (500, "server_error")
    assert "KeyError" in error.message and error.message.count("x") <= 201 and "report it" in error.message


@pytest.mark.parametrize("content_type", [None, "application/json", "Application/JSON; charset=utf-8",
                                          "application/vnd.api+json", "application/merge-patch+json"])
def test_json_and_no_content_type_are_taken(content_type):
    assert content_type_error("POST", content_type) is None


@pytest.mark.parametrize(("content_type", "named"), [
    ("text/plain", "'text/plain'"), ("multipart/form-data; boundary=x", "'multipart/form-data'"),
    ("application/jsonx", "'application/jsonx'"), ("text/json", "'text/json'"), ("", "'an empty content type'")])
def test_other_content_types_get_a_415_naming_them(content_type, named):
    error = content_type_error("POST", content_type)
    assert error.status == 415 and error.code == "unsupported_media_type"
    assert named in error.message and "application/json" in error.message


def test_a_get_is_never_refused_for_its_content_type():
    assert content_type_error("GET", "text/plain") is None


def test_image_result_returns_images_and_raises_a_failure():
    assert image_result(["a", "b"]) == ["a", "b"]
    with pytest.raises(OpenAIError, match="size"):
        image_result(OpenAIError("size too large", "size"))


def test_collect_joins_each_rows_deltas_and_counts_tokens():
    steps = [[("a", None), ("x", None)], [("b", "stop"), ("y", None)], [None, ("z", "length")]]
    assert asyncio.run(collect(updates(*steps), 2)) == (["ab", "xyz"], ["stop", "length"], 5)
    assert asyncio.run(collect(updates(), 2)) == (["", ""], [None, None], 0)


def test_sse_chunks_send_one_chunk_per_step_then_usage_and_done():
    steps = [[("a", None), ("x", None)], [None, None], [("b", "stop"), None], [None, ("y", "length")]]
    read = events(sse_chunks(updates(*steps), HEADER, prompt_tokens=7, include_usage=True))
    assert read[-1] == "[DONE]" and read[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4,
                                                          "total_tokens": 11}
    chunks = read[:-2]
    assert len(chunks) == 3  # a step where no row moved sends nothing
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-1" for chunk in chunks)
    assert [[choice["index"] for choice in chunk["choices"]] for chunk in chunks] == [[0, 1], [0], [1]]
    assert chunks[1]["choices"][0]["delta"] == {"role": "assistant", "content": "b"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in json.dumps(events(sse_chunks(updates(*steps), HEADER, 7, include_usage=False)))


@pytest.mark.parametrize(("failure", "error_type", "words"), [
    (OpenAIError("the replica was lost", None, status=503, code="replica_lost"), "invalid_request_error",
     "the replica was lost"),
    (RuntimeError("boom"), "server_error", "RuntimeError: boom"),
])
def test_a_failure_mid_stream_ends_it_with_an_error_event(failure, error_type, words):
    read = events(sse_chunks(updates([("a", None)], then=failure), HEADER, 3, include_usage=True))
    assert read[0]["choices"][0]["delta"]["content"] == "a"  # the answer so far stays sent
    assert len(read) == 2 and read[1]["error"]["type"] == error_type and words in read[1]["error"]["message"]


def test_a_step_past_the_deadline_is_cancelled_and_ends_the_stream():
    cancelled = []

    async def slow():
        yield [("a", None)]
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        yield [("b", "stop")]

    started = time.monotonic()
    read = events(sse_chunks(slow(), HEADER, 3, True, deadline=started + 0.05, request_timeout_s=2.0))
    assert time.monotonic() - started < 5 and cancelled == [True]
    assert len(read) == 2 and read[1]["error"]["code"] == "request_timeout" and "2 s" in read[1]["error"]["message"]


class StepEngine:
    """A stand-in for `LaVITEngine`'s interface: each job's rows in a few steps, with a pause between them."""

    def __init__(self):
        self.log = []

    async def stream(self, jobs):
        for step in range(3):
            self.log.append((id(jobs[0]), step))
            await asyncio.sleep(0.001)
            yield [[(str(step), "stop" if step == 2 else None)] * jobs[0].n]
        yield [StopIteration]

    def render_images(self, jobs):
        return [OpenAIError("size cannot be drawn", "size")]


def test_the_local_backend_runs_one_request_at_a_time_and_raises_image_failures():
    backend = LocalBackend(StepEngine())
    first, second = job(n=2), job()

    async def both():
        return await asyncio.gather(backend.complete(first), backend.complete(second))

    assert asyncio.run(both()) == [(["012", "012"], ["stop", "stop"], 6), (["012"], ["stop"], 3)]
    assert [entry[0] for entry in backend.engine.log] == [id(first)] * 3 + [id(second)] * 3  # never interleaved
    with pytest.raises(OpenAIError, match="size cannot be drawn"):
        asyncio.run(backend.images(None))


class PreparedJob:
    """A stand-in for `RequestPreparer`: every request becomes the same small job."""

    def chat_job(self, request):
        return job(request.n)


class SlowBackend:
    async def complete(self, job):
        await asyncio.sleep(30)


def test_the_model_name_and_limits_are_checked_before_any_work():
    # no preparer and no backend: a request that reached either would fail with a 500
    app = create_app(None, None, "tiny", ServeLimits(max_n=2))
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert [model["id"] for model in http.get("/v1/models").json()["data"]] == ["tiny"]
        other = http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        assert "'gpt-4o'" in other.json()["error"]["message"] and "'tiny'" in other.json()["error"]["message"]
        too_many = http.post("/v1/chat/completions", json={**CHAT, "n": 3})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        images = http.post("/v1/images/generations", json={"prompt": "a cat", "model": "other"})
        assert images.status_code == 404 and images.json()["error"]["param"] == "model"


def test_a_request_past_the_time_limit_gets_a_408_body():
    app = create_app(PreparedJob(), SlowBackend(), "tiny", ServeLimits(), request_timeout_s=0.1)
    with TestClient(app) as http:
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=CHAT)
        assert time.monotonic() - started < 5
        assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
