"""`lavit demo`: a tiny LaVIT built end to end, offline, on this machine (`lavit.demo`)."""

from pathlib import Path

from lavit.modeling.validation_lavit import SEED
from lavit.paths import OutputPath

from .common import add_command


def add_parsers(commands) -> None:
    demo = add_command(commands, "demo", "build a tiny LaVIT end to end, offline (minutes on a CPU)")
    demo.add_argument("--output", type=OutputPath, default="lavit-demo",
                      help="folder for the runs, images and the Hub folder")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (about a minute; used by CI)")
    demo.add_argument("--seed", type=SEED, default=0,
                      help="seed of every random draw: the digits' colours, the weights, the data order and crops, "
                           "the sampled images (docs/demo.md gives the band of figures over seeds)")


def run_demo(args) -> None:
    from lavit.demo import run_demo as demo

    demo(Path(args.output), quick=args.quick, seed=args.seed)


RUNNERS = {"demo": run_demo}
