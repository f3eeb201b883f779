"""What lavit publishes and loads: an allowlist of file kinds, each checked by its content.

A Hub folder that `lavit export` writes or `lavit push` uploads may hold only these kinds ([`folder_problems`]):

| kind | names | checked by |
|---|---|---|
| safetensors weights | `*.safetensors` | its header parsed: a JSON table of tensors whose offsets lie inside the file |
| JSON | `*.json` (configs, tokenizer files, index, `lavit_run.json`, lavit's folder marker) | parsed as UTF-8 JSON |
| text | `*.md`, `*.txt` (`merges.txt`), `*.jinja` (chat templates), `.gitattributes` | decoded as UTF-8 |
| remote code | `*.py` | byte for byte one of the files of `modeling_lavit/` or `processing/` of this lavit |
| SentencePiece model | `tokenizer.model`, `*.spm` | loaded by `sentencepiece` (a protobuf: no code) |
| images (cards) | `*.png`, `*.jpg`, `*.jpeg`, `*.webp`, `*.gif` | opened and verified by PIL, in its named format |

Anything else (pickles under any name or compression, NumPy files, archives, unknown binaries, devices, pipes) is
refused with its name, and so is a link whose target leaves the folder; a link inside it is checked as its target.
Nothing is ever unpickled or executed to check it.

Loading ([`require_safetensors_inputs`], run by every `lavit` command and stage parser on its input model folders;
[`require_safetensors_weights`] for library code): a model folder whose weights are pickles (`pytorch_model.bin`,
`*.pt`, `*.pth`, `*.ckpt`, `*.pkl`) is refused with the command that converts it, for a source the user trusts:

    python -m lavit.file_kinds convert TRUSTED_FOLDER NEW_FOLDER

which loads the tensors with `torch.load(weights_only=True)` (tensors only, never code) and writes safetensors.
"""

import os
import shutil
import stat
import struct
import sys
from pathlib import Path

from lavit.modeling.saving_lavit import loads_json

TEXT_SUFFIXES = (".md", ".txt", ".jinja")
TEXT_NAMES = (".gitattributes",)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}
SENTENCEPIECE_NAMES = ("tokenizer.model",)
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                       "diffusion_pytorch_model.safetensors.index.json")
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
CONVERT_COMMAND = "python -m lavit.file_kinds convert {folder} {folder}-safetensors"


def shipped_code() -> dict[str, bytes]:
    """The remote-code files of this lavit (`modeling_lavit/`, `processing/`), by name."""
    from lavit import modeling, processing

    code = {}
    for package in (modeling, processing):
        for path in Path(package.__file__).parent.glob("*.py"):
            code[path.name] = path.read_bytes()
    return code


def _safetensors_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "too short for a safetensors header"
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            return "its safetensors header length exceeds the file"
        try:
            header = loads_json(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "its safetensors header is not JSON"
    if not isinstance(header, dict):
        return "its safetensors header is not a table of tensors"
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(item, int) for item in offsets)
                 and 0 <= offsets[0] <= offsets[1] <= data_size and isinstance(entry.get("dtype"), str)
                 and isinstance(entry.get("shape"), list))
        if not valid:
            return f"tensor {name!r} of its safetensors header is malformed"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        loads_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 JSON"
    except ValueError as error:
        return f"not valid JSON ({error})"
    return None


def _text_problem(path: Path) -> str | None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    return None


def _code_problem(path: Path) -> str | None:
    expected = shipped_code().get(path.name)
    if expected is None:
        return "a Python file that is not one of lavit's model or processing files"
    if path.read_bytes() != expected:
        return "differs from lavit's own file of that name (export again to refresh it)"
    return None


