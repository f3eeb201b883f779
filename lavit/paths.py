"""What each path argument is for, and the one guard that keeps lavit from writing over what it reads.

Every argument that names a file or folder declares its role where it is declared:

- `argparse` commands (`lavit/cli.py`): `type=InputPath` (read) or `type=OutputPath` (written or replaced). The parsed
  value is still a `str`; its class carries the role.
- dataclass fields of the training stages (`training/arguments.py`): `metadata={PATH_ROLE: INPUT}` (or `OUTPUT`,
  `CHECKPOINT`); `LaVITArgumentParser` gives the argument the matching type, so both kinds of parser are read alike.

[`check_paths`] takes the parsed arguments of one command (a `Namespace` or the stage's dataclasses) and refuses,
before anything is read or written, a destination that *is*, *lies inside* or *contains* one of the command's
inputs, comparing resolved paths (symlinks, `..`, `~`, relative to the working directory). [`check_destination`]
is the same test for library code that knows its own inputs (`export_model`, pipelines' `save_pretrained`).
Inputs that do not exist on disk (Hub ids) cannot be overwritten and are not compared; a `CHECKPOINT` (`--resume`)
is read from inside the output folder by design and is not compared either.

What lavit deletes or swaps is decided elsewhere, by its own marker (`lavit.atomic.is_lavit_folder`).
"""

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

INPUT, OUTPUT, CHECKPOINT = "input", "output", "checkpoint"
PATH_ROLE = "lavit_path"  # the key of a dataclass field's metadata that declares its role
# the keys of an input field's metadata that declare it a model folder: the kinds it may be (`config.json`
# model_type), and whether a PEFT adapter folder may stand for one (`lavit.command_inputs.require_model_inputs`)
MODEL_KINDS = "lavit_model_kinds"
ADAPTERS = "lavit_adapters"


class PathConflictError(ValueError):
    """A destination that is, contains or lies inside one of the command's inputs."""


class PathArgument(str):
    """A path given on a command line or in a config file. An empty one is refused: it would mean the current folder
    (`evaluate --output ''` wrote its results there, past the output checks, which skip values not given)."""

    def __new__(cls, value):
        if not str(value).strip():
            raise argparse.ArgumentTypeError("an empty path: give a file or folder name (or leave the flag out)")
        return super().__new__(cls, value)


class InputPath(PathArgument):
    """`argparse` type of a path the command reads."""

    role = INPUT


class OutputPath(PathArgument):
    """`argparse` type of a path the command writes, replaces or fills."""

    role = OUTPUT


class OutputFile(OutputPath):
    """`argparse` type of a file the command writes; several outputs get numbered names (`out-0.png`, `out-1.png`:
    [`numbered_outputs`]), each checked as the named one ([`check_output_files`])."""


class CheckpointPath(PathArgument):
    """`argparse` type of a checkpoint read from inside the output folder (`--resume`); never compared."""

    role = CHECKPOINT


PATH_TYPES = {INPUT: InputPath, OUTPUT: OutputPath, CHECKPOINT: CheckpointPath}


def path_role(action: argparse.Action) -> str | None:
    """The declared role of a parser argument (`INPUT`, `OUTPUT`, `CHECKPOINT`), or None for a non-path argument."""
    return getattr(action.type, "role", None)


def path_field(role: str, model_kinds: tuple[str, ...] | None = None, adapters: bool = True,
               **field_kwargs) -> dataclasses.Field:
    """A dataclass field holding a path of `role` (`help=` goes into its metadata, as `HfArg` does). An input that
    names a model folder declares the `model_kinds` it may be (() for any) and whether a PEFT adapter folder may
    stand for one (`adapters`; False where training starts from, or saves, a whole model)."""
    metadata = {PATH_ROLE: role}
    if model_kinds is not None:
        metadata.update({MODEL_KINDS: tuple(model_kinds), ADAPTERS: adapters})
    if "help" in field_kwargs:
        metadata["help"] = field_kwargs.pop("help")
    return dataclasses.field(metadata=metadata, **field_kwargs)


def resolved(path) -> Path:
    """`path` as the file system will see it: `~` expanded, made absolute from the working directory, symlinks and
    `..` resolved (as far as the path exists)."""
    return Path(path).expanduser().resolve()  # `..` after symlinks: `link/..` is the link target's parent


def _relation(destination: Path, source: Path) -> str | None:
    if destination == source:
        return "is"
    if destination.is_relative_to(source):
        return "lies inside"
    if source.is_relative_to(destination):
        return "contains"
    return None


