"""`lavit serve MODEL`: the parser and runner are `lavit.serving.command`'s (Ray is imported only when it runs)."""

from lavit.serving.command import make_parser, run

from .common import HelpFormatter


def add_parsers(commands) -> None:
    make_parser(commands).formatter_class = HelpFormatter


RUNNERS = {"serve": run}
