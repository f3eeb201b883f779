"""validation_lavit.py at unit level: how each spec (Range, Choice, Each) describes itself and names the argument in
its refusal, the checks of nested configs and keyword arguments, the typo and unknown-name suggestions, and the
memory arithmetic of the generation budget."""

import argparse
import types

import numpy as np
import pytest
import torch
from lavit.modeling.validation_lavit import (
    INT64_MAX,
    POSITIVE_INT,
    SEED,
    SHARE_OR_COUNT,
    Choice,
    Each,
    Range,
    check_arguments,
    check_generation_budget,
    check_keywords,
    check_memory,
    check_nested_config,
    floating_dtype,
    keyword_names,
    kv_cache_bytes,
    refuse_typos,
    room_advice,
    unknown_names,
)


@pytest.mark.parametrize("spec, text", [
    (Range(1, integer=True), "an integer >= 1"),
    (Range(0, 1, low_open=True), "a finite number in (0, 1]"),
    (Range(0, 1, high_open=True), "a finite number in [0, 1)"),
    (Range(high=0.5, high_open=True), "a finite number < 0.5"),
    (Range(), "a finite number"),
    (Range(0, integer=True, also=(-1,), optional=True), "an integer >= 0, or -1, or None"),
    (Range(1, note="1 turns guidance off"), "a finite number >= 1 (1 turns guidance off)"),
    (SHARE_OR_COUNT, "a finite number >= 0, whole from 1 on (a share below 1, a count from 1 on, 0 for none)"),
])
def test_a_range_describes_itself_as_its_messages_say_it(spec, text):
    assert spec.describe() == text
    assert spec.__name__ == text  # what argparse prints for a `type=`


def test_a_refusal_names_the_argument_the_range_and_the_value():
    with pytest.raises(ValueError, match=r"^num_hidden_layers must be an integer >= 1, got -1$"):
        POSITIVE_INT.check("num_hidden_layers", -1)
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 4294967295\] .*got 4294967296$"):
        SEED.check("seed", 2**32)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be an integer >= 1, got 'two'$"):
        POSITIVE_INT("two")


def test_a_count_past_int64_names_the_limit_the_description_leaves_out():
    with pytest.raises(ValueError, match=rf"got {INT64_MAX + 1} \(at most {INT64_MAX}, the int64 limit\)"):
        POSITIVE_INT.check("steps", INT64_MAX + 1)
    with pytest.raises(ValueError, match=r"the int64 limit"):
        Range(integer=True).check("offset", -INT64_MAX - 2)
    with pytest.raises(argparse.ArgumentTypeError, match="at most .* the int64 limit"):
        POSITIVE_INT(str(INT64_MAX + 1))
    assert Range(0, 10, integer=True).exceeded(11) == ""  # the description states that bound already
    assert POSITIVE_INT.check("steps", INT64_MAX) == INT64_MAX


def test_one_element_tensors_and_numpy_scalars_are_checked_as_numbers():
    value = POSITIVE_INT.check("rows", torch.tensor(3))
    assert value == 3 and type(value) is int
    assert type(Range(0, 1).check("p", np.float32(0.5))) is float
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got tensor"):
        POSITIVE_INT.check("rows", torch.tensor(0))
    assert not POSITIVE_INT.contains(torch.tensor([1, 2]))  # more than one element is no number


@pytest.mark.parametrize("value", [True, False, float("nan"), float("inf"), "1", None, 1.0])
def test_a_positive_int_takes_no_bool_string_float_or_non_finite_value(value):
    assert not POSITIVE_INT.contains(value)


def test_sentinels_optional_and_integer_from():
    spec = Range(0, 10, integer=True, also=(-1,), optional=True)
    assert spec.contains(-1) and spec.contains(None) and not spec.contains(-2)
    assert SHARE_OR_COUNT.contains(0.5) and SHARE_OR_COUNT.contains(3) and SHARE_OR_COUNT.contains(3.0)
    assert not SHARE_OR_COUNT.contains(2.5)


