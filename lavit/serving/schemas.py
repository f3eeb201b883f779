"""The OpenAI request and response bodies `lavit serve` speaks (pydantic), the server's limits, and the error body.

Types and fixed ranges are checked by pydantic when a body is parsed; every number's range is lavit's own declaration
of that setting (a `Range` of `lavit.modeling.validation_lavit`, turned into the field's bounds by [`ranged`]: the
seed's is the CLI's, a visual token budget's the model's), so nothing in range can fail later. The limits an operator
sets (`ServeLimits`) are checked by `check_limits` right after, both before any work starts. Every failure becomes an
OpenAI error body `{"error": {"message", "type", "param", "code"}}` whose `param` names the field
(`messages[0].content[1].image_url`); an unexpected one a 500 with the same body (`create_app`), never plain text.
LaVIT's own knobs are extra body fields (the `openai` client sends them with `extra_body={...}`).
"""

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lavit.modeling.modeling_lavit_tokenizer import SELECTION_RANGES
from lavit.modeling.validation_lavit import INT64_MAX, NON_NEGATIVE_INT, POSITIVE_INT, SEED, Range

# the range of each number a request may carry (its field's bounds; `ranged`)
TEMPERATURE = Range(0, 2, note="0 is greedy")
TOP_P = Range(0, 1, low_open=True)
IMAGE_TOKEN_BUDGET = SELECTION_RANGES["max_tokens"]  # what the visual tokenizer's `max_tokens` takes
GUIDANCE = Range(1, 50)
STEPS = Range(1, 200, integer=True)


def ranged(spec: Range, default=None, **field):
    """A pydantic `Field` whose bounds are `spec`'s: an integer's upper bound is int64's when `spec` states none (what
    torch takes), a float must be finite."""
    bounds = {}
    if spec.low is not None:
        bounds["gt" if spec.low_open else "ge"] = spec.low
    high = spec.high if spec.high is not None else INT64_MAX if spec.integer else None
    if high is not None:
        bounds["lt" if spec.high_open else "le"] = high
    if not spec.integer:
        bounds["allow_inf_nan"] = False
    return Field(default=default, **bounds, **field)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; requests beyond these get a 4xx before any work starts (see docs/serving.md)."""

    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 8
    max_n: int = 8
    max_tokens: int = 1024
    max_image_n: int = 4
    max_image_side: int = 1024


class OpenAIError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.error_type, self.code = message, param, status, error_type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # unknown fields are refused (OpenAI answers "Unrecognized request argument"), so a typo is never ignored; values
    # are taken as their JSON type only (strict): `"n": true` or `"n": "2"` is refused, not read as 1 or 2
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = ranged(POSITIVE_INT)
    max_completion_tokens: int | None = ranged(POSITIVE_INT)
    temperature: float = ranged(TEMPERATURE, 1.0)
    top_p: float = ranged(TOP_P, 1.0)
    n: int = ranged(POSITIVE_INT, 1)
    seed: int | None = ranged(SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # LaVIT's knobs (extra body fields)
    top_k: int = ranged(NON_NEGATIVE_INT, 0, description="sample among the k most likely tokens (0: off)")
    image_max_tokens: int | None = ranged(IMAGE_TOKEN_BUDGET,
                                          description="visual token budget per image (top-k patches); default: the "
                                                     "model's selector decides, as in the paper")

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]


class ImageGenerationRequest(Strict):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = ranged(POSITIVE_INT, 1)
    size: str = Field(default="auto", pattern=r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")
    response_format: Literal["b64_json"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # LaVIT's knobs (extra body fields)
    seed: int | None = ranged(SEED)
    guidance_scale: float | None = ranged(GUIDANCE, description="LM classifier-free guidance (official 4.0)")
    decoder_guidance_scale: float | None = ranged(GUIDANCE, description="pixel decoder guidance (official 7.0)")
    num_inference_steps: int | None = ranged(STEPS)
    image_max_tokens: int | None = ranged(IMAGE_TOKEN_BUDGET, description="at most this many visual tokens")

    def pixel_size(self) -> tuple[int, int] | None:
        """(height, width), or None for the decoder's own size."""
        if self.size == "auto":
            return None
        width, height = (int(side) for side in self.size.split("x"))
        return height, width


