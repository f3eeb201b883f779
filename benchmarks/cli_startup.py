"""Start-up time of the `lavit` command, side by side with the imports it cannot avoid (issue 28, section 2).

Each command line runs in a fresh process, round-robin (one run of each, then the next round), so that a load change
of the machine hits every row alike; a row's figure is the median wall time (and the median CPU time, user + system,
which a loaded machine changes less). Targets: `lavit --help` within 1.5x of
`python -c "import torch"`, and every `lavit COMMAND --help` within 1.5x of `python -c "import torch, transformers"`.

    python benchmarks/cli_startup.py                                   # every command, 3 runs each
    python benchmarks/cli_startup.py --repeats 5 --commands caption,train
    python benchmarks/cli_startup.py --extra "before=python /tmp/old_cli.py --help"   # another command line too

The table goes to stdout, the figures to benchmarks/results/cli_startup.json (or `--output`).
"""

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

TORCH = [sys.executable, "-c", "import torch"]
TORCH_TRANSFORMERS = [sys.executable, "-c", "import torch, transformers"]
IMPORT_TORCH, IMPORT_TRANSFORMERS = "python -c 'import torch'", "python -c 'import torch, transformers'"
TARGET = 1.5


def lavit_command() -> list[str]:
    """The installed `lavit` console script beside this Python, else `python -m lavit.cli`."""
    script = Path(sys.executable).with_name("lavit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lavit.cli"]


def command_names() -> list[str]:
    from lavit.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return list(commands.choices)


def run_times(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run: the CPU time (user + system) depends far less on the machine's load."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    cpu = cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime
    return elapsed, cpu


def measure(rows: dict[str, list[str]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    walls, cpus = {label: [] for label in rows}, {label: [] for label in rows}
    for round_number in range(repeats):
        for label, argv in rows.items():
            wall, cpu = run_times(argv)
            walls[label].append(wall)
            cpus[label].append(cpu)
        print(f"round {round_number + 1}/{repeats} done", file=sys.stderr)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command line (default: 3)")
    parser.add_argument("--commands", default=None, help="comma-separated commands (default: every command)")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=COMMAND",
                        help="another command line to time beside the others (repeatable)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cli_startup.json",
                        help="JSON file of the figures (default: benchmarks/results/cli_startup.json)")
    args = parser.parse_args()

    lavit = lavit_command()
    commands = args.commands.split(",") if args.commands else command_names()
    rows = {IMPORT_TORCH: TORCH, IMPORT_TRANSFORMERS: TORCH_TRANSFORMERS, "lavit --help": [*lavit, "--help"],
            **{f"lavit {name} --help": [*lavit, name, "--help"] for name in commands}}
    for extra in args.extra:
        label, _, command = extra.partition("=")
        rows[label] = shlex.split(command)
    times, cpu_times = measure(rows, args.repeats)
    medians = {label: statistics.median(values) for label, values in times.items()}
    cpu_medians = {label: statistics.median(values) for label, values in cpu_times.items()}
    torch_time, transformers_time = medians[IMPORT_TORCH], medians[IMPORT_TRANSFORMERS]

    print(f"\n{'command line':<45} {'median s':>9} {'/ torch':>8} {'/ torch+tf':>10}  {'CPU s':>6}  target")
    results = []
    for label, median in medians.items():
        reference = torch_time if label == "lavit --help" else transformers_time if label.startswith("lavit ") else None
        verdict = "" if reference is None else "ok" if median <= TARGET * reference else f"over {TARGET}x"
        print(f"{label:<45} {median:9.2f} {median / torch_time:8.2f} {median / transformers_time:10.2f}  "
              f"{cpu_medians[label]:6.2f}  {verdict}")
        results.append({"command": label, "argv": rows[label], "median_s": round(median, 3),
                        "runs_s": [round(value, 3) for value in times[label]],
                        "median_cpu_s": round(cpu_medians[label], 3),
                        "ratio_to_import_torch": round(median / torch_time, 3),
                        "ratio_to_import_torch_transformers": round(median / transformers_time, 3),
                        "within_target": None if reference is None else median <= TARGET * reference})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "repeats": args.repeats, "target_ratio": TARGET, "results": results,
    }, indent=2) + "\n")
    print(f"\n{args.output}")


if __name__ == "__main__":
    main()
