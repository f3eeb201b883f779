"""The request models, limits and error helpers of `lavit.serving.schemas`, called directly (no app): field bounds
from `ranged`, the request models' own methods, `check_limits` at and past each limit, and how pydantic's errors
become an OpenAI `param` and message (`error_param`, `field_range`, `validation_message`, `most_specific`)."""

import pytest
from lavit.modeling.validation_lavit import INT64_MAX, SEED, Range
from pydantic import ValidationError, create_model

from lavit.serving.schemas import (
    ChatCompletionRequest,
    ImageGenerationRequest,
    OpenAIError,
    ServeLimits,
    check_limits,
    completion_choice,
    error_param,
    field_range,
    most_specific,
    ranged,
    usage,
    validation_message,
)

LIMITS = ServeLimits(max_images_per_request=2, max_n=3, max_tokens=16, max_image_n=2, max_image_side=64)


def chat(content="a photo", **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": content}], **fields)


def image_parts(count: int) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": "data:,"}} for _ in range(count)]


def refusal(request, limits=LIMITS) -> OpenAIError:
    with pytest.raises(OpenAIError) as raised:
        check_limits(request, limits)
    assert raised.value.status == 400 and raised.value.message
    return raised.value


def ranged_field(spec: Range):
    return create_model("Ranged", value=(int if spec.integer else float, ranged(spec)))


@pytest.mark.parametrize(("spec", "inside", "outside"), [
    (Range(1, 5, integer=True), [1, 5], [0, 6]),
    (Range(0, 1, low_open=True, high_open=True), [1e-9, 0.999], [0.0, 1.0]),
    (Range(1, integer=True), [1, INT64_MAX], [0, INT64_MAX + 1]),  # an integer bounded by int64: what torch takes
    (Range(0), [0.0, 1e300], [-1e-9, float("inf"), float("nan")]),  # a float must be finite
])
def test_ranged_fields_take_exactly_their_range(spec, inside, outside):
    model = ranged_field(spec)
    for value in inside:
        assert model(value=value).value == value
    for value in outside:
        with pytest.raises(ValidationError, match="value"):
            model(value=value)


def test_a_float_field_refuses_nan_and_infinity():
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="temperature"):
            chat(temperature=value)


def test_the_new_token_limit_prefers_max_completion_tokens():
    assert chat().new_token_limit() is None
    assert chat(max_tokens=5).new_token_limit() == 5
    assert chat(max_tokens=5, max_completion_tokens=7).new_token_limit() == 7


def test_stop_strings_are_a_list_without_empty_ones():
    assert chat().stop_strings() == []
    assert chat(stop="END").stop_strings() == ["END"]
    assert chat(stop="").stop_strings() == []
    assert chat(stop=["a", "", "b"]).stop_strings() == ["a", "b"]


def test_pixel_size_is_height_then_width():
    assert ImageGenerationRequest(prompt="a cat").pixel_size() is None
    assert ImageGenerationRequest(prompt="a cat", size="64x32").pixel_size() == (32, 64)
    for size in ("0x5", "64X32", "64x", "x64", "-1x5", "1.5x2"):
        with pytest.raises(ValidationError, match="size"):
            ImageGenerationRequest(prompt="a cat", size=size)


def test_an_empty_prompt_and_an_empty_message_list_are_refused():
    with pytest.raises(ValidationError, match="prompt"):
        ImageGenerationRequest(prompt="")
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest(model="m", messages=[])


def test_chat_limits_pass_at_the_limit_and_are_refused_past_it():
    check_limits(chat(image_parts(2), n=3, max_tokens=16, stop=list("abcd")), LIMITS)
    error = refusal(chat(n=4))
    assert error.param == "n" and "at most 3" in error.message and "got 4" in error.message
    assert refusal(chat(max_tokens=17)).param == "max_tokens"
    # the field that set the limit is named, even when the other one is in range
    error = refusal(chat(max_tokens=2, max_completion_tokens=17))
    assert error.param == "max_completion_tokens" and "got 17" in error.message
    assert refusal(chat(stop=list("abcde"))).param == "stop"


