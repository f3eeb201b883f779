"""The one place that knows which transformers release is installed.

transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to `cache` (the old name is
deprecated for inputs and rejected by output dataclasses). LaVIT code uses the current name, `cache`, everywhere and
goes through these helpers where it talks to transformers, so every release in `SUPPORTED_TRANSFORMERS` works.

This file is copied into Hub model folders with the model code, so `check_transformers_version` also guards a
remote-code folder run under a user's transformers: outside the tested range it fails with one clear message instead
of a deep `TypeError`.
"""

import functools
import inspect
import warnings

import transformers
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast

# the tested range; keep in sync with pyproject.toml's `transformers` requirement
SUPPORTED_TRANSFORMERS = (Version("5.20.0"), Version("6.0.0"))

# name of the KV cache in model inputs and outputs of the installed release
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
LEGACY_CACHE_NAME = "past_key_values"


def transformers_requirement() -> str:
    """The supported range as a pip requirement, e.g. `transformers>=5.20.0,<6.0.0` (saved folders state it)."""
    low, high = SUPPORTED_TRANSFORMERS
    return f"transformers>={low},<{high}"


def check_transformers_version(installed: str | None = None):
    """Raises `ImportError` naming the installed and the supported transformers versions when they do not match."""
    installed_version = Version(installed or transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(installed_version.base_version) < high:
        raise ImportError(
            f"LaVIT needs {transformers_requirement()}; transformers {installed_version} is installed. "
            f"Run: pip install '{transformers_requirement()}'"
        )


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the name the installed transformers' models take."""
    return {CACHE_NAME: cache}


def pop_cache(cache, kwargs: dict):
    """The cache given under either name (`cache`, or `past_key_values` from older callers); removes the old name from
    `kwargs`. Raises `ValueError` if both are given."""
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is not None and cache is not None and legacy is not cache:
        raise ValueError("give the KV cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else legacy


def takes_cache(function):
    """Decorator for a method with a `cache` parameter (`forward`, `prepare_inputs_for_generation`): a cache passed as
    `past_key_values` (older transformers, older user code) arrives as `cache`. Where the installed release still calls
    it `past_key_values`, the signature shows that name too, since `generate` validates model kwargs (assisted
    decoding passes the cache by name) against the signatures of these methods."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if LEGACY_CACHE_NAME in kwargs:
            if CACHE_NAME != LEGACY_CACHE_NAME:  # the warning transformers' own models give for the old name
                warnings.warn(f"`{LEGACY_CACHE_NAME}` is deprecated, use `cache` (as transformers' models since 5.24)",
                              FutureWarning, stacklevel=2)
            kwargs["cache"] = pop_cache(kwargs.get("cache"), kwargs)
        return function(*args, **kwargs)

    if CACHE_NAME == LEGACY_CACHE_NAME:
        signature = inspect.signature(function)
        parameters = list(signature.parameters.values())
        last = len(parameters) - (parameters[-1].kind is inspect.Parameter.VAR_KEYWORD)
        legacy = inspect.Parameter(LEGACY_CACHE_NAME, inspect.Parameter.KEYWORD_ONLY, default=None)
        wrapper.__signature__ = signature.replace(parameters=[*parameters[:last], legacy, *parameters[last:]])
    return wrapper


def output_cache(outputs):
    """The KV cache of a transformers model output, whatever the installed release calls it."""
    return getattr(outputs, CACHE_NAME, None)