def test_a_choice_is_of_the_same_type_as_its_choices():
    flag = Choice((True, False))
    assert flag.contains(True) and not flag.contains(1) and not flag.contains("True")
    names = Choice(("exact", "official"), optional=True)
    assert names.contains(None) and not Choice(("exact",)).contains(None)
    assert names.describe() == "one of ['exact', 'official'] or None"
    with pytest.raises(ValueError, match=r"^merger_attention must be one of \['exact', 'official'\] or None, "
                                         r"got 'Exact'$"):
        names.check("merger_attention", "Exact")
    with pytest.raises(argparse.ArgumentTypeError, match="must be one of"):
        names("leaky")
    assert names("exact") == "exact"


def test_each_checks_the_length_and_names_the_item_out_of_range():
    spec = Each(Range(0, low_open=True), 3)
    assert spec.describe() == "a list of 3 items, each a finite number > 0"
    assert spec.check("image_std", (0.2, 0.3, 0.4)) == (0.2, 0.3, 0.4)
    with pytest.raises(ValueError, match=r"^image_std\[1\] must be a finite number > 0, got 0$"):
        spec.check("image_std", [0.2, 0, 0.4])
    with pytest.raises(ValueError, match=r"^image_std must be a list of 3 items, .*got \[0.2\]$"):
        spec.check("image_std", [0.2])
    with pytest.raises(ValueError, match="image_std must be a list"):
        spec.check("image_std", 0.2)
    assert Each(POSITIVE_INT).contains([]) and not Each(POSITIVE_INT).contains([1, 0])


def test_a_nested_config_is_checked_by_name_at_every_depth():
    check_nested_config("text_config", {"hidden_size": 32, "rms_norm_eps": 1e-6, "rope_scaling": None,
                                        "name": "x", "flag": True, "block_out_channels": [8, 16]})
    refusals = {
        "text_config.rope_scaling.factor must be a finite number, got nan": {"rope_scaling": {"factor": float("nan")}},
        r"text_config.block_out_channels\[1\] must be an integer >= 1, got 0": {"block_out_channels": [8, 0]},
        r"text_config.rms_norm_eps must be a finite number in \(0, 1\], got 0": {"rms_norm_eps": 0},
        "text_config.attention_dropout must be a finite number in .0, 1., got 1.5": {"attention_dropout": 1.5},
        "text_config.hidden_size must be an integer >= 1, got 'abc'": {"hidden_size": "abc"},
        "text_config.num_hidden_layers must be an integer >= 1, got True": {"num_hidden_layers": True},
    }
    for message, settings in refusals.items():
        with pytest.raises(ValueError, match=f"^{message}$"):
            check_nested_config("text_config", settings)


def test_a_nested_config_object_is_checked_through_its_dict():
    config = types.SimpleNamespace(to_dict=lambda: {"vocab_size": -5})
    with pytest.raises(ValueError, match="unet_config.vocab_size must be an integer >= 1, got -5"):
        check_nested_config("unet_config", config)


def test_check_arguments_leaves_unset_ones_to_their_default():
    specs = {"max_tokens": POSITIVE_INT, "mode": Choice(("sample",))}
    check_arguments(specs, {"max_tokens": None})
    check_arguments(specs, {"other": -1})  # not declared: not its business
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0"):
        check_arguments(specs, {"max_tokens": 0, "mode": "sample"})


def test_unknown_names_suggest_the_closest_known_one():
    assert unknown_names({"image_selecton": 1, "zzz": 2, "mode": 3}, ["image_selection", "mode"]) == [
        "'image_selecton' (did you mean 'image_selection'?)", "'zzz'"]
    assert unknown_names(["mode"], {"mode"}) == []


def reconstruct(images, image_selection=None, *args, seed=0, **kwargs):
    return kwargs


class Pipe:
    def reconstruct(self, images, image_selection=None, **kwargs):
        check_keywords(self.reconstruct, kwargs, known={"num_inference_steps"})
        return kwargs


def test_keyword_names_are_those_given_by_name():
    assert keyword_names(reconstruct) == {"images", "image_selection", "seed"}


def test_check_keywords_refuses_as_python_does_naming_the_method_called():
    assert Pipe().reconstruct("photo", num_inference_steps=2) == {"num_inference_steps": 2}
    with pytest.raises(TypeError) as error:
        Pipe().reconstruct("photo", imge_selection=1)
    message = str(error.value)
    assert message.startswith("Pipe.reconstruct() got unexpected keyword argument(s) 'imge_selection' (did you mean "
                              "'image_selection'?)")
    assert "num_inference_steps" in message  # what it takes
    with pytest.raises(TypeError, match=r"^reconstruct\(\) got unexpected keyword argument\(s\) 'steps'"):
        check_keywords(reconstruct, {"steps": 1})


