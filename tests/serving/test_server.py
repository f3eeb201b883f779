"""`lavit serve` for real: the command starts Ray Serve on loopback (2 model replicas) and the official `openai`
client talks to it. Batched answers equal each request alone, streaming, images, errors over HTTP, a bounded load
test, a replica killed mid-flight, and a graceful shutdown (SIGTERM) that finishes the accepted requests."""

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import psutil
import pytest
from PIL import Image
from serving_helpers import alone, data_url, free_port, request_outcome, write_tiny_lavit

from lavit.serving.engine import LaVITEngine, RequestPreparer
from lavit.serving.schemas import ChatCompletionRequest, ServeLimits

pytestmark = pytest.mark.slow
STARTUP_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_tiny_lavit(tmp_path_factory.mktemp("served") / "tiny-lavit")
    port = free_port()
    command = [sys.executable, "-m", "lavit.cli", "serve", str(folder), "--port", str(port), "--replicas", "2",
               "--num-cpus", "2", "--cpus-per-replica", "0.5", "--max-batch-size", "8", "--max-tokens", "400"]
    log = open(tmp_path_factory.mktemp("logs") / "serve.log", "w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert process.poll() is None and time.monotonic() < deadline, f"server did not start: {tail(log)}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    yield {"process": process, "base": base, "folder": folder, "log": log}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own session, started above
            process.wait()


def tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-6000:]


def client(server, timeout=120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def local(server):
    """The engine and the preparer on the same folder in this process (the references)."""
    return (LaVITEngine(str(server["folder"]), device="cpu"),
            RequestPreparer(str(server["folder"]), ServeLimits(max_tokens=400)))


@pytest.fixture(scope="module")
def reference(local):
    """`generate` alone."""
    engine, preparer = local
    return lambda body: alone(engine, preparer.chat_job(ChatCompletionRequest(model="tiny-lavit", **body)))


def user(text, *images):
    content = [{"type": "image_url", "image_url": {"url": data_url(seed)}} for seed in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


BODIES = [
    {"messages": user("a photo of a cat"), "max_tokens": 6, "temperature": 0},
    {"messages": user("two dogs play", 1), "max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 3, "n": 2},
    {"messages": user("what is it?", 2, 3), "max_tokens": 5, "temperature": 1.0, "seed": 11, "image_max_tokens": 5},
    {"messages": user("a man rides"), "max_tokens": 7, "temperature": 1.2, "seed": 5, "stop": ["e"],
     "top_k": 20},
    {"messages": user("the quick fox", 4), "max_tokens": 5, "temperature": 0, "n": 3, "image_max_tokens": 3},
    {"messages": user("a bowl of coffee", 5), "max_tokens": 12, "temperature": 0.7, "seed": 9},
]


def ask(api, body):
    extra = {name: body[name] for name in ("top_k", "image_max_tokens") if name in body}
    plain = {name: value for name, value in body.items() if name not in extra}
    return api.chat.completions.create(model="tiny-lavit", extra_body=extra or None, **plain)


def test_concurrent_requests_get_what_each_gets_alone(server, reference):
    api = client(server)
    with ThreadPoolExecutor(len(BODIES) * 2) as pool:  # each body twice, all at once: batched together
        answers = list(pool.map(lambda body: ask(api, body), BODIES * 2))
    for body, answer in zip(BODIES * 2, answers, strict=True):
        texts = [choice.message.content for choice in sorted(answer.choices, key=lambda choice: choice.index)]
        assert texts == reference(body), body


def test_streaming_gives_the_same_text(server):
    api = client(server)
    body = {**BODIES[5], "stream": True, "stream_options": {"include_usage": True}}
    chunks = list(api.chat.completions.create(model="tiny-lavit", **body))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].usage.completion_tokens >= 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("stop", "length")
    assert streamed == ask(api, BODIES[5]).choices[0].message.content


IMAGE_BODIES = [
    {"prompt": "a red bus", "n": 2, "extra_body": {"seed": 4, "num_inference_steps": 2}},
    {"prompt": "a cat on a long sofa", "extra_body": {"seed": 7, "num_inference_steps": 2}},
    {"prompt": "a red bus", "extra_body": {"seed": 1, "num_inference_steps": 2, "guidance_scale": 2.0}},
    {"prompt": "two dogs", "n": 2, "extra_body": {"seed": 4, "num_inference_steps": 2}},
]


def test_concurrent_image_requests_get_what_each_gets_alone(server, local):
    from lavit.serving.schemas import ImageGenerationRequest

    engine, preparer = local
    api = client(server)
    with ThreadPoolExecutor(len(IMAGE_BODIES)) as pool:  # all at once: batched into pipeline calls
        answers = list(pool.map(lambda body: api.images.generate(model="tiny-lavit", **body), IMAGE_BODIES))
    for body, answer in zip(IMAGE_BODIES, answers, strict=True):
        request = ImageGenerationRequest(prompt=body["prompt"], n=body.get("n", 1), **body["extra_body"])
        lone = engine.render_images([preparer.image_job(request)])[0]
        # within one intensity level, as docs/serving.md states (the visual tokens are equal: test_batched_requests.py)
        assert len(answer.data) == len(lone)
        for item, png in zip(answer.data, lone, strict=True):
            assert np.abs(pixels(item.b64_json) - pixels(png)).max() <= 1, body


def pixels(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))).astype(int)


