"""Declared ranges of LaVIT's settings and the resource checks made before memory is touched.

One spec per argument: a [`Range`] (numbers) or a [`Choice`] (names). The same object is the argparse `type=` of a
command-line flag and the checker of a Python value (a config field, a keyword argument, a training argument read
from a config file), and its message always names the argument, its range and the value:
`num_hidden_layers must be an integer >= 1, got -1`.

[`check_generation_budget`] bounds what a generation request will allocate (the model's context length, then the
KV cache against the memory there is) from the resolved lengths, before the first forward pass.

This file is copied flat into Hub folders with the model code: standard library and torch only.
"""

import argparse
import difflib
import functools
import inspect
import math
import numbers
import os
import re
from dataclasses import dataclass

# the largest count any setting takes: sizes and steps must fit torch's int64 (and numpy's) without overflow
INT64_MAX = 2**63 - 1
# what torch.manual_seed, numpy and random all accept as a seed
SEED_MAX = 2**32 - 1


def _as_python_number(value):
    """A one-element tensor or numpy scalar as a Python number; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _bound(value: float) -> str:
    if isinstance(value, numbers.Integral) or (float(value).is_integer() and abs(value) < 1e16):
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Range:
    """
    A finite number in `[low, high]` (either bound open with `low_open` / `high_open`; `None`: unbounded), an
    integer with `integer=True` (bounded by int64 unless `high` says less), or one of the sentinel values `also`
    (e.g. `-1` for "unset"). `optional` lets `None` through (a field whose default is "unset").

    Used as `type=` of argparse (`Range(1, integer=True)("-1")` raises `argparse.ArgumentTypeError`, which argparse
    prints after the flag's name) and as a checker (`check(name, value)` raises `ValueError`).
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    also: tuple = ()
    note: str = ""
    integer_from: float | None = None  # values from here on must be whole (a share below 1, a count from 1 on)

    @property
    def __name__(self) -> str:  # argparse names a type by its `__name__` in some messages
        return self.describe()

    def describe(self) -> str:
        """`an integer >= 1`, `a number in (0, 1]`, `an integer in [0, 4294967295] (...)`."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = self.low, self.high  # integers are also bounded by int64, too large to be worth stating
        if low is not None and high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {opening}{_bound(low)}, {_bound(high)}{closing}"
        elif low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_bound(low)}"
        elif high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_bound(high)}"
        else:
            text = kind
        if self.integer_from is not None:
            text += f", whole from {_bound(self.integer_from)} on"
        if self.also:
            text += f", or {' or '.join(_bound(value) for value in self.also)}"
        if self.optional:
            text += ", or None"
        return f"{text} ({self.note})" if self.note else text

    def contains(self, value) -> bool:
        """Whether the Python value `value` is allowed (bools are not numbers here)."""
        value = _as_python_number(value)
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value) or (self.integer and not -INT64_MAX - 1 <= value <= INT64_MAX):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.integer_from is not None and value >= self.integer_from and not float(value).is_integer():
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def exceeded(self, value) -> str:
        """The bound an out-of-range `value` passes that `describe` leaves out (an integer's int64 bound), as
        ` (at most N)` / ` (at least N)`; empty when `describe` states it: every refusal of a too-large (or too
        small) value names the bound it exceeded."""
        value = _as_python_number(value)
        if not self.integer or isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return ""
        if value > INT64_MAX and self.high is None:
            return f" (at most {INT64_MAX}, the int64 limit)"
        if value < -INT64_MAX - 1 and self.low is None:
            return f" (at least {-INT64_MAX - 1}, the int64 limit)"
        return ""

    def check(self, name: str, value):
        """`value` (a one-element tensor as a number) when allowed, else a `ValueError` naming `name` and the range."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}{self.exceeded(value)}")
        return _as_python_number(value)

    def __call__(self, text: str):
        """argparse `type=`: the flag's text as an int or float in range."""
        try:
            value = int(text) if self.integer else float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}{self.exceeded(value)}")
        return value