def test_refuse_typos_stops_near_misses_and_passes_every_other_name():
    def forward(input_ids=None, pixel_values=None, image_selection=None, **kwargs):
        return kwargs

    refuse_typos(forward, {"output_attentions": True, "num_items_in_batch": 3, "image_selection": 1})
    with pytest.raises(TypeError, match=r"forward\(\) got unexpected keyword argument\(s\) 'imge_selection' "
                                        r"\(did you mean 'image_selection'\?\)"):
        refuse_typos(forward, {"imge_selection": 1})

    def inner(selection_mode=None):
        return selection_mode

    with pytest.raises(TypeError, match="did you mean 'selection_mode'"):
        refuse_typos(forward, {"selection_mod": 1}, passed_to=inner)


def test_room_advice_gives_the_largest_value_that_fits_or_what_to_shorten():
    assert room_advice("max_new_tokens", 100, 60, "the prompt", "a shorter prompt") == "give max_new_tokens <= 40"
    advice = room_advice("max_new_tokens", 100, 100, "the prompt", "a shorter prompt")
    assert advice.startswith("the prompt alone is 100 tokens") and "at most 99 tokens" in advice
    assert "<= 0" not in advice


def test_the_kv_cache_counts_keys_and_values_of_every_layer_and_head():
    config = types.SimpleNamespace(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    assert kv_cache_bytes(config, rows=5, length=7, dtype_bytes=2) == 2 * 3 * 2 * (64 // 8) * 5 * 7 * 2
    config.num_key_value_heads, config.head_dim = None, 16  # no GQA: every head; an explicit head_dim wins
    assert kv_cache_bytes(config, rows=1, length=1, dtype_bytes=4) == 2 * 3 * 8 * 16 * 4


def test_check_memory_refuses_what_no_machine_has_naming_the_request_and_the_fix():
    with pytest.raises(MemoryError, match=r"^decode \(x\) needs about 1048576.0 GiB, but .* GiB are available; "
                                          r"use a smaller batch$"):
        check_memory("decode (x)", 2**50, hint="use a smaller batch")
    check_memory("a byte", 1)


def test_the_generation_budget_counts_the_given_ids_and_the_visual_tokens():
    config = types.SimpleNamespace(max_position_embeddings=64, num_hidden_layers=1, num_attention_heads=1,
                                   hidden_size=4)
    check_generation_budget(config, 60, 4, rows=1)  # exactly the context
    with pytest.raises(ValueError) as error:
        check_generation_budget(config, 60, 5, rows=1, what="caption", given_length=20)
    message = str(error.value)
    assert message.startswith("caption: a prompt of 60 tokens (20 given ids + 40 for its images' visual tokens")
    assert "is 65 tokens, more than the model's context length of 64" in message and "<= 4" in message
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        check_generation_budget(config, 1, 1, rows=0)
    with pytest.raises(MemoryError, match=r"caption \(1000000 sequences of up to 11 tokens: the KV cache\)"):
        huge = types.SimpleNamespace(num_hidden_layers=10**4, num_attention_heads=1, hidden_size=10**4)
        check_generation_budget(huge, 1, 10, rows=10**6, what="caption")


@pytest.mark.parametrize("value, expected", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                             (torch.float32, torch.float32), ("half", torch.float16),
                                             ("float64", torch.float64)])
def test_floating_dtype_reads_a_dtype_or_its_name(value, expected):
    assert floating_dtype(value, "--dtype") is expected


@pytest.mark.parametrize("value", ["float17", "bf16", "int8", torch.int64, 16, None, "Tensor", "", " bfloat16",
                                   "float8_e4m3fn", torch.float8_e5m2, 0])
def test_floating_dtype_refuses_everything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"--dtype must be float32, bfloat16, float16 or float64 .*got"):
        floating_dtype(value, "--dtype")


def test_an_optional_dtype_not_given_is_none_but_an_empty_one_is_refused():
    assert floating_dtype(None, "--dtype", optional=True) is None
    with pytest.raises(ValueError, match="got ''"):
        floating_dtype("", "--dtype", optional=True)
