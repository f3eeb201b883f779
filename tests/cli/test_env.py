"""`lavit.cli.env`: the bug-report environment. `installed_version` says "not installed" instead of failing,
`device_report` matches what torch sees, `environment` lists lavit, Python and every library of `LIBRARIES`, and
`run_env` prints that same report as text (one `- name: value` line each) or as one JSON document."""

import argparse
import json
import os
import platform
from importlib.metadata import version

import pytest
import torch

from lavit.cli.env import LIBRARIES, RUNNERS, add_parsers, device_report, environment, installed_version, run_env


def test_installed_version_is_the_distributions_version():
    assert installed_version("torch") == version("torch")
    assert installed_version("lavit") == version("lavit")


def test_a_missing_library_is_not_installed_rather_than_an_error():
    assert installed_version("no-such-distribution-lavit-test") == "not installed"


def test_device_report_is_what_torch_and_the_os_see():
    report = device_report()
    assert report["cpu_count"] == os.cpu_count() and report["torch_threads"] == torch.get_num_threads()
    assert report["cuda_available"] == torch.cuda.is_available() and report["cuda_version"] == torch.version.cuda
    assert report["mps_available"] == torch.backends.mps.is_available()
    if torch.cuda.is_available():
        assert len(report["devices"]) == torch.cuda.device_count()
        assert all(device.endswith(" GiB)") for device in report["devices"])
    else:
        assert "devices" not in report and "bf16_supported" not in report


def test_environment_lists_lavit_python_and_every_library():
    report = environment()
    assert report["python"] == platform.python_version() and report["platform"] == platform.platform()
    assert set(LIBRARIES) <= set(report)
    assert all(report[name] == installed_version(name) for name in LIBRARIES)


def env_args(*argv) -> argparse.Namespace:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices["env"].parse_args(list(argv))


def test_json_output_is_the_environment(capsys):
    run_env(env_args("--json"))
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(environment()))


def test_text_output_is_one_line_per_entry_after_the_header(capsys):
    run_env(env_args())
    header, blank, *lines = capsys.readouterr().out.splitlines()
    assert "GitHub issue" in header and blank == ""
    report = environment()
    assert [line.split(":", 1)[0] for line in lines] == [f"- {name}" for name in report]
    assert f"- torch: {version('torch')}" in lines


def test_env_takes_only_json(capsys):
    assert env_args().json is False
    with pytest.raises(SystemExit):
        env_args("--jsn")
    assert "--jsn" in capsys.readouterr().err
    assert RUNNERS == {"env": run_env}