@dataclass(frozen=True)
class Choice:
    """One of `choices` (names, or `(True, False)` for a flag; `optional`: or None); as argparse `type=` and as a
    checker, like [`Range`]."""

    choices: tuple
    optional: bool = False

    @property
    def __name__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        return f"one of {list(self.choices)}" + (" or None" if self.optional else "")

    def contains(self, value) -> bool:
        """Whether `value` is one of the choices, of the same type (`1` is not `True`)."""
        if value is None:
            return self.optional
        return any(type(value) is type(choice) and value == choice for choice in self.choices)

    def check(self, name: str, value):
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def __call__(self, text: str):
        if not self.contains(text):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return text


@dataclass(frozen=True)
class Each:
    """A list (or tuple) whose every item is in `spec` (`image_std`, `prompt_projection_sizes`); `length` if fixed."""

    spec: Range | Choice
    length: int | None = None

    def describe(self) -> str:
        count = f"{self.length} " if self.length else ""
        return f"a list of {count}items, each {self.spec.describe()}"

    def contains(self, value) -> bool:
        return (isinstance(value, (list, tuple)) and (self.length is None or len(value) == self.length)
                and all(self.spec.contains(item) for item in value))

    def check(self, name: str, value):
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        for index, item in enumerate(value):
            self.spec.check(f"{name}[{index}]", item)
        return value


# the common ranges, named once
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE_FLOAT = Range(0, low_open=True)
NON_NEGATIVE_FLOAT = Range(0)
PROBABILITY = Range(0, 1)
OPEN_FRACTION = Range(0, 1, low_open=True)  # a share that cannot be empty: (0, 1]
GUIDANCE_SCALE = Range(1, note="1 turns guidance off")
EPSILON = Range(0, 1, low_open=True)
SEED = Range(0, SEED_MAX, integer=True, note="what torch, numpy and random accept")
SHARE_OR_COUNT = Range(0, integer_from=1, note="a share below 1, a count from 1 on, 0 for none")


def check_fields(owner, specs: dict) -> None:
    """Checks every attribute of `owner` named in `specs` ({name: Range | Choice | Each})."""
    for name, spec in specs.items():
        spec.check(name, getattr(owner, name))


# the ranges of the fields of a config LaVIT holds but does not define (the language model's `text_config`, the
# diffusers configs of the pixel decoder), by name; every other number in them must be finite
NESTED_FIELD_RANGES = (
    (re.compile(r"^(vocab_size|hidden_size|intermediate_size|num_hidden_layers|num_attention_heads|"
                r"num_key_value_heads|max_position_embeddings|head_dim|num_train_timesteps|sample_size|"
                r"layers_per_block|(in|out|latent)_channels|norm_num_groups|cross_attention_dim|block_out_channels|"
                r"attention_head_dim|transformer_layers_per_block|addition_time_embed_dim|"
                r"projection_class_embeddings_input_dim)$"), POSITIVE_INT),
    (re.compile(r"(^|_)(eps|epsilon)$"), EPSILON),
    (re.compile(r"dropout|pdrop"), PROBABILITY),
    (re.compile(r"^(rope_theta|scaling_factor)$"), POSITIVE_FLOAT),
    (re.compile(r"^initializer_range$"), NON_NEGATIVE_FLOAT),
)
FINITE = Range()


def check_nested_config(name: str, settings) -> None:
    """Checks every number of a nested config (`settings`: its dict, or the config object) by the rules of
    `NESTED_FIELD_RANGES`, nested dicts and lists included: `text_config.rms_norm_eps must be a finite number in
    (0, 1], got nan`. `None` (unset) is left alone."""
    if hasattr(settings, "to_dict"):
        settings = settings.to_dict()
    for key, value in settings.items():
        path = f"{name}.{key}"
        spec = next((spec for pattern, spec in NESTED_FIELD_RANGES if pattern.search(str(key))), FINITE)
        if isinstance(value, dict):
            check_nested_config(path, value)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if (isinstance(item, (int, float)) and not isinstance(item, bool)) or spec is not FINITE:
                    spec.check(f"{path}[{index}]", item)
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (spec is not FINITE
                                                                                  and value is not None):
            spec.check(path, value)  # a number, or anything else where a number is declared ("abc", true)