def check_limits(request: ChatCompletionRequest | ImageGenerationRequest, limits: ServeLimits) -> None:
    """The operator's limits on one request, before any work starts (images are checked as they are read)."""
    if isinstance(request, ImageGenerationRequest):
        if request.n > limits.max_image_n:
            raise OpenAIError(f"n must be at most {limits.max_image_n} on this server, got {request.n}", "n")
        size = request.pixel_size()
        if size is not None and max(size) > limits.max_image_side:
            raise OpenAIError(f"size must be at most {limits.max_image_side} pixels a side, got {request.size}",
                              "size")
        return
    if request.n > limits.max_n:
        raise OpenAIError(f"n must be at most {limits.max_n} on this server, got {request.n}", "n")
    limit = request.new_token_limit()
    if limit is not None and limit > limits.max_tokens:
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise OpenAIError(f"{name} must be at most {limits.max_tokens} on this server, got {limit}", name)
    if len(request.stop_strings()) > 4:
        raise OpenAIError("stop takes at most 4 sequences", "stop")
    images = sum(isinstance(part, ImagePart) for message in request.messages
                 if not isinstance(message.content, str) for part in message.content)
    if images > limits.max_images_per_request:
        raise OpenAIError(f"at most {limits.max_images_per_request} images per request on this server, got {images}",
                          "messages")


def error_param(location: tuple) -> str | None:
    """pydantic's error location as an OpenAI `param`: `("body", "messages", 0, "content", "list[tagged-union[...]]",
    1, "image_url", "image_url", "url")` -> `messages[0].content[1].image_url.url`. The markers pydantic adds for
    unions (`str`, `list[...]`) and the tag of a tagged union's member are dropped."""
    text, tag_next = "", False
    for item in location[1:] if location[:1] == ("body",) else location:
        if isinstance(item, int):
            text += f"[{item}]"
        elif "tagged-union" in item:
            tag_next = True
            continue
        elif tag_next:  # the member's tag (`image_url`), right after its index
            tag_next = False
            continue
        elif any(mark in item for mark in "[]-") or item in ("str", "int", "float", "bool"):
            continue
        else:
            text += f".{item}" if text else item
    return text or None


# the request fields an operator's `ServeLimits` bounds further (`check_limits`), and the limit of each
SERVER_LIMITS = {
    ChatCompletionRequest: {"n": "max_n", "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens"},
    ImageGenerationRequest: {"n": "max_image_n"},
}
BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def field_range(model: type[BaseModel], name: str, limits: ServeLimits) -> str | None:
    """The values field `name` of `model` takes on this server, in words (`an integer in [1, 1024]`): its declared
    range, bounded by the operator's limit where it has one; int64's bound, a property of the wire format and not of
    the setting, is left out. None for a field that is not a number."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    bounds = {name: getattr(item, name) for item in field.metadata for name in ("ge", "gt", "le", "lt")
              if type(item).__name__ == name.capitalize()}  # annotated_types' Ge(ge=1), Lt(lt=2), ...
    if not bounds:
        return None
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    high = None if high == INT64_MAX else high
    limit = SERVER_LIMITS.get(model, {}).get(name)
    if limit is not None:
        high = getattr(limits, limit) if high is None else min(high, getattr(limits, limit))
    integer = int in (getattr(field.annotation, "__args__", None) or (field.annotation,))
    return Range(low, high, integer=integer, low_open="gt" in bounds, high_open="lt" in bounds and
                 high == bounds.get("lt")).describe()


def validation_message(error: dict, param: str | None, allowed: str | None = None) -> str:
    """pydantic's error as one line naming what is wrong: an empty body, a missing parameter (as OpenAI words it),
    a number out of range (`allowed`: the field's range on this server, [`field_range`]), or the parameter and
    pydantic's reason ("the body" when the body itself is wrong, e.g. a list)."""
    if error["type"] == "missing":
        return (f"Missing required parameter: '{param}'" if param else
                "the request has no body: send its parameters as a JSON object")
    if error["type"] in BOUND_ERRORS and allowed is not None:
        return f"{param} must be {allowed}, got {error['input']!r}"
    return f"{param or 'the body'}: {error['msg']}"


def most_specific(errors: list[dict]) -> dict:
    """Of pydantic's errors for one body, the one deepest in the body: for a list given where a union allows a
    string or a list, the error inside the list, not "should be a valid string"."""
    return max(errors, key=lambda error: len(error["loc"]))


def completion_choice(index: int, text: str, finish_reason: str) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
