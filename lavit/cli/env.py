"""`lavit env`: the environment to paste into a bug report (as `transformers env` and `accelerate env` print)."""

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version

from .common import add_command

# the libraries lavit builds on, and the optional ones its extras add
LIBRARIES = ("torch", "transformers", "diffusers", "accelerate", "peft", "trl", "datasets", "evaluate",
             "huggingface_hub", "safetensors", "tokenizers", "deepspeed", "liger-kernel", "ray")


def add_parsers(commands) -> None:
    env = add_command(commands, "env", "print the versions and devices to paste into a bug report")
    env.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def device_report() -> dict:
    """The accelerators torch sees: CUDA (or ROCm) devices with their memory, or Apple's MPS, and the CPU count."""
    import torch

    report = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
              "mps_available": torch.backends.mps.is_available()}
    if torch.cuda.is_available():
        report["devices"] = [f"{torch.cuda.get_device_name(index)} "
                             f"({torch.cuda.get_device_properties(index).total_memory / 2**30:.1f} GiB)"
                             for index in range(torch.cuda.device_count())]
        report["bf16_supported"] = torch.cuda.is_bf16_supported()
    return report


def environment() -> dict:
    return {"lavit": installed_version("lavit"), "python": platform.python_version(),
            "platform": platform.platform(),
            **{name: installed_version(name) for name in LIBRARIES}, **device_report()}


def run_env(args) -> None:
    report = environment()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("Copy-and-paste the text below in your GitHub issue.\n")
    for name, value in report.items():
        print(f"- {name}: {', '.join(value) if isinstance(value, list) else value}")


RUNNERS = {"env": run_env}
