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
            named = ", ".join(f"{flag} (did you mean {closest_flag(self, flag)}?)" if closest_flag(self, flag) else flag
                              for flag in unknown)
            self.error(f"unrecognized arguments: {named}")
        return super().parse_known_args(args, namespace)


class StrictArgumentParser(StrictFlags, argparse.ArgumentParser):
    """An `argparse.ArgumentParser` with [`StrictFlags`]."""
