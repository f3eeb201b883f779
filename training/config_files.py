"""A training stage's config file (`lavit train run.yaml`, `python -m lavit.training.finetune run.json`): its keys are
the stage's flags, and each value reaches the dataclasses as that flag would give it. The file is turned into the flag
tokens `--key=text` and read by the stage's own parser (types, choices, declared ranges, required and unknown flags, a
mistyped name with the closest one), so a config file cannot mean what its flags do not: `"bf16": "no"` once was the
truthy string "no", YAML 1.1 read `eval_strategy: no` as False and `max_steps: 010` as 8.

A YAML scalar is read as the text written (`010`, `no`, `2024-01-01` reach the flag as typed); a null (`~`, `null`,
an empty value) leaves the key out, as if it were not there. Only a value no flag token can carry is passed as is: a
mapping (`lr_scheduler_kwargs`, `deepspeed`), or a list for a field declared a list that takes one token
(`report_to: [tensorboard, wandb]`).
"""

import argparse
import json
import re
import typing
from pathlib import Path

import yaml
from lavit.modeling.saving_lavit import loads_json
from transformers.hf_argparser import string_to_bool

from lavit.command_inputs import CommandError

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# YAML 1.1's words for booleans that `string_to_bool` does not read: files written for PyYAML's booleans use them
YAML_SWITCHES = {"on": "true", "off": "false"}
NULL_TAG = "tag:yaml.org,2002:null"
SEVERAL_VALUES = ("+", "*")
FLAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class ConfigFileError(CommandError, ValueError):
    """A config file that cannot be read, or a value in it that no flag could say: the command's one error line."""


def is_config_file(args: list[str]) -> bool:
    """Whether a stage's arguments are one config file (`run.yaml`, `RUN.JSON`; not a flag such as
    `--deepspeed=ds.json`)."""
    return len(args) == 1 and not args[0].startswith("-") and args[0].lower().endswith(CONFIG_SUFFIXES)


