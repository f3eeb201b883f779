"""`lavit.cli.serve`: the `lavit serve` command as the `lavit` parser gets it from `lavit.serving.command` (the shared
help format, so each default shows once; its defaults and the ranges of port, replicas and timeouts) and its runner,
which refuses a folder that holds no model before Ray is imported."""

import argparse
import sys

import pytest

from lavit.cli import main
from lavit.cli.common import HelpFormatter
from lavit.cli.serve import RUNNERS, add_parsers
from lavit.serving.command import run


def serve_parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices["serve"]


def test_the_serve_parser_gets_the_shared_help_format():
    parser = serve_parser()
    assert parser.formatter_class is HelpFormatter
    text = parser.format_help()
    assert "HTTP port (default: 8000)" in " ".join(text.split())
    assert "(default: None)" not in text


def test_defaults_listen_locally_with_one_replica():
    args = serve_parser().parse_args(["folder"])
    assert (args.model, args.host, args.port, args.replicas, args.max_replicas) == ("folder", "127.0.0.1", 8000, 1,
                                                                                    None)
    assert (args.max_batch_size, args.batch_wait_timeout, args.request_timeout) == (16, 0.02, 600.0)
    assert args.gpus_per_replica is None and args.allowed_local_media_path is None


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--port", "0", "must be an integer in [1, 65535]"),
    ("--port", "65536", "must be an integer in [1, 65535]"),
    ("--replicas", "0", "must be an integer >= 1"),
    ("--batch-wait-timeout", "-0.1", "must be a finite number >= 0"),
    ("--request-timeout", "0", "must be a finite number > 0"),
    ("--cpus-per-replica", "inf", "must be a finite number > 0"),
])
def test_values_outside_their_range_are_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["folder", flag, value])
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_a_cpu_only_replica_is_allowed():
    assert serve_parser().parse_args(["folder", "--gpus-per-replica", "0"]).gpus_per_replica == 0.0


def test_a_folder_without_a_model_is_refused_before_ray_starts(tmp_path, capsys):
    ray_was_imported = "ray" in sys.modules
    assert main(["serve", str(tmp_path), "--port", "1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lavit serve: error: {tmp_path} is not a model folder (no config.json)"]
    assert ("ray" in sys.modules) == ray_was_imported
    assert RUNNERS == {"serve": run}
