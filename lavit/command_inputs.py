"""What the `lavit` commands share about their inputs: the one error line (which keeps the reason a library gives on
its second line), [`PerItem`] (each input of a many-input command on its own, so a bad one costs only itself), and
[`resolve_model_folder`] / [`load_lavit_model`] (a `--model` found as the user meant it: a training run's folder, a
PEFT adapter folder and the base it names ([`adapter_base`]), a typo in a local path)."""

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from lavit.file_kinds import rephrase_pickle_error
from lavit.modeling.folders_lavit import is_lavit_pipeline_folder, language_model_folders
from lavit.modeling.saving_lavit import UnfinishedSaveError, loads_json, refuse_unfinished_save

MAX_ERROR_CHARS = 800
DEBUG_VARIABLE = "LAVIT_DEBUG"  # set: internal errors raise with their traceback instead of one line


class CommandError(Exception):
    """A user error: printed as one line."""


class InputsFailed(CommandError):
    """Some inputs of a many-input command failed (each already reported on its own line)."""


def one_line(error: BaseException) -> str:
    """`Type: message` on one line. Every line of the message is kept, joined (libraries often put the reason on the
    line after a generic first one), ANSI colours and repeated blanks removed, cut at `MAX_ERROR_CHARS`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", rephrase_pickle_error(str(error)))
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def error_line(error: BaseException) -> str:
    """The one line of a failed command or input: a user error as it is, any other with the traceback hint."""
    if isinstance(error, CommandError):
        return str(error)
    return f"{one_line(error)} (set {DEBUG_VARIABLE}=1 for the traceback)"


class PerItem:
    """
    The runner of every command given many inputs (images, prompts, texts). Each input is worked on alone: a bad
    one is reported at once on its own line (`lavit COMMAND: error: INPUT: reason`) and the others still run. The
    `--json` document lists one entry per input, in input order: the result, or `{KEY: input, "error": reason}`.
    [`PerItem.finish`] prints that document and raises [`InputsFailed`] (exit status 1) when any input failed.

    Args:
        command: the command's name, for the error lines.
        key: the JSON field naming an input (`"image"`, `"prompt"`, ...).
        inputs: the inputs as the user gave them.
        as_json: print one JSON document at the end instead of a text line per result.
    """

    def __init__(self, command: str, key: str, inputs: list, as_json: bool = False):
        self.command, self.key, self.inputs, self.as_json = command, key, list(inputs), as_json
        self.results: list[dict | None] = [None] * len(self.inputs)
        self.failed: set[int] = set()

    def pending(self) -> list[int]:
        """Indices of the inputs that have not failed."""
        return [index for index in range(len(self.inputs)) if index not in self.failed]

    def fail(self, index: int, error: BaseException | str):
        reason = error if isinstance(error, str) else error_line(error)
        self.failed.add(index)
        self.results[index] = {self.key: str(self.inputs[index]), "error": reason}
        if len(self.inputs) > 1:  # a lone input's failure is the command's one error line (see `finish`)
            print(f"lavit {self.command}: error: {self.inputs[index]}: {reason}", file=sys.stderr)

    def each(self, work) -> dict:
        """`work(input)` for each pending input; a failure fails that input only. Returns `{index: value}` of those
        that worked."""
        return self.each_index(lambda index: work(self.inputs[index]), self.pending())

    def each_index(self, work, indices) -> dict:
        """`work(index)` for each of `indices`; a failure fails that input only. Returns `{index: value}`."""
        done = {}
        for index in indices:
            try:
                done[index] = work(index)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:
                if debugging():
                    raise
                self.fail(index, error)
        return done

    def batches(self, size: int) -> list[list[int]]:
        """The pending inputs' indices in batches of `size` (a failed batch fails its inputs: see `each_batch`)."""
        pending = self.pending()
        return [pending[first : first + size] for first in range(0, len(pending), size)]

    def each_batch(self, work, size: int):
        """`work(indices)` for batches of pending inputs; an error fails every input of its batch only."""
        for indices in self.batches(size):
            try:
                work(indices)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:
                if debugging():
                    raise
                for index in indices:
                    self.fail(index, error)

    def done(self, index: int, result: dict, text: str | None = None):
        """Records the result of input `index`, printed now as `text` unless the output is JSON."""
        self.results[index] = {self.key: str(self.inputs[index]), **result}
        if not self.as_json and text is not None:
            print(text)

    def finish(self, single_as_object: bool = False):
        if self.as_json:
            document = self.results[0] if single_as_object and len(self.results) == 1 else self.results
            print(json.dumps(document, indent=2, ensure_ascii=False))
        if self.failed and len(self.inputs) == 1:
            raise InputsFailed(f"{self.inputs[0]}: {self.results[0]['error']}")
        if self.failed:
            raise InputsFailed(f"{len(self.failed)} of {len(self.inputs)} inputs failed (each named above); the "
                               f"others were done")