def _image_problem(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image_format = image.format
            image.verify()
    except Exception as error:  # PIL raises many kinds for a file that is not an image
        return f"not a readable image ({type(error).__name__})"
    if image_format != IMAGE_FORMATS[path.suffix.lower()]:
        return f"holds {image_format}, not {IMAGE_FORMATS[path.suffix.lower()]}"
    return None


def _sentencepiece_problem(path: Path) -> str | None:
    try:
        import sentencepiece
    except ImportError:
        return "a SentencePiece model, which cannot be checked without the `sentencepiece` package"
    try:
        sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception as error:  # sentencepiece raises RuntimeError/OSError for a bad protobuf
        return f"not a SentencePiece model ({type(error).__name__})"
    return None


def file_problem(path) -> str | None:
    """Why the regular file at `path` may not be published (its kind, from its name, checked by its content), or
    None when it is an allowed kind with valid content."""
    path = Path(path)
    name, suffix = path.name, path.suffix.lower()
    size = path.stat().st_size
    if suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if suffix == ".json":
        return _json_problem(path)
    if suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
        return _text_problem(path)
    if suffix == ".py":
        return _code_problem(path)
    if suffix in IMAGE_FORMATS:
        return _image_problem(path)
    if name in SENTENCEPIECE_NAMES or suffix == ".spm":
        return _sentencepiece_problem(path)
    return "not a kind of file lavit publishes (safetensors, JSON, text, lavit's code, tokenizer, images)"


def folder_problems(folder) -> list[str]:
    """One line per file or link under `folder` that may not be published: a link leaving the folder, anything
    that is not a regular file or folder, a file not of an allowed kind ([`file_problem`]). Links are not followed
    out of the folder; one inside is checked as its target."""
    folder = Path(folder)
    root = folder.resolve()
    problems = []
    for directory, subdirectories, files in os.walk(folder):
        for name in sorted(subdirectories + files):
            path = Path(directory) / name
            relative = path.relative_to(folder)
            target = path.resolve()
            if path.is_symlink() and not target.is_relative_to(root):
                problems.append(f"{relative} links outside the folder (to {os.readlink(path)})")
                continue
            if name in subdirectories:
                continue
            mode = os.stat(target).st_mode if os.path.exists(target) else 0
            if not stat.S_ISREG(mode):
                problems.append(f"{relative} is not a regular file")
                continue
            problem = file_problem(target)
            if problem is not None:
                problems.append(f"{relative}: {problem}")
    return problems


def pickled_weight_names(names) -> list[str]:
    """Of a model's files (`/`-separated paths relative to its folder), the pickled weights loading would read: those
    of the folder or of a component sub-folder (e.g. `detokenizer/`, `unet/`) with no safetensors weights beside
    them."""
    folders = {}
    for name in names:
        parent, _, base = name.rpartition("/")
        if "/" not in parent:  # loading reads the folder and its sub-folders, not deeper
            folders.setdefault(parent, []).append(base)
    return [f"{parent}/{base}" if parent else base for parent, files in sorted(folders.items())
            if not any(base in SAFETENSORS_WEIGHTS for base in files)
            for base in sorted(files) if Path(base).suffix.lower() in PICKLED_WEIGHT_SUFFIXES
            and base != "training_args.bin"]


def pickled_weights(folder) -> list[str]:
    """The names of pickled weight files of a local model folder that loading would read ([`pickled_weight_names`])."""
    folder = Path(folder)
    entries = [*folder.iterdir(), *(path for directory in folder.iterdir() if directory.is_dir()
                                    for path in directory.iterdir())]
    return pickled_weight_names(path.relative_to(folder).as_posix() for path in entries if path.is_file())


def hub_files(repo_id: str) -> list[str] | None:
    """The files of the Hub model `repo_id` (those of its cached snapshot when offline), or None where they cannot
    be known (not a repo id, not cached, no network): the loader then says what is wrong."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except Exception:  # noqa: BLE001 (not a repo id, or no huggingface_hub: nothing to look up)
        return None
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo_id)
        except Exception:  # noqa: BLE001 (no network, no access: the cached snapshot, else the loader's message)
            pass
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 (not in the cache)
        return None
    return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]


class PickledWeightsError(ValueError):
    """A model folder whose weights are pickles, which lavit does not load."""


def require_safetensors_weights(folder) -> None:
    """Raises [`PickledWeightsError`] (naming the files and the conversion command) when the model `folder` holds its
    weights as pickles: a local folder, or a Hub id whose files say so ([`hub_files`]; one that cannot be looked up is
    left to the loader)."""
    local = Path(folder).expanduser()
    if local.is_dir():
        pickles, where, fix = pickled_weights(local), local, CONVERT_COMMAND.format(folder=local)
    elif not os.path.lexists(local) and (files := hub_files(str(folder))) is not None:
        pickles, where = pickled_weight_names(files), f"the Hub model {folder}"
        fix = (f"hf download {folder} --local-dir {local.name}, then "
               f"{CONVERT_COMMAND.format(folder=local.name)}, and give that folder")
    else:
        return
    if pickles:
        raise PickledWeightsError(
            f"{where} holds its weights as pickles ({', '.join(pickles)}), which lavit does not load (unpickling "
            f"can run code); if you trust where they come from, convert them once: {fix}"
        )


MODEL_FLAG_WORDS = ("model", "tokenizer")  # the flags that name a model (a folder or a Hub id), not data


def require_safetensors_inputs(*arguments) -> None:
    """[`require_safetensors_weights`] for every input of a command (parsed `Namespace`s or stage dataclasses, roles
    as in `lavit.paths`) that is a model folder (has a `config.json` or `model_index.json`), or, for a flag naming a
    model, a Hub id."""
    from lavit.paths import INPUT, declared_paths

    for parsed in arguments:
        for flag, role, value in declared_paths(parsed):
            if role != INPUT:
                continue
            names_a_model = any(word in flag for word in MODEL_FLAG_WORDS)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                folder = Path(path).expanduser()  # a model folder, or a pipeline folder with one per component
                if any((folder / name).is_file() for name in ("config.json", "model_index.json")) or (
                        names_a_model and not os.path.lexists(folder)):
                    require_safetensors_weights(path)


def rephrase_pickle_error(message: str) -> str:
    """A loader's message about an unsafe pickle (PyTorch's and transformers' suggest turning the safe loader off,
    which would run the file's code) -> what lavit says instead."""
    if "weights_only" not in message and "Weights only load failed" not in message:
        return message
    return ("the weights are a pickle that holds more than tensors; lavit does not load it (unpickling it can run "
            "code). Ask its author for safetensors weights")


# ------------------------------------------------------------------------------------------------ conversion


def _load_pickled_tensors(path: Path) -> dict:
    import pickle

    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise PickledWeightsError(f"{path} holds more than tensors: {rephrase_pickle_error(str(error))}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise PickledWeightsError(f"{path} is not a state dict of tensors")
    return state_dict


def convert_to_safetensors(source, destination) -> Path:
    """
    Writes a copy of the model folder `source` to `destination` with its pickled weights as safetensors (shared
    tensors and shards handled by `huggingface_hub.save_torch_state_dict`). Only for a source the user trusts:
    tensors are loaded with `torch.load(weights_only=True)`, so a pickle holding more than tensors is refused.
    Other pickles (`training_args.bin`, optimizer states) are left out. `destination` is written beside itself and
    swapped in (`lavit.atomic.replace_folder`).
    """
    from lavit.atomic import fresh_staging_folder, replace_folder
    from lavit.paths import check_destination

    source, destination = Path(source), Path(destination)
    check_destination(destination, {"source": source}, name="the converted folder")
    staging = fresh_staging_folder(destination)
    try:
        for directory in [source, *sorted(path for path in source.rglob("*") if path.is_dir())]:
            _convert_directory(directory, staging / directory.relative_to(source))
    except BaseException:
        shutil.rmtree(staging)  # made by this call: nothing half converted is left behind
        raise
    return replace_folder(staging, destination)


def _convert_directory(directory: Path, target: Path) -> None:
    """One folder of [`convert_to_safetensors`]: its pickled weights as safetensors, its other files copied."""
    from huggingface_hub import save_torch_state_dict

    target.mkdir(parents=True, exist_ok=True)
    weights = [path for path in sorted(directory.iterdir()) if path.suffix.lower() in PICKLED_WEIGHT_SUFFIXES]
    state_dict = {}
    for path in weights:
        if path.name != "training_args.bin":
            state_dict.update(_load_pickled_tensors(path))
    if state_dict:
        prefix = "diffusion_pytorch_model" if (directory / "diffusion_pytorch_model.bin").is_file() else "model"
        save_torch_state_dict(state_dict, target, filename_pattern=prefix + "{suffix}.safetensors")
    for path in sorted(directory.iterdir()):
        if path.is_file() and path not in weights and not path.name.endswith(".bin.index.json"):
            shutil.copy2(path, target / path.name)


def main(argv=None) -> int:
    """`python -m lavit.file_kinds convert SOURCE DESTINATION` (see [`convert_to_safetensors`])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 3 or argv[0] != "convert":
        print("usage: python -m lavit.file_kinds convert TRUSTED_MODEL_FOLDER NEW_FOLDER", file=sys.stderr)
        return 2
    try:
        print(convert_to_safetensors(argv[1], argv[2]))
    except (OSError, ValueError) as error:
        print(f"lavit.file_kinds convert: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["PickledWeightsError", "convert_to_safetensors", "file_problem", "folder_problems", "pickled_weights",
           "rephrase_pickle_error", "require_safetensors_inputs", "require_safetensors_weights", "shipped_code"]
