"""`lavit demo`: a tiny LaVIT built end to end, offline, on this machine (`lavit.demo`)."""

from pathlib import Path

from lavit.paths import OutputPath

from .common import add_command


def add_parsers(commands) -> None:
    demo = add_command(commands, "demo", "build a tiny LaVIT end to end, offline (minutes on a CPU)")
    demo.add_argument("--output", type=OutputPath, default="lavit-demo",
                      help="folder for the runs, images and the Hub folder")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (about a minute; used by CI)")


def run_demo(args) -> None:
    from lavit.demo import run_demo as demo

    demo(Path(args.output), quick=args.quick)


RUNNERS = {"demo": run_demo}
