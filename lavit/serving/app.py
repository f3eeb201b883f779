"""The HTTP face of `lavit serve`: a FastAPI app speaking the OpenAI API (`create_app`), and the Ray Serve application
that runs it (`build_app`: an ingress deployment in front of autoscaled model replicas that batch requests).

    POST /v1/chat/completions   POST /v1/images/generations   GET /v1/models   GET /health

`create_app` takes a backend (`LocalBackend`: the engine in this process; `RayBackend`: the model deployment) so the
request checks run, and are tested, without Ray.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import ChatJob, ImageJob, LaVITEngine, RequestPreparer
from .schemas import (
    ChatCompletionRequest,
    ImageGenerationRequest,
    OpenAIError,
    ServeLimits,
    check_limits,
    completion_choice,
    error_param,
    field_range,
    most_specific,
    usage,
    validation_message,
)


class LocalBackend:
    """The engine in this process, one request at a time (the FastAPI app without Ray, e.g. in tests)."""

    def __init__(self, engine: LaVITEngine):
        self.engine = engine
        self.lock = asyncio.Lock()

    async def chat(self, job: ChatJob) -> AsyncIterator[list]:
        async with self.lock:
            async for items in self.engine.stream([job]):
                if items[0] is not StopIteration:
                    yield items[0]

    async def complete(self, job: ChatJob) -> tuple[list[str], list[str | None], int]:
        return await collect(self.chat(job), job.n)

    async def images(self, job: ImageJob) -> list[str]:
        async with self.lock:
            return image_result((await asyncio.to_thread(self.engine.render_images, [job]))[0])


def image_result(result: list[str] | Exception) -> list[str]:
    """A job's images, or its failure raised (`LaVITEngine.render_images` returns them in the job's place)."""
    if isinstance(result, Exception):
        raise result
    return result


# the body model of each POST route: a number out of its range is answered with the range on this server
REQUEST_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/images/generations": ImageGenerationRequest}


def timed_out(request_timeout_s: float) -> OpenAIError:
    return OpenAIError(f"the request took longer than this server's limit of {request_timeout_s:g} s "
                       "(--request-timeout): ask for fewer tokens or images, or retry later", None, status=408,
                       error_type="timeout_error", code="request_timeout")


def create_app(preparer: RequestPreparer, backend, model_name: str, limits: ServeLimits,
               request_timeout_s: float | None = None) -> FastAPI:
    """The OpenAI-compatible app: every request is parsed, checked against `limits` and prepared (images read,
    prompt length checked) before `backend` gets any work. A request still running `request_timeout_s` after it
    arrived is cancelled and answered with a 408 OpenAI error body (a stream: an error event, then the end)."""
    app = FastAPI(title="lavit serve")

    async def within_time(work, started: float):
        if request_timeout_s is None:
            return await work
        try:
            return await asyncio.wait_for(work, request_timeout_s - (time.monotonic() - started))
        except TimeoutError as error:
            raise timed_out(request_timeout_s) from error

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        # a failure no check foresaw: still an OpenAI error body (clients parse it), never Starlette's plain text
        return JSONResponse(internal_error(error).body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = most_specific(error.errors())
        if first["type"] == "json_invalid":
            return JSONResponse(OpenAIError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                            None).body(), status_code=400)
        param = error_param(tuple(first["loc"]))
        model = REQUEST_MODELS.get(request.url.path)
        allowed = field_range(model, param, limits) if model is not None and param else None
        return JSONResponse(OpenAIError(validation_message(first, param, allowed), param).body(), status_code=400)

    @app.middleware("http")
    async def require_json(request: Request, call_next):
        # a body of another content type would reach the request model as bytes ("should be a valid dictionary")
        error = content_type_error(request.method, request.headers.get("content-type"))
        return JSONResponse(error.body(), status_code=error.status) if error else await call_next(request)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():  # "-5", "abc": not a size, whatever the limit
            error = OpenAIError(f"the Content-Length header must be the body's size in bytes (a whole number >= 0), "
                                f"got {length!r}", None)
            return JSONResponse(error.body(), status_code=400)
        if length is None and request.method == "POST":  # a chunked body: read up to the limit, no further
            body = b""
            async for piece in request.stream():
                body += piece
                if len(body) > limits.max_body_bytes:
                    break
            request._body = body  # Starlette hands the body read here to the route
            length = str(len(body)) if len(body) <= limits.max_body_bytes else f"more than {limits.max_body_bytes}"
        if length is not None and (not length.strip().isdigit() or int(length) > limits.max_body_bytes):
            error = OpenAIError(f"the body is {length} bytes; this server takes at most {limits.max_body_bytes}",
                                None, status=413)
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(f"the model {name!r} does not exist on this server; it serves {model_name!r}", "model",
                              status=404, code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lavit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        started = time.monotonic()
        check_model(request.model)
        check_limits(request, limits)
        job = await within_time(asyncio.to_thread(preparer.chat_job, request), started)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        header = {"id": completion_id, "created": created, "model": model_name}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            deadline = None if request_timeout_s is None else started + request_timeout_s
            return StreamingResponse(sse_chunks(backend.chat(job), header, len(job.input_ids), include_usage,
                                                deadline, request_timeout_s), media_type="text/event-stream")
        # the whole answer in one message from the replica (its rows are still batched with the streams)
        texts, reasons, completion_tokens = await within_time(backend.complete(job), started)
        choices = [completion_choice(index, text, reasons[index] or "length") for index, text in enumerate(texts)]
        return {**header, "object": "chat.completion", "choices": choices,
                "usage": usage(len(job.input_ids), completion_tokens)}

    @app.post("/v1/images/generations")
    async def image_generations(request: ImageGenerationRequest):
        started = time.monotonic()
        check_model(request.model)
        check_limits(request, limits)
        job = await asyncio.to_thread(preparer.image_job, request)
        images = await within_time(backend.images(job), started)
        return {"created": int(time.time()), "data": [{"b64_json": image} for image in images]}

    return app


def internal_error(error: Exception) -> OpenAIError:
    return OpenAIError(f"the server failed on this request ({type(error).__name__}: {str(error)[:200]}); this is a "
                       "bug in lavit serve, please report it", None, status=500, error_type="server_error")


def content_type_error(method: str, content_type: str | None) -> OpenAIError | None:
    """A 415 for a POST whose body is declared as something other than JSON (`application/json` or `...+json`; no
    content type is read as JSON, as FastAPI does)."""
    if method != "POST" or content_type is None:
        return None
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return None
    return OpenAIError(f"the body is sent as {media_type or 'an empty content type'!r}; send JSON with the header "
                       "Content-Type: application/json", None, status=415, code="unsupported_media_type")


async def collect(updates: AsyncIterator[list], n: int) -> tuple[list[str], list[str | None], int]:
    """The `n` answers, their finish reasons and the number of generated tokens of a whole chat request."""
    texts, reasons, completion_tokens = [""] * n, [None] * n, 0
    async for deltas in updates:
        for index, delta in enumerate(deltas):
            if delta is not None:
                texts[index] += delta[0]
                reasons[index] = delta[1] or reasons[index]
                completion_tokens += 1
    return texts, reasons, completion_tokens


async def sse_chunks(updates: AsyncIterator[list], header: dict, prompt_tokens: int, include_usage: bool,
                     deadline: float | None = None, request_timeout_s: float | None = None):
    """Server-sent events of `chat.completion.chunk`s, one per step, then `[DONE]`; a replica lost mid-stream, or the
    `deadline` (`time.monotonic()`) passed, ends the stream with an error event (the answer so far stays sent)."""
    chunk = {**header, "object": "chat.completion.chunk"}
    completion_tokens = 0
    updates = aiter(updates)
    try:
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                # a step that does not come before the deadline is cancelled: the replica stops decoding for no one
                deltas = await asyncio.wait_for(anext(updates), remaining)
            except StopAsyncIteration:
                break
            choices = []
            for index, delta in enumerate(deltas):
                if delta is not None:
                    completion_tokens += 1
                    choices.append({"index": index, "delta": {"role": "assistant", "content": delta[0]},
                                    "finish_reason": delta[1], "logprobs": None})
            if choices:
                yield f"data: {json.dumps({**chunk, 'choices': choices})}\n\n"
    except TimeoutError:
        yield f"data: {json.dumps(timed_out(request_timeout_s).body())}\n\n"
        return
    except OpenAIError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    except Exception as error:  # anything else that broke the answer: an error event, never a silent cut
        yield f"data: {json.dumps(internal_error(error).body())}\n\n"
        return
    if include_usage:
        yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage(prompt_tokens, completion_tokens)})}\n\n"
    yield "data: [DONE]\n\n"