def check_arguments(specs: dict, values: dict) -> None:
    """Checks the keyword arguments in `values` that `specs` declares (a missing or `None` one is left to its
    default)."""
    for name, spec in specs.items():
        if values.get(name) is not None:
            spec.check(name, values[name])


# ------------------------------------------------------------------------------------------------ resources


def available_memory(device=None) -> int | None:
    """Bytes a new allocation on `device` can take: free CUDA memory (with what torch's allocator caches), or
    elsewhere the smaller of the memory the system has available and what the address-space limit of this process
    (`RLIMIT_AS`) leaves; `None` if unknown."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        # free memory of the device, plus what torch's caching allocator holds without using
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(max(0, soft - _address_space_in_use()))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def _address_space_in_use() -> int:
    """Virtual memory this process already maps (what `RLIMIT_AS` counts)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def check_memory(request: str, needed_bytes: int, device=None, hint: str = "") -> None:
    """A `MemoryError` naming `request` when `needed_bytes` exceed the memory `available_memory` finds."""
    available = available_memory(device)
    if available is not None and needed_bytes > available:
        raise MemoryError(f"{request} needs about {needed_bytes / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB "
                          f"are available{'; ' + hint if hint else ''}")


def kv_cache_bytes(text_config, rows: int, length: int, dtype_bytes: int) -> int:
    """Bytes of the keys and values of `rows` sequences of `length` tokens in every layer of `text_config`'s LM."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * rows * length * dtype_bytes


def unknown_names(given, known) -> list[str]:
    """The names of `given` that are not `known`, each with the closest known name when there is one:
    `["'image_selecton' (did you mean 'image_selection'?)"]`."""
    known = sorted(known)
    return [f"{name!r}" + (f" (did you mean {matches[0]!r}?)" if matches else "")
            for name in sorted(set(given) - set(known))
            for matches in [difflib.get_close_matches(name, known, n=1, cutoff=0.6)]]


def keyword_names(function) -> set[str]:
    """The parameters of `function` that can be given by name."""
    return {name for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}


def check_keywords(caller, given, known=()) -> None:
    """
    The keyword arguments `given` to `caller` (the method the user called, e.g. `pipe.reconstruct`) that it passes on
    through `**kwargs` must be `known` (what it passes them to takes); raises `TypeError` as Python words it, naming
    `caller` (not the method it forwards to) and, for each unknown name, the closest name it takes.
    """
    known = set(known) | keyword_names(caller)
    unknown = unknown_names(given, known)
    if unknown:
        owner = getattr(caller, "__self__", None)
        name = f"{type(owner).__name__}.{caller.__name__}" if owner is not None else caller.__qualname__
        raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                        f"{sorted(known)}")


# how close a name passed on must be to one of a `forward`'s own parameters to be taken for its typo: every keyword
# transformers passes models (`TransformersKwargs`, `num_items_in_batch`, `output_attentions`, ...) is further than this
# from every LaVIT parameter name (`pixel_attention_mask` / `attention_mask`, the nearest, is 0.75)
TYPO_SIMILARITY = 0.85


@functools.lru_cache(maxsize=4096)
def _typo_of(functions: tuple, name: str) -> str | None:
    own = sorted(set().union(*(keyword_names(function) for function in functions)))
    matches = [] if name in own else difflib.get_close_matches(name, own, n=1, cutoff=TYPO_SIMILARITY)
    return matches[0] if matches else None


def refuse_typos(caller, given, passed_to=None) -> None:
    """
    The keyword arguments `given` that `caller` (a `forward`) passes on, to its `passed_to` (a LaVIT `forward`) or to
    transformers, whose models take any name (`**kwargs: Unpack[TransformersKwargs]`) and drop the ones they do not
    use: a name a letter or two away from a parameter of `caller` or `passed_to` (`imge_selection`) would be dropped
    in silence, and the image selection with it, so it is refused as Python refuses an unknown keyword, naming
    `caller` and the parameter meant. Every other name passes on.
    """
    functions = tuple(getattr(function, "__func__", function) for function in (caller, passed_to) if function)
    typos = [f"{name!r} (did you mean {meant!r}?)" for name in sorted(given)
             for meant in [_typo_of(functions, name)] if meant is not None]
    if typos:
        owner = getattr(caller, "__self__", None)
        name = f"{type(owner).__name__}.{caller.__name__}" if owner is not None else caller.__qualname__
        raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(typos)}")


def room_advice(flag: str, context: int, taken: int, taken_by: str, shorter: str, also: str = "") -> str:
    """The fix when `taken` tokens (of `taken_by`) plus what `flag` asks for exceed a `context`: the largest `flag`
    that fits, or, when `taken_by` alone leaves no room for one token, how long it is and what to shorten (never a
    bound of 0 or below)."""
    if context - taken >= 1:
        return f"give {flag} <= {context - taken}{also}"
    return (f"{taken_by} alone is {taken} tokens, which leaves no room in the context of {context} for any "
            f"{flag}: give {shorter} (at most {context - 1} tokens, to leave room for one)")


def check_generation_budget(
    text_config, prompt_length: int, max_new_tokens: int, rows: int, dtype_bytes: int = 4, device=None,
    what: str = "generate", given_length: int | None = None,
) -> None:
    """
    Bounds a generation request before anything is allocated. `prompt_length`: tokens of the (longest) prompt as the
    LM sees them (visual tokens included once known); `max_new_tokens`: the most tokens it may add; `rows`: sequences
    decoded at once (batch x beams x returned sequences, or the guidance batch of image generation).

    Raises `ValueError` when `prompt_length + max_new_tokens` exceeds the LM's context length
    (`max_position_embeddings`), and `MemoryError` when the KV cache of that request does not fit the memory there is.
    `given_length`: the prompt's length in the ids the caller gave, when its images were expanded into their visual
    tokens since (the message counts both, so the numbers add up for the caller).
    """
    POSITIVE_INT.check("max_new_tokens", max_new_tokens)
    POSITIVE_INT.check("rows", rows)
    context = getattr(text_config, "max_position_embeddings", None)
    total = prompt_length + max_new_tokens
    if context is not None and total > context:
        visual = prompt_length - given_length if given_length is not None else 0
        counted = (f" ({given_length} given ids + {visual} for its images' visual tokens, [IMG] and [/IMG], as the "
                   f"language model reads them)" if visual > 0 else "")
        fewer = " or fewer visual tokens (image_selection={'max_tokens': N})" if visual > 0 else ""
        raise ValueError(
            f"{what}: a prompt of {prompt_length} tokens{counted} + max_new_tokens={max_new_tokens} is {total} "
            f"tokens, more than the model's context length of {context} (max_position_embeddings): "
            + room_advice("max_new_tokens", context, prompt_length, "the prompt", f"a shorter prompt{fewer}", fewer)
        )
    check_memory(f"{what} ({rows} sequences of up to {total} tokens: the KV cache)",
                 kv_cache_bytes(text_config, rows, total, dtype_bytes), device,
                 "use fewer beams, a smaller batch or max_new_tokens")


def floating_dtype(value, argument: str, optional: bool = False):
    """`value`, a `torch.dtype` a model can compute in or its name ("bfloat16", "torch.bfloat16", "half") -> the
    `torch.dtype`; with `optional`, None (not given) -> None. Anything else ("", another name, float8, an integer
    dtype, a number) is a `ValueError` naming `argument`. The one reader of the dtype names users give (flags,
    `model_args`, `from_pretrained`): an empty value is a mistake, never "the default"."""
    import torch

    if value is None and optional:
        return None
    found = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if found in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return found
    raise ValueError(f"{argument} must be float32, bfloat16, float16 or float64 (a torch dtype or its name), got "
                     f"{value!r}")


__all__ = [
    "Choice", "Each", "Range", "SEED", "check_arguments", "check_fields", "check_nested_config",
    "check_generation_budget", "check_keywords", "check_memory", "floating_dtype", "keyword_names", "refuse_typos",
    "room_advice", "unknown_names",
]