class _Yaml12(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for booleans and numbers (the loader of values given as
    mappings): only true/false are booleans; `010` is 10, `0o10` 8, `0x10` 16, `1e-6` a float; 1.1's sexagesimal
    `1:30`, `1_000` and dates stay text."""


_Yaml12.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag.rsplit(":", 1)[1] not in ("bool", "int", "float",
                                                                                          "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Yaml12.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Yaml12.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


def _yaml12_float(loader, node) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_Yaml12.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
_Yaml12.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def read_config_file(path: str) -> dict:
    """`path`'s keys and values, nulls left out: a YAML scalar (and each scalar of a list) as the text written, a
    mapping as YAML 1.2 reads it; a JSON file as parsed.

    Raises:
        ConfigFileError: not a readable UTF-8 file, not JSON or YAML, or not a mapping of flag names (naming the file).
    """
    file = Path(path)
    if file.is_dir():
        raise ConfigFileError(f"{path} is a folder, not a config file")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such config file") from None
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    try:
        values = loads_json(text, object_pairs_hook=lambda pairs: _json_object(pairs, path)) if path.lower().endswith(
            ".json") else _yaml_as_written(text, path)
    except (json.JSONDecodeError, yaml.YAMLError) as error:  # (a file's other problems name themselves)
        kind = "JSON" if path.lower().endswith(".json") else "YAML"
        raise ConfigFileError(f"{path} is not valid {kind}: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigFileError(f"{path} holds a {type(values).__name__}, not a mapping of flag names to values")
    return {key: value for key, value in values.items() if value is not None}


def _add_once(values: dict, key, value, path: str) -> None:
    """`values[key] = value` for a key of a config file (JSON or YAML) not given before (a later null would silently
    undo the first value)."""
    if key in values:
        raise ConfigFileError(f"{path}: {key} is given twice")
    values[key] = value


def _json_object(pairs: list, path: str) -> dict:
    values = {}
    for key, value in pairs:  # every object of the file, nested ones (a `deepspeed` mapping) too
        _add_once(values, key, value, path)
    return values


def _yaml_as_written(text: str, path: str) -> dict | None:
    loader = _Yaml12(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if not isinstance(node, yaml.MappingNode):
            return loader.construct_document(node)  # refused by the caller, naming what it holds
        loader.flatten_mapping(node)  # `<<: *anchor` merges
        values = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigFileError(f"{path}: {key!r} is not a flag name")
            if isinstance(value_node, yaml.ScalarNode):
                value = None if value_node.tag == NULL_TAG else value_node.value
            elif isinstance(value_node, yaml.SequenceNode) and all(
                    isinstance(item, yaml.ScalarNode) for item in value_node.value):
                value = [None if item.tag == NULL_TAG else item.value for item in value_node.value]
            else:
                value = loader.construct_object(value_node, deep=True)
            _add_once(values, key, value, path)
        return values
    finally:
        loader.dispose()


def config_arguments(parser, path: str) -> tuple[list[str], dict]:
    """The flag tokens of the config file `path` for `parser` (a `LaVITArgumentParser`), and the values no token can
    carry, by field name (a mapping, or a list for a field declared a list whose flag takes one token).

    Raises:
        ConfigFileError: the file cannot be read ([`read_config_file`]), or a list or mapping for a flag that takes
            one plain value.
    """
    tokens, direct, given = [], {}, {}
    for key, value in read_config_file(path).items():
        flag = f"--{key}"
        action = parser._option_string_actions.get(flag)
        if not FLAG_NAME.match(key):  # `--key=text` must be the flag `key` (a key "a=b" would be the flag a)
            raise ConfigFileError(f"{path}: {key!r} is not a flag name (letters, digits, _ and -)")
        if action is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            tokens.append(f"--{key}={_as_text(value)}")  # not a setting: the parser names it, with the closest flag
            continue
        if action.dest in given:  # `max_steps` and `max-steps`, or `bf16` and `no_bf16`: one setting, said twice
            raise ConfigFileError(f"{path}: {key} and {given[action.dest]} set the same flag: keep one")
        given[action.dest] = key
        several = action.nargs in SEVERAL_VALUES or (isinstance(action.nargs, int) and action.nargs > 0)
        if isinstance(value, list):
            _check_items(path, key, value, several)
        if isinstance(value, list) and several:
            tokens += [flag, *(_as_text(item, action) for item in value)]
        elif isinstance(value, (dict, list)):
            if not _field_takes(parser, action.dest, type(value)):
                kind = "a mapping" if isinstance(value, dict) else "a list"
                raise ConfigFileError(f"{path}: {key}: {kind}, but {flag} takes one value")
            direct[action.dest] = value
        elif action.nargs == 0:  # `--no_X`: on or absent
            try:
                if string_to_bool(_as_text(value, action)):
                    tokens.append(flag)
            except argparse.ArgumentTypeError as error:
                raise ConfigFileError(f"{path}: {key}: {error}") from None
        else:
            tokens.append(f"{flag}={_as_text(value, action)}")
    return tokens, direct


def _check_items(path: str, key: str, items: list, several: bool) -> None:
    """The items of a list value: plain values (no null, list or mapping); for a flag of several values, none that
    starts with a dash (each item is a token of its own, which argparse would read as a flag)."""
    for item in items:
        if item is None or isinstance(item, (list, dict)):
            raise ConfigFileError(f"{path}: {key}: the item {item!r} is not a plain value")
        if several and str(item).startswith("-"):
            raise ConfigFileError(f"{path}: {key}: the item {item!r} starts with a dash, which a flag of several "
                                  f"values reads as another flag")


def _as_text(value, action=None) -> str:
    """`value` as a flag's text: JSON's true/false/numbers as written on a command line, YAML's on/off for a boolean
    flag (or a `--no_X` one) as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    text = str(value)
    if action is not None and (action.type is string_to_bool or action.nargs == 0):
        return YAML_SWITCHES.get(text.lower(), text)
    return text


def _field_takes(parser, name: str, kind: type) -> bool:
    """Whether the dataclass field `name` of `parser` is declared to hold a `kind` (dict or list) value."""
    for dataclass_type in parser.dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        if name in hints:
            options = typing.get_args(hints[name]) or (hints[name],)
            return any(option is kind or typing.get_origin(option) is kind for option in options)
    return False
