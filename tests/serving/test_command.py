"""The `lavit serve` parser and runner of `lavit.serving.command`, without Ray: the parser's defaults (loopback only,
no limit of its own beside `ServeLimits`'), each number's range refused at its flag, and `run` refusing a model it
cannot serve with one `CommandError` before Ray or any model is loaded."""

import argparse
import json

import pytest

from lavit.command_inputs import CommandError
from lavit.serving.command import PORT, make_parser, run
from lavit.serving.schemas import ServeLimits


def parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The root parser and the `serve` parser `make_parser` adds to it."""
    root = argparse.ArgumentParser(prog="lavit")
    return root, make_parser(root.add_subparsers(dest="command"))


def parser() -> argparse.ArgumentParser:
    return parsers()[0]


def parse(*argv):
    return parser().parse_args(["serve", "model", *argv])


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_the_defaults_listen_on_loopback_and_leave_the_limits_to_serve_limits():
    args = parse()
    assert (args.command, args.model, args.host, args.port) == ("serve", "model", "127.0.0.1", 8000)
    assert args.max_tokens is args.max_n is args.max_images is args.allowed_local_media_path is None
    assert args.gpus_per_replica is None and args.dtype is None and args.max_replicas is None


def test_the_help_states_the_limits_serve_limits_applies():
    helps = {action.dest: action.help for action in parsers()[1]._actions}
    limits = ServeLimits()
    assert f"({limits.max_tokens})" in helps["max_tokens"] and f"({limits.max_n})" in helps["max_n"]
    assert f"({limits.max_images_per_request})" in helps["max_images"]


def test_every_flag_takes_its_value():
    args = parse("--host", "0.0.0.0", "--port", "65535", "--replicas", "2", "--max-replicas", "4",
                 "--gpus-per-replica", "0", "--cpus-per-replica", "0.5", "--dtype", "bfloat16",
                 "--batch-wait-timeout", "0", "--request-timeout", "2.5", "--max-tokens", "7")
    assert (args.host, args.port, args.replicas, args.max_replicas) == ("0.0.0.0", 65535, 2, 4)
    assert (args.gpus_per_replica, args.cpus_per_replica, args.dtype) == (0.0, 0.5, "bfloat16")
    assert (args.batch_wait_timeout, args.request_timeout, args.max_tokens) == (0.0, 2.5, 7)


@pytest.mark.parametrize("port", ["0", "65536", "80.5", "http"])
def test_a_port_outside_1_to_65535_is_refused_at_the_flag(port, capsys):
    error = refused(capsys, "--port", port)
    assert "--port" in error and PORT.describe() in error and port in error


@pytest.mark.parametrize(("flag", "value"), [
    ("--replicas", "0"), ("--max-batch-size", "-1"), ("--cpus-per-replica", "0"), ("--gpus-per-replica", "-0.5"),
    ("--request-timeout", "0"), ("--batch-wait-timeout", "nan"), ("--max-n", "0"), ("--dtype", "int8"),
])
def test_bad_values_are_refused_naming_the_flag(flag, value, capsys):
    error = refused(capsys, flag, value)
    assert f"argument {flag}" in error and value in error


def test_an_empty_model_path_is_refused(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", ""])
    assert "an empty path" in capsys.readouterr().err


def test_run_refuses_a_missing_folder_before_ray(tmp_path):
    with pytest.raises(CommandError, match="model folder not found"):
        run(argparse.Namespace(model=str(tmp_path / "missing")))


def test_run_refuses_a_model_of_another_kind(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CommandError, match="this command needs"):
        run(argparse.Namespace(model=str(tmp_path)))
