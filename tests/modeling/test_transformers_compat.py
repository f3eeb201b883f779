"""transformers_compat.py: the supported transformers range and its refusal message, and the helpers that pass the KV
cache under the name the installed release uses (`cache`, or `past_key_values` from older callers)."""

import inspect
import warnings

import pytest
import transformers
from lavit.modeling.transformers_compat import (
    CACHE_NAME,
    LEGACY_CACHE_NAME,
    SUPPORTED_TRANSFORMERS,
    cache_kwargs,
    check_transformers_version,
    output_cache,
    pop_cache,
    takes_cache,
    transformers_requirement,
)
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast


def test_the_requirement_is_the_supported_range_as_a_pip_specifier():
    low, high = SUPPORTED_TRANSFORMERS
    requirement = transformers_requirement()
    assert requirement == f"transformers>={low},<{high}"
    from packaging.requirements import Requirement

    specifier = Requirement(requirement).specifier
    assert str(low) in specifier and str(high) not in specifier


def test_the_installed_transformers_is_in_the_supported_range():
    check_transformers_version()
    check_transformers_version(transformers.__version__)


@pytest.mark.parametrize("installed", ["4.57.1", "5.19.9", "6.0.0", "6.0.0rc1", "7.1.0"])
def test_a_release_outside_the_range_is_refused_naming_both_versions_and_the_fix(installed):
    with pytest.raises(ImportError) as error:
        check_transformers_version(installed)
    message = str(error.value)
    assert f"transformers {Version(installed)} is installed" in message
    assert f"LaVIT needs {transformers_requirement()}" in message
    assert f"pip install '{transformers_requirement()}'" in message


@pytest.mark.parametrize("installed", ["5.20.0", "5.20.0rc1", "5.99.0.dev0", "5.30.1"])
def test_pre_releases_and_dev_builds_count_as_their_release(installed):
    check_transformers_version(installed)  # a dev build of a supported release is that release


def test_the_cache_name_is_the_field_of_the_installed_transformers_outputs():
    fields = CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_NAME in fields
    assert CACHE_NAME == ("cache" if "cache" in fields else LEGACY_CACHE_NAME)
    marker = object()
    assert cache_kwargs(marker) == {CACHE_NAME: marker}
    assert output_cache(CausalLMOutputWithPast(**{CACHE_NAME: marker})) is marker
    assert output_cache(object()) is None  # an output without a cache


def test_pop_cache_takes_either_name_and_removes_the_old_one():
    cache = object()
    kwargs = {LEGACY_CACHE_NAME: cache, "other": 1}
    assert pop_cache(None, kwargs) is cache
    assert kwargs == {"other": 1}
    assert pop_cache(cache, {}) is cache
    assert pop_cache(cache, {LEGACY_CACHE_NAME: cache}) is cache  # the same object under both names is one cache
    assert pop_cache(None, {}) is None


def test_pop_cache_refuses_two_different_caches():
    with pytest.raises(ValueError, match="`cache` or `past_key_values`, not both"):
        pop_cache(object(), {LEGACY_CACHE_NAME: object()})


def forward(self, input_ids=None, cache=None, **kwargs):
    return cache, kwargs


def test_a_decorated_method_gets_the_old_name_as_cache():
    wrapped = takes_cache(forward)
    cache = object()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, kwargs = wrapped(None, past_key_values=cache, extra=2)
        with pytest.raises(ValueError, match="not both"):
            wrapped(None, cache=object(), past_key_values=object())
    assert got is cache and kwargs == {"extra": 2}
    deprecations = [warning for warning in caught if issubclass(warning.category, FutureWarning)]
    assert bool(deprecations) == (CACHE_NAME != LEGACY_CACHE_NAME)


def test_a_decorated_method_shows_the_old_name_only_where_transformers_still_uses_it():
    parameters = inspect.signature(takes_cache(forward)).parameters
    assert ("past_key_values" in parameters) == (CACHE_NAME == LEGACY_CACHE_NAME)
    assert list(parameters)[:3] == ["self", "input_ids", "cache"]
    assert list(parameters)[-1] == "kwargs"  # **kwargs stays last
    assert takes_cache(forward).__name__ == "forward"
