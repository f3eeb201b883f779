"""`lavit.training.config_files`: a stage's config file read as the text each value was written in (YAML 1.2 inside
mappings, nulls left out), turned into its parser's flag tokens, and refused in one line that names the file when
it is unreadable or says what no flag could."""

import math
from dataclasses import dataclass, field

import pytest
from lavit.training.config_files import ConfigFileError, config_arguments, is_config_file, read_config_file
from transformers import HfArgumentParser

from lavit.command_inputs import CommandError


@dataclass
class Settings:
    steps: int = 1
    fast: bool = False
    color: bool = True  # also gives the flag --no_color
    names: list[str] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    tag: str | None = None


@pytest.fixture(scope="module")
def parser():
    return HfArgumentParser(Settings)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("args", "expected"), [
    (["run.yaml"], True), (["RUN.JSON"], True), (["a/run.yml"], True), (["--deepspeed=ds.json"], False),
    (["run.yaml", "--seed", "1"], False), (["run.txt"], False), ([], False)])
def test_only_one_json_or_yaml_argument_is_a_config_file(args, expected):
    assert is_config_file(args) is expected


def test_yaml_scalars_are_read_as_written_and_nulls_left_out(tmp_path):
    path = write(tmp_path, "run.yaml", "steps: 010\nname: 2024-01-01\nfast: no\nrate: 1e-3\nseed: ~\nempty:\n"
                                       "names: [yes, 0x10, ~]\n")
    assert read_config_file(path) == {"steps": "010", "name": "2024-01-01", "fast": "no", "rate": "1e-3",
                                      "names": ["yes", "0x10", None]}


def test_yaml_mappings_are_read_with_yaml_1_2_numbers_and_booleans(tmp_path):
    path = write(tmp_path, "run.yaml", "kwargs: {a: 010, b: 0o10, c: 0x10, d: 1e-6, e: yes, f: true, g: 1:30, "
                                       "h: .inf, i: 1_000}\n")
    assert read_config_file(path)["kwargs"] == {"a": 10, "b": 8, "c": 16, "d": 1e-6, "e": "yes", "f": True,
                                                "g": "1:30", "h": math.inf, "i": "1_000"}


def test_yaml_merge_keys_bring_in_the_anchored_values(tmp_path):
    path = write(tmp_path, "run.yaml", "base: &base {a: 1}\nkwargs:\n  <<: *base\n  b: 2\n")
    assert read_config_file(path)["kwargs"] == {"a": 1, "b": 2}


def test_json_values_are_parsed_and_nulls_left_out(tmp_path):
    path = write(tmp_path, "run.json", '{"steps": 5, "fast": true, "tag": null, "kwargs": {"x": 1.5}}')
    assert read_config_file(path) == {"steps": 5, "fast": True, "kwargs": {"x": 1.5}}


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_yaml_file_sets_nothing(tmp_path, text):
    assert read_config_file(write(tmp_path, "run.yaml", text)) == {}


def test_a_key_given_twice_inside_a_nested_json_object_is_refused(tmp_path):
    path = write(tmp_path, "run.json", '{"kwargs": {"x": 1, "x": 2}}')
    with pytest.raises(ConfigFileError, match="run.json: x is given twice"):
        read_config_file(path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("run.yaml", "- a\n- b\n", "holds a list, not a mapping of flag names"),
    ("run.json", "[1, 2]", "holds a list, not a mapping of flag names"),
    ("run.yaml", "steps: [1\n", "is not valid YAML"),
    ("run.json", '{"steps": }', "is not valid JSON"),
    ("run.yaml", b"steps: \xff\n", "is not UTF-8 text (byte 7): save it as UTF-8"),
])
def test_an_unreadable_file_is_refused_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigFileError) as error:
        read_config_file(str(path))
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert isinstance(error.value, CommandError) and isinstance(error.value, ValueError)


def test_a_missing_file_or_a_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigFileError, match="no such config file"):
        read_config_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigFileError, match="dir.yaml is a folder, not a config file"):
        read_config_file(str(tmp_path / "dir.yaml"))


def test_values_become_the_flag_tokens_the_command_line_would_give(tmp_path, parser):
    path = write(tmp_path, "run.yaml", "steps: 010\nfast: on\nnames: [a, b]\nno_color: yes\nkwargs: {x: 1}\n"
                                       "unknown: 3\n")
    tokens, direct = config_arguments(parser, path)
    assert tokens == ["--steps=010", "--fast=true", "--names", "a", "b", "--no_color", "--unknown=3"]
    assert direct == {"kwargs": {"x": 1}}  # a mapping no token can carry goes to its field as is


def test_a_no_flag_set_off_gives_no_token(tmp_path, parser):
    tokens, _ = config_arguments(parser, write(tmp_path, "run.yaml", "no_color: off\n"))
    assert tokens == []


@pytest.mark.parametrize(("text", "message"), [
    ("steps: [1, 2]\n", "run.yaml: steps: a list, but --steps takes one value"),
    ("tag: {a: 1}\n", "run.yaml: tag: a mapping, but --tag takes one value"),
    ("color: true\nno_color: true\n", "run.yaml: no_color and color set the same flag: keep one"),
    ("no_color: maybe\n", "run.yaml: no_color: Truthy value expected"),
    ('"a b": 1\n', "run.yaml: 'a b' is not a flag name"),
])
def test_what_no_flag_could_say_is_refused_naming_the_file_and_key(tmp_path, parser, text, message):
    with pytest.raises(ConfigFileError) as error:
        config_arguments(parser, write(tmp_path, "run.yaml", text))
    assert message in str(error.value)