def check_destination(destination, inputs: Mapping[str, object], name: str = "the destination") -> Path:
    """
    Raises [`PathConflictError`] when `destination` is, lies inside or contains one of `inputs` (name -> a path, or a
    list of paths; None and paths that do not exist are skipped). Returns the resolved destination.
    """
    target = resolved(destination)
    for input_name, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None or value == "" or not os.path.lexists(Path(value).expanduser()):
                continue
            relation = _relation(target, resolved(value))
            if relation is not None:
                raise PathConflictError(
                    f"{name} {destination} ({target}) {relation} the input {input_name} {value}: writing there could "
                    f"destroy it; choose a destination outside every input"
                )
    return target


def numbered_output(path, index: int, count: int) -> Path:
    """The file output `index` of `count` named `path`: `path` itself for one, else `stem-N.suffix`."""
    path = Path(path)
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def numbered_outputs(path, count: int) -> list[Path]:
    """The files a command writes for `count` outputs named `path` ([`numbered_output`])."""
    return [numbered_output(path, index, count) for index in range(count)]


def check_output_files(path, count: int, inputs: Mapping[str, object], name: str) -> None:
    """The one rule of every file output, the derived names included, checked before any work: each of the
    `count` files ([`numbered_outputs`]) must lie outside every input ([`check_destination`]) and must not be a
    file lavit did not write ([`lavit.atomic.require_lavit_file`]: a rerun replaces lavit's own images, never the
    user's)."""
    from lavit.atomic import require_lavit_file

    for file in existing_numbered_outputs(path, count):  # a name with nothing there destroys nothing
        check_destination(file, inputs, name=name)
        require_lavit_file(file, name)


def existing_numbered_outputs(path, count: int) -> list[Path]:
    """The files of [`numbered_outputs`] that exist, found from the folder's listing (a count of 10**12 images is
    refused later, by the memory bound, not by listing 10**12 names here)."""
    path = Path(path)
    if count == 1:
        return [path] if os.path.lexists(path) else []
    if not path.parent.is_dir():
        return []
    prefix, found = f"{path.stem}-", []
    for entry in path.parent.iterdir():
        number = entry.name[len(prefix): len(entry.name) - len(path.suffix)] if path.suffix else entry.name[
            len(prefix):]
        if (entry.name.startswith(prefix) and entry.name.endswith(path.suffix) and number.isdigit()
                and str(int(number)) == number and int(number) < count):
            found.append(entry)
    return sorted(found)


def declared_paths(arguments) -> list[tuple[str, str, object]]:
    """`(name, role, value)` of every path argument of a parsed `argparse.Namespace` (roles from the values'
    types) or of a stage's arguments dataclass (roles from its fields' metadata)."""
    return [(name, role, value) for name, role, value in _path_items(arguments)
            if role is not None and value not in (None, "", [])]


def _path_items(arguments) -> list[tuple[str, str | None, object]]:
    if dataclasses.is_dataclass(arguments):  # every field is a flag
        return [(f"--{field.name}", field.metadata.get(PATH_ROLE), getattr(arguments, field.name))
                for field in dataclasses.fields(arguments)]
    # a Namespace does not tell flags from positional arguments: the plain name
    return [(name.replace("_", "-"), _value_role(value), value) for name, value in vars(arguments).items()]


def _value_role(value) -> str | None:
    values = value if isinstance(value, (list, tuple)) else [value]
    roles = {getattr(type(item), "role", None) for item in values}
    return roles.pop() if len(roles) == 1 else None


def check_paths(*arguments) -> None:
    """The guard of one command: every `OUTPUT` of `arguments` (parsed Namespaces or dataclasses) against every
    `INPUT` of them ([`check_destination`]). Raises [`PathConflictError`]."""
    for parsed in arguments:  # a config file's values skip the flags' types: an empty path is refused here too
        for flag, role, value in _path_items(parsed):
            if role is not None and isinstance(value, str) and not value.strip():
                raise PathConflictError(f"{flag} {value!r}: an empty path; give a file or folder name (or leave "
                                        f"the flag out)")
    paths = [path for parsed in arguments for path in declared_paths(parsed)]
    inputs = {flag: value for flag, role, value in paths if role == INPUT}
    for flag, role, value in paths:
        if role == OUTPUT:
            check_destination(value, inputs, name=flag)


__all__ = ["CHECKPOINT", "INPUT", "OUTPUT", "PATH_ROLE", "CheckpointPath", "InputPath", "OutputFile", "OutputPath",
           "PathConflictError", "check_destination", "check_output_files", "check_paths",
           "declared_paths", "existing_numbered_outputs", "numbered_output",
           "numbered_outputs", "path_field", "path_role",
           "resolved"]