def report_failed_samples(results: dict, record: bool = False, command: str = "evaluate") -> None:
    """The samples an evaluation could not run (`results["failed"]`), as [`PerItem`] reports its inputs: one line
    each (`lavit evaluate: error: sample ID: reason`), then [`InputsFailed`] (exit status 1); the others were
    scored. Scores over part of the data are not recorded into the model card (`record`)."""
    failed = results.get("failed", [])
    for entry in failed:
        print(f"lavit {command}: error: sample {entry['id']}: {entry['error']}", file=sys.stderr)
    if failed:
        skipped = "; --record skipped (scores of part of the data)" if record else ""
        raise InputsFailed(f"{len(failed)} of {len(failed) + results['count']} samples failed (each named above); "
                           f"the others were scored{skipped}: fix them and run again into the same --output (only "
                           f"they run again)")


# ------------------------------------------------------------------------------------------------ model folders


def looks_like_local_path(value: str) -> bool:
    """A value that can only mean a local path (a Hub id is `name` or `org/name`): it starts with `.`, `/` or `~`,
    has more than one `/`, or its first folder exists here."""
    path = Path(value).expanduser()
    return value.startswith((".", "/", "~", "\\")) or value.count("/") > 1 or (
        len(path.parts) > 1 and path.parent.is_dir())


def hub_id_problem(value: str) -> str | None:
    """Why `value` is not a well-formed Hub repo id (huggingface_hub's own rule, its reason on one line); None when
    it is one, which loading may look up."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        return " ".join(str(error).split())
    return None


def newest_complete_checkpoint(folder: Path) -> Path | None:
    try:
        from lavit.training.checkpoints import latest_checkpoint
    except ImportError:  # training extras missing: no checkpoint to point at
        return None
    checkpoint = latest_checkpoint(str(folder))
    return Path(checkpoint) if checkpoint else None


# what marks a folder as something a `--model` may name: a model (and a tokenizer) folder, a `LaVITPipeline` folder
# (stage 3's `final/`), a PEFT adapter folder (an unmerged LoRA run's `final/`)
MODEL_FOLDER_FILES = ("config.json", "model_index.json", "adapter_config.json")


def is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FOLDER_FILES)


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder (`adapter_config.json`, no `config.json`), which stands for its base plus adapters."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def refuse_stopped_save(folder: Path) -> None:
    """[`refuse_unfinished_save`] as a command's one line: a folder a save stopped in is said first, whatever files it
    has or lacks."""
    try:
        refuse_unfinished_save(folder)
    except UnfinishedSaveError as error:
        raise CommandError(str(error)) from error


def given_as(flag: str, value) -> str:
    """`value` as the user gives it through `flag`: `--model X`, or `pretrained=X` for a `key=` argument (lmms-eval's
    `model_args`, a Python keyword), or `X` itself for a positional argument (`flag` "")."""
    return f"{flag}{value}" if flag.endswith("=") or not flag else f"{flag} {value}"


def resolve_model_folder(path: str, flag: str = "--model") -> tuple[Path | None, dict | None]:
    """
    The local model folder a `--model` value means, and its PEFT adapter config when it is an adapter folder (its
    `adapter_config.json`, whose `base_model_name_or_path` is resolved by [`adapter_base`]); `(None, None)` for a Hub
    id. Raises [`CommandError`] naming the fix for a local path that does not exist, for a folder a save of lavit
    stopped in (`refuse_unfinished_save`), and for a training run's folder (it points at `final/`, whatever kind of
    folder that is, or the newest complete checkpoint). `flag`: how the user gave `path` (`--model`,
    `--visual_tokenizer`, `pretrained=`), so the fix names what they typed.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        if looks_like_local_path(path):
            raise CommandError(f"model folder not found: {path} (no such local folder)")
        problem = hub_id_problem(path)
        if problem:
            raise CommandError(f"{given_as(flag, path)}: no such local folder, and not a Hub model id either "
                               f"({problem}): give a model folder or a Hub id (name or org/name)")
        return None, None
    refuse_stopped_save(folder)  # every resolver goes through here
    if is_adapter_folder(folder):
        return folder, adapter_config(folder, path)
    try:  # a pipeline folder, or its language_model/ sub-folder, means its language model (`language_model_folders`)
        folders = language_model_folders(folder, with_processor=False) if folder.is_dir() else None
    except ValueError as error:
        raise CommandError(str(error)) from error
    if folders is not None:
        return folders[0], None
    if folder.is_dir() and not is_model_folder(folder):
        candidates = [folder / "final"] if is_model_folder(folder / "final") else []
        checkpoint = newest_complete_checkpoint(folder)
        candidates += [checkpoint] if checkpoint else []
        if candidates:
            raise CommandError(f"{path} is a training run's folder, not a model folder: use "
                               f"{' or '.join(given_as(flag, candidate) for candidate in candidates)}")
    return folder, None


