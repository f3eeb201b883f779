"""A request past the server's time limit gets a 408 OpenAI error body (a stream: an error event), never a hang, and
its decoding stops. The FastAPI app of `lavit serve` runs under uvicorn on loopback (the engine in this process, no
Ray); the official `openai` client talks to it. The model is made deliberately slow (a pause before every forward),
so the requests run far past the limit whatever the machine's speed."""

import threading
import time

import openai
import pytest
import uvicorn
from serving_helpers import free_port, write_tiny_lavit

from lavit.serving.app import LocalBackend, create_app
from lavit.serving.engine import LaVITEngine, RequestPreparer
from lavit.serving.schemas import ServeLimits

LIMIT_S = 1.5
PAUSE_S = 0.05  # per forward: 400 tokens take 20 s, far past the limit


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    folder = write_tiny_lavit(tmp_path_factory.mktemp("served") / "tiny-lavit")
    limits = ServeLimits(max_tokens=400)
    engine = LaVITEngine(str(folder), device="cpu")
    forwards = []

    def pause(*_):
        forwards.append(time.monotonic())
        time.sleep(PAUSE_S)

    engine.model.register_forward_pre_hook(pause)
    engine.pipeline.unet.register_forward_pre_hook(pause)
    app = create_app(RequestPreparer(str(folder), limits), LocalBackend(engine), "tiny", limits,
                     request_timeout_s=LIMIT_S)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    yield api, forwards
    server.should_exit = True
    thread.join(timeout=30)


def assert_stopped_decoding(forwards):
    """The timed-out request's `generate` stops within a step or two: no forward runs a second later."""
    time.sleep(2 * PAUSE_S + 0.2)
    count = len(forwards)
    time.sleep(1.0)
    assert len(forwards) == count, "the timed-out request kept decoding"


def test_a_slow_request_gets_a_408_body(slow_server):
    api, forwards = slow_server
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a cat"}], max_tokens=400,
                                    temperature=0)
    elapsed = time.monotonic() - started
    assert raised.value.status_code == 408 and LIMIT_S <= elapsed < LIMIT_S + 5, elapsed
    error = raised.value.body
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error" and "1.5 s" in error["message"]
    assert_stopped_decoding(forwards)
    # the server still answers what fits in the limit
    answer = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a cat"}], max_tokens=2,
                                         temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_slow_stream_ends_with_an_error_event(slow_server):
    api, forwards = slow_server
    started, text = time.monotonic(), ""
    with pytest.raises(openai.APIError) as raised:
        for chunk in api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a dog"}],
                                                 max_tokens=400, temperature=0, stream=True):
            text += chunk.choices[0].delta.content or ""
    assert LIMIT_S <= time.monotonic() - started < LIMIT_S + 5
    assert "1.5 s" in raised.value.message and raised.value.body["code"] == "request_timeout"
    assert_stopped_decoding(forwards)


def test_a_slow_image_request_gets_a_408_body(slow_server):
    api, _ = slow_server
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        api.images.generate(model="tiny", prompt="a red bus", extra_body={"seed": 0, "num_inference_steps": 60})
    assert raised.value.status_code == 408 and time.monotonic() - started < LIMIT_S + 5
    assert raised.value.body["code"] == "request_timeout"