def test_images_are_counted_across_every_message():
    messages = [{"role": "user", "content": image_parts(2)}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": [*image_parts(1), {"type": "text", "text": "and this"}]}]
    error = refusal(ChatCompletionRequest(model="m", messages=messages))
    assert error.param == "messages" and "got 3" in error.message
    check_limits(ChatCompletionRequest(model="m", messages=messages[:2]), LIMITS)


def test_image_limits_bound_n_and_the_largest_side():
    check_limits(ImageGenerationRequest(prompt="a cat", n=2, size="64x64"), LIMITS)
    assert refusal(ImageGenerationRequest(prompt="a cat", n=3)).param == "n"
    for size in ("65x8", "8x65"):
        error = refusal(ImageGenerationRequest(prompt="a cat", size=size))
        assert error.param == "size" and size in error.message


def test_an_openai_error_body_has_the_four_fields():
    error = OpenAIError("too big", "n", status=413, code="too_big")
    assert str(error) == "too big" and error.status == 413
    assert error.body() == {"error": {"message": "too big", "type": "invalid_request_error", "param": "n",
                                      "code": "too_big"}}


@pytest.mark.parametrize(("location", "param"), [
    (("body", "temperature"), "temperature"),
    (("body", "messages", 0, "content", "str"), "messages[0].content"),
    (("body", "messages", 0, "content", "list[tagged-union[TextPart,ImagePart]]", 1, "image_url", "image_url", "url"),
     "messages[0].content[1].image_url.url"),
    (("body", "stop", "list[str]", 2), "stop[2]"),
    (("body",), None),
    (("query", "x"), "query.x"),
])
def test_error_param_names_the_field_as_openai_does(location, param):
    assert error_param(location) == param


def test_field_range_bounds_the_declared_range_by_the_servers_limit():
    assert field_range(ChatCompletionRequest, "max_tokens", LIMITS) == "an integer in [1, 16]"
    assert field_range(ImageGenerationRequest, "n", LIMITS) == "an integer in [1, 2]"
    assert field_range(ChatCompletionRequest, "top_p", LIMITS) == "a finite number in (0, 1]"
    assert field_range(ChatCompletionRequest, "seed", LIMITS).startswith(f"an integer in [0, {SEED.high}]")
    # int64's bound is the wire format's, not the setting's: left out
    assert field_range(ChatCompletionRequest, "top_k", LIMITS) == "an integer >= 0"
    assert field_range(ChatCompletionRequest, "model", LIMITS) is None
    assert field_range(ChatCompletionRequest, "no_such_field", LIMITS) is None


def test_validation_message_names_what_is_wrong():
    assert validation_message({"type": "missing", "msg": "Field required"}, "prompt") == \
        "Missing required parameter: 'prompt'"
    assert "has no body" in validation_message({"type": "missing", "msg": "Field required"}, None)
    bound = {"type": "less_than_equal", "msg": "Input should be <= 2", "input": 3}
    assert validation_message(bound, "n", "an integer in [1, 2]") == "n must be an integer in [1, 2], got 3"
    assert validation_message(bound, "n") == "n: Input should be <= 2"  # no range known: pydantic's reason
    assert validation_message({"type": "dict_type", "msg": "Input should be a dict"}, None) == \
        "the body: Input should be a dict"


def test_the_deepest_error_is_the_most_specific():
    errors = [{"loc": ("body", "messages", 0, "content", "str")},
              {"loc": ("body", "messages", 0, "content", "list[x]", 1, "text")}]
    assert most_specific(errors) is errors[1]
    with pytest.raises(ValueError):
        most_specific([])


def test_choices_and_usage_have_the_openai_shape():
    assert completion_choice(2, "hi", "stop") == {"index": 2, "message": {"role": "assistant", "content": "hi"},
                                                  "finish_reason": "stop", "logprobs": None}
    assert usage(7, 3) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
