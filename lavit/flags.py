"""How every `lavit` command's parser reads flags: whole names only (no abbreviations: `--mod` is not `--model`, and a
flag added later never changes what an old abbreviation meant), and a flag the command does not take is reported
first, with the closest one it does take, before anything else argparse checks (a mistyped `--modle` is not reported
as a missing `--model`)."""

import argparse
import difflib
import re

# a negative number, read as a value and not a flag: argparse's own pattern (`-1`, `-.5`) and the rest of what
# `float` reads (`-1e-3`, `-inf`, `-nan`), so that `--temperature -1e-3` gets the flag's range error
NEGATIVE_NUMBER = re.compile(r"^-(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                             flags=re.IGNORECASE)


def unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The flags among `args` that `parser` does not take (`--name=value` by its name; a short flag with its value
    attached, `-ofile`, by its first two characters); nothing after `--`."""
    unknown = []
    for token in args:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or NEGATIVE_NUMBER.match(token) or (
                " " in token and token.split("=", 1)[0] not in parser._option_string_actions):
            continue  # a value: argparse reads a token with a space as one ("-a photo of"), as a number a number
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name in parser._option_string_actions or (not token.startswith("--") and token[:2] in
                                                       parser._option_string_actions):
            continue
        unknown.append(name)
    return unknown


def closest_flag(parser: argparse.ArgumentParser, flag: str) -> str | None:
    options = [option for option in parser._option_string_actions if option.startswith("--")]
    matches = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    return matches[0] if matches else None


def described_flag(parser: argparse.ArgumentParser, args: list[str], flag: str) -> str:
    """`flag`, an unknown flag among `args`, with what the user may have meant: the closest known flag, or, after a
    flag that takes a value, that flag given the value with `=` (`--question=-what`: a value that starts with a dash
    is otherwise read as a flag; not after a flag whose value is optional, such as a boolean's)."""
    closest = closest_flag(parser, flag)
    if closest:
        return f"{flag} (did you mean {closest}?)"
    position = next(index for index, token in enumerate(args) if token == flag or token.startswith(f"{flag}="))
    before = parser._option_string_actions.get(args[position - 1]) if position else None
    if before is not None and (before.nargs in (None, "+") or isinstance(before.nargs, int) and before.nargs > 0):
        return f"{flag} (the value of {args[position - 1]}? give {args[position - 1]}={args[position]})"
    takes_positionals = any(not action.option_strings for action in parser._actions)
    if not flag.startswith("--") and takes_positionals:
        return f"{flag} (a value that starts with a dash? give it last, after --, as in: ... -- {args[position]})"
    return flag


class StrictFlags:
    """Mixin of every `lavit` sub-command's parser (argparse's and `HfArgumentParser`'s alike): no abbreviations, and
    unknown flags are an error naming each with its closest known flag, raised before argparse's other checks."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's hook: these tokens are values

    def parse_known_args(self, args=None, namespace=None):
        import sys

        given = sys.argv[1:] if args is None else [str(arg) for arg in args]
        unknown = unknown_flags(self, given)
        if unknown:
            self.error(f"unrecognized arguments: {', '.join(described_flag(self, given, flag) for flag in unknown)}")
        self._given = given
        return super().parse_known_args(args, namespace)

    def error(self, message):
        """argparse's error; a flag left without its value because the value starts with a dash (and so reads as a
        flag: `-o -out.png`, `--question -h`) gets the way to give it."""
        missing = re.match(r"argument (\S+): expected (?:one|at least one) argument", message)
        given = getattr(self, "_given", [])
        flags = missing.group(1).split("/") if missing else ()
        values = [(flag, value) for flag, value in zip(given, given[1:], strict=False)
                  if flag in flags and value.startswith("-")]
        if values:
            message += f" (a value that starts with a dash? give {values[0][0]}={values[0][1]})"
        super().error(message)


class StrictArgumentParser(StrictFlags, argparse.ArgumentParser):
    """An `argparse.ArgumentParser` with [`StrictFlags`]."""