def test_errors_over_http(server):
    api = client(server)
    assert [model.id for model in api.models.list().data] == ["tiny-lavit"]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o", messages=user("hi"))
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model="tiny-lavit", messages=user("hi"), n=99)
    assert raised.value.body["param"] == "n"


def test_bounded_load(server):
    api, count, deadline_s = client(server, timeout=60), 32, 120
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda index: ask(api, {**BODIES[index % len(BODIES)], "seed": index}),
                                range(count)))
    assert len(answers) == count and time.monotonic() - started < deadline_s


def replica_processes(server) -> list[psutil.Process]:
    children = psutil.Process(server["process"].pid).children(recursive=True)
    return [child for child in children if "ServeReplica:lavit:LaVITModel" in " ".join(child.cmdline())]


def test_a_killed_replica_never_hangs_a_request(server):
    api = client(server, timeout=90)
    body = {"messages": user("a photo of a cat"), "max_tokens": 400, "temperature": 1.0}
    streaming = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request_outcome, api, {**body, "model": "tiny-lavit", "seed": index,
                                                      "stream": index % 2 == 1}, streaming)
                   for index in range(8)]
        assert streaming.wait(timeout=60), "no request started"
        replicas = replica_processes(server)
        assert len(replicas) == 2, tail(server["log"])
        for replica in replicas:
            replica.cpu_percent()
        time.sleep(0.5)
        max(replicas, key=lambda replica: replica.cpu_percent()).kill()  # the busier one: requests in flight
        outcomes = [future.result(timeout=120) for future in futures]  # a hang fails here
    assert all(item in ("200", "stream error") or item.startswith("5") for item in outcomes), outcomes
    assert ask(api, BODIES[0]).choices[0].message.content  # still serving
    print("outcomes after the kill:", outcomes)


def test_graceful_shutdown_finishes_accepted_requests(server):
    api = client(server, timeout=120)
    body = {"messages": user("two dogs play"), "max_tokens": 300, "temperature": 1.0, "seed": 2}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, api, {**body, "seed": index}) for index in range(4)]
        time.sleep(1.0)
        server["process"].send_signal(signal.SIGTERM)
        answers = [future.result(timeout=120) for future in futures]
    assert all(answer.choices[0].finish_reason in ("stop", "length") for answer in answers)
    assert server["process"].wait(timeout=90) == 0, tail(server["log"])