def adapter_config(folder: Path, path: str) -> dict:
    """The `adapter_config.json` of a PEFT adapter folder, its `base_model_name_or_path` resolved by
    [`adapter_base`] (the base's language-model folder, or a Hub id): every loader of an adapter reads the base here."""
    try:
        adapter = loads_json((folder / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CommandError(f"{folder / 'adapter_config.json'} is not valid JSON: {error}") from error
    if not isinstance(adapter, dict) or not adapter.get("base_model_name_or_path"):
        raise CommandError(f"{path} is a PEFT adapter folder whose adapter_config.json names no "
                           f"base_model_name_or_path: set it to the model the adapter was trained on")
    return {**adapter, "base_model_name_or_path": adapter_base(folder, adapter["base_model_name_or_path"])}


def adapter_base(folder: Path, base) -> str:
    """
    The base model that the `base_model_name_or_path` (`base`) of the adapter in `folder` means: the folder of its
    LaVIT language model (`base` may be a model folder, a `LaVITPipeline` folder or its `language_model/`, as for
    `--model`), or `base` itself for a Hub id. A relative `base` (what PEFT records from the folder training ran in)
    is looked for from the current folder and from the adapter folder's ancestors: found from one, that one; found
    from both as two different folders, refused (the current folder would silently mean another model).

    Raises:
        CommandError: one line naming the adapter's `adapter_config.json`, the value and the fix, for a base that is
            not a string, not found, ambiguous, not a LaVIT model, or itself an adapter (not merged into its base).
    """
    config_file = folder / "adapter_config.json"

    def refused(problem: str, fix: str = "set it to the absolute path of the model the adapter was trained on"):
        return CommandError(f"{config_file} names base_model_name_or_path {base!r:.200}, {problem}: {fix}")

    if not isinstance(base, str):
        raise refused("which is not a path or a Hub id (a string)")
    local = Path(base).expanduser()
    if not local.is_absolute():
        here = Path.cwd() / local if (Path.cwd() / local).exists() else None
        beside = next((ancestor / local for ancestor in folder.resolve().parents if (ancestor / local).exists()), None)
        if here is not None and beside is not None and here.resolve() != beside.resolve():
            raise refused(f"a relative path that means two different folders: {here.resolve()} from the current "
                          f"folder and {beside} from the adapter's folder", "set it to the absolute path of the one "
                          "the adapter was trained on")
        local = here or beside
        if local is None:
            if looks_like_local_path(base):
                raise refused(f"a relative path found neither from the current folder ({Path.cwd()}) nor from the "
                              f"adapter's folder")
            return base  # a Hub id
    elif not local.exists():
        raise refused("which does not exist (moved or deleted?)", "set it to where the base model is now")
    return str(local_adapter_base(local, refused))


def local_adapter_base(local: Path, refused) -> Path:
    """The language-model folder of an adapter's local base `local`, or `refused(problem, fix)` raised: a base that is
    itself an adapter (its own base would be dropped), a run's folder, or a folder without a LaVIT language model."""
    if is_adapter_folder(local):
        raise refused("itself a PEFT adapter folder (trained on another base), so its adapters would be lost",
                      f"merge it into its base first (lavit export MERGED --model {local}) and set "
                      f"base_model_name_or_path to MERGED")
    try:
        model_folder = resolve_model_folder(str(local), "base_model_name_or_path=")[0]
        folders = language_model_folders(model_folder, with_processor=False) if model_folder.is_dir() else None
    except (CommandError, ValueError) as error:
        raise refused(f"which is not usable ({error})", "set it to the LaVIT model the adapter was trained "
                      "on") from error
    if folders is None:
        raise refused("which holds no LaVIT model (a config.json of model_type 'lavit', or a LaVITPipeline folder)",
                      "set it to the LaVIT model the adapter was trained on")
    return folders[0]


MODEL_KINDS = {"lavit": "a LaVIT model", "lavit_tokenizer": "a LaVIT visual tokenizer",
               "lavit_detokenizer": "a LaVIT pixel decoder (detokenizer)"}
# the kind of an input that takes a model of another library (stage 2's causal LM, stage 1's vision tower): any
# model_type but LaVIT's
NOT_LAVIT = "not_lavit"


def require_folder(path: str, model_types: tuple[str, ...] = (), flag: str = "--model", adapters: bool = True,
                   lora: bool = False) -> None:
    """
    Checks a model input before anything is built: a path that does not exist must look like a Hub id (`name` or
    `org/name`); a local folder is found by [`resolve_model_folder`] (a run's folder and a stopped save are refused
    with their fix) and must hold a `config.json` of one of `model_types` (a model of the wrong kind would be built
    from default sizes). A PEFT adapter folder stands for its base (which must be of the kind) where `adapters`, and
    is refused where a whole model is needed (a training stage's starting point), with the ways on
    ([`adapter_folder_problem`]; `lora`: the command takes `--lora`). `flag`: the argument that gave `path`, named in
    every fix.
    """
    local = Path(path).expanduser()
    if not adapters and local.is_dir() and is_adapter_folder(local):  # whatever its base: it is not one model
        refuse_stopped_save(local)
        raise CommandError(adapter_folder_problem(path, flag, lora))
    folder, adapter = resolve_model_folder(path, flag)
    part = pipeline_part_problem(path, flag) if folder is not None else None  # a pipeline's unet/, vae/...
    if part and not model_types:  # a command of any LaVIT model
        raise CommandError(part)
    if folder is None or not model_types:
        return
    if adapter is not None:
        require_folder(adapter["base_model_name_or_path"], model_types, "base_model_name_or_path=")
        return
    if not (folder / "config.json").is_file():
        raise CommandError(part or f"{given_as(flag, path)} is not a model folder (no config.json)")
    try:
        model_type = loads_json((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CommandError(f"{folder / 'config.json'} is not a JSON object: {error}") from error
    if model_types == (NOT_LAVIT,):
        if model_type in MODEL_KINDS:
            raise CommandError(f"{given_as(flag, path)} holds {MODEL_KINDS[model_type]}, but this takes a model of "
                               f"another library (a causal LM, a vision model), not one of LaVIT's")
        return
    if model_type not in model_types:
        kind = MODEL_KINDS.get(model_type, f"a model of type {model_type!r}")
        wanted = " or ".join(MODEL_KINDS[name] for name in model_types)
        raise CommandError(part or f"{given_as(flag, path)} holds {kind}, but this command needs {wanted} folder")


def lavit_model_paths(path: str, flag: str = "--model") -> tuple[str, str]:
    """`(model, processor)` paths of the LaVIT model `path` names, for every loader of a whole model (training, the
    server): for a local folder what `language_model_folders` finds (a model folder, a `LaVITPipeline` folder, or its
    `language_model/`), else `path` for both (a Hub id).

    Raises:
        ValueError: a pipeline folder without a language model, a language model without its processor, a PEFT
            adapter folder (the message names the two ways on), or a folder that holds no LaVIT language model (a
            pipeline's other part named with its pipeline)."""
    folder = Path(path).expanduser()
    if is_adapter_folder(folder):
        raise ValueError(adapter_folder_problem(path, flag))
    if not folder.is_dir():
        return path, path
    folders = language_model_folders(path)
    if folders is None:
        raise ValueError(pipeline_part_problem(path, flag) or f"{given_as(flag, path)} holds no LaVIT language model: "
                                                              f"give a LaVIT model folder or a LaVITPipeline folder")
    return str(folders[0]), str(folders[1])


def pipeline_part_problem(path: str, flag: str) -> str | None:
    """For a folder of the wrong kind that is a part of a `LaVITPipeline` folder (its `unet/`, `vae/`,
    `processor/`...): the sentence that names the pipeline to give instead; None otherwise."""
    real = Path(path).expanduser().resolve()
    if real.name == "language_model" or not is_lavit_pipeline_folder(real.parent):
        return None
    return f"{given_as(flag, path)} is the {real.name}/ part of the LaVITPipeline folder {real.parent}: give the " \
           f"pipeline folder"


def require_model_inputs(*arguments) -> None:
    """[`require_folder`] for every field of a training stage's arguments dataclasses that declares the kinds of model
    folder it reads (`lavit.paths.path_field(model_kinds=...)`): every route into a stage (`lavit COMMAND`,
    `python -m`, a config file, a launcher's ranks) checks each of its model inputs alike, with its flag's name."""
    from lavit.paths import ADAPTERS
    from lavit.paths import MODEL_KINDS as KINDS_KEY

    for parsed in arguments:
        if not dataclasses.is_dataclass(parsed):
            continue
        fields = dataclasses.fields(parsed)
        takes_lora = any(field.name == "lora" for field in fields)
        for field in fields:
            value = getattr(parsed, field.name)
            if KINDS_KEY in field.metadata and value:
                require_folder(value, field.metadata[KINDS_KEY], f"--{field.name}", field.metadata[ADAPTERS],
                               lora=takes_lora)


def adapter_folder_problem(path: str, flag: str, lora: bool = False) -> str:
    """Why a PEFT adapter folder cannot be given as `flag` where a whole model is needed (transformers would load it
    with its adapters frozen, so training finds no weight to train, and a pipeline saved beside it would lack its
    base), and what to give instead: the merged model, or (`lora`) a new adapter on its base."""
    try:  # the base as every command finds it (a relative one from here or the adapter's folder)
        base = adapter_config(Path(path).expanduser(), path)["base_model_name_or_path"]
    except (OSError, CommandError):
        base = None
    merged = (f"merge the adapter into its base first (lavit export MERGED --model {path}) and give "
              f"{given_as(flag, 'MERGED')}")
    if not lora:
        return f"{given_as(flag, path)} is a PEFT (LoRA) adapter folder, not a whole model, which this needs: {merged}"
    return (f"{given_as(flag, path)} is a PEFT (LoRA) adapter folder, not a whole model: training starts from a whole "
            f"model. Give its base model with a new adapter ({flag} {base or 'BASE'} --lora), or {merged}; to "
            f"continue the run that saved the adapter, run it again with the same --output_dir (it resumes from its "
            f"newest checkpoint)")


def load_lavit_model(path: str, flag: str = "--model", **kwargs):
    """`LaVITForCausalLM` and `LaVITProcessor` of a model folder, a Hub id, or a PEFT adapter folder (the base model
    named in its `adapter_config.json` ([`adapter_base`]), with the adapters merged; the processor of the adapter
    folder when it has one, else the base's). `flag`: how the user gave `path` (see [`resolve_model_folder`])."""
    from lavit import LaVITForCausalLM, LaVITProcessor

    folder, adapter = resolve_model_folder(path, flag)
    if adapter is None:
        try:
            model_path, processor_path = lavit_model_paths(path, flag)
        except ValueError as error:
            raise CommandError(str(error)) from error
        model = from_pretrained_explained(LaVITForCausalLM, model_path, **kwargs)
        return model.eval(), LaVITProcessor.from_pretrained(processor_path)
    from peft import PeftModel

    base = adapter["base_model_name_or_path"]
    try:
        model = from_pretrained_explained(LaVITForCausalLM, base, **kwargs)
    except OSError as error:  # a Hub id (or a relative path found nowhere, read as one) that cannot be fetched
        raise CommandError(f"{folder / 'adapter_config.json'} names base_model_name_or_path {base!r}, which could not "
                           f"be loaded ({one_line(error)}): set it to the path of the model the adapter was trained "
                           f"on, or to a Hub id that can be downloaded") from error
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
    has_processor = (folder / "processor_config.json").is_file() or (folder / "tokenizer_config.json").is_file()
    if has_processor:
        return model, LaVITProcessor.from_pretrained(folder)
    try:
        base_folders = language_model_folders(base) if Path(base).is_dir() else None
    except ValueError as error:
        raise CommandError(f"{folder} (a PEFT adapter folder without a processor): {error}") from error
    return model, LaVITProcessor.from_pretrained(base_folders[1] if base_folders else base)


def from_pretrained_explained(model_class, path, **kwargs):
    """`model_class.from_pretrained(path)`; when transformers refuses weights whose shapes differ from the config
    ("look at the above report", a report that may not be shown), the error names the parameters and shapes."""
    try:
        return model_class.from_pretrained(path, **kwargs)
    except RuntimeError as error:
        if "above report" not in str(error) or not Path(path).is_dir():
            raise
        mismatches = weight_mismatches(Path(path), model_class)
        listed = "; ".join(mismatches[:3]) + (f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else "")
        raise CommandError(f"{path}: the weights do not fit the model its config.json describes"
                           f"{': ' + listed if listed else ''}; the config.json does not belong to these weights "
                           f"(or was edited): restore it") from error


def weight_mismatches(folder: Path, model_class) -> list[str]:
    """`name: shape in FILE, shape from config.json` for each stored weight whose shape differs from the model that
    the folder's config.json builds (built on the meta device: no memory)."""
    import torch
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {name: tuple(tensor.shape)
                    for name, tensor in model_class(model_class.config_class.from_pretrained(folder)).state_dict()
                    .items()}
    found = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                shape = tuple(weights.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    found.append(f"{name} is {list(shape)} in {file.name} but {list(expected[name])} from config.json")
    return found


def load_visual_tokenizer_of(path: str, flag: str = "--model"):
    """The visual tokenizer of a tokenizer or LaVIT folder, a Hub id, or a PEFT adapter folder (its merged model's)."""
    from lavit.training.models import load_visual_tokenizer

    folder, adapter = resolve_model_folder(path, flag)
    if adapter is not None:
        return load_lavit_model(path, flag)[0].model.visual_tokenizer
    return load_visual_tokenizer(str(folder) if folder is not None else path)


def seeded_selection(seed: int, mode: str | None = None, max_tokens: int | None = None):
    """A `LaVITImageSelection` with a fresh generator seeded with `seed`: a sampled selection repeats run to run."""
    import torch

    from lavit import LaVITImageSelection

    return LaVITImageSelection(mode=mode, max_tokens=max_tokens, generator=torch.Generator().manual_seed(seed))


def per_image_selection(model, pixel_values, seed: int, mode: str | None = None, max_tokens: int | None = None) -> dict:
    """The selection arguments of `generate` for a batch of images (`pixel_values`, (B, 3, H, W)). A sampled
    selection (`mode`, or the visual tokenizer's `selection_mode`) is drawn image by image, each from its own
    generator seeded with `seed`, so an image gets the same visual tokens alone, in any batch and on every run."""
    import torch

    sampled = (mode or model.visual_tokenizer.config.selection_mode) == "sample"
    if not sampled or max_tokens is not None:
        return {"image_selection": seeded_selection(seed, mode, max_tokens)}
    keep_masks = [model.visual_tokenizer.tokenize(image[None], selection=seeded_selection(seed, mode)).keep_mask
                  for image in pixel_values]
    return {"image_keep_mask": torch.cat(keep_masks)}
