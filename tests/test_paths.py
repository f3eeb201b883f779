"""Issue 24 section 1: lavit never destroys what it did not create.

The surface is found from the parsers: every argument of every `lavit` command (the argparse commands of
`lavit/cli.py` and the training stages' dataclass parsers) either declares a path role (`lavit.paths`) or is listed
below as text; every command with an output is run against every one of its inputs in each path relation.
"""

import ast
import json
import os
import resource
import signal
import stat
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lavit.atomic import (
    MARKER_FILE,
    NotLavitFolderError,
    fresh_staging_folder,
    is_lavit_folder,
    mark_folder,
    recover_folder,
    replace_folder,
    save_png_atomically,
    write_atomically,
    write_json_atomically,
)
from lavit.cli import build_parser, dashed_flag, main
from lavit.paths import CHECKPOINT, INPUT, OUTPUT, PathConflictError, check_destination, check_paths, path_role

# lavit's own string arguments that are not paths (a new argument must be given a role or be added here)
TEXT_ARGUMENTS = {
    "prompt", "prompts", "question", "repo_id", "token", "max_shard_size", "image_pattern", "columns", "split",
    "eval_split", "host", "served_model_name",
    "image_column",
    "text_column", "attn_implementation", "order", "task", "lora_target_modules", "device", "preset",
}


def subcommands() -> dict:
    parser = build_parser()
    return next(action for action in parser._actions if action.dest == "command").choices


def lavit_arguments(command_parser):
    """The arguments of a command that lavit declares (TrainingArguments' own fields are transformers')."""
    from lavit.training.arguments import LaVITTrainingArguments
    from transformers import TrainingArguments

    trainer_fields = {field for field in TrainingArguments.__dataclass_fields__} - {"output_dir"}
    own = set(LaVITTrainingArguments.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)
    for action in command_parser._actions:
        if action.dest == "help" or (action.dest in trainer_fields and action.dest not in own):
            continue
        yield action


def is_text(action) -> bool:
    return action.nargs != 0 and not action.choices and action.type in (None, str)


def test_every_path_argument_of_every_command_declares_its_role():
    unclassified, roles = [], {}
    for name, command_parser in subcommands().items():
        for action in lavit_arguments(command_parser):
            role = path_role(action)
            if role is not None:
                roles.setdefault(name, {})[action.dest] = role
            elif is_text(action) and action.dest not in TEXT_ARGUMENTS:
                unclassified.append(f"{name} {action.dest}")
    assert not unclassified, f"string arguments without a path role (lavit.paths) or a TEXT_ARGUMENTS entry: " \
                             f"{unclassified}"
    # every command that writes has its output declared, the training stages included
    for name in ("train-tokenizer", "train", "finetune", "train-detokenizer"):
        assert roles[name]["output_dir"] == OUTPUT and roles[name]["resume"] == CHECKPOINT
    outputs = {name for name, declared in roles.items() if OUTPUT in declared.values()}
    assert outputs == {"demo", "tokenize", "generate", "reconstruct", "evaluate", "new-language-model",
                       "train-tokenizer", "train", "finetune", "pretokenize", "train-detokenizer", "convert-original",
                       "export"}


def test_every_path_argument_of_every_command_refuses_an_empty_path():
    """The attack of #24: `lavit evaluate --output ''` wrote its results into the current folder (the output checks
    skip values that were not given, and '' looked like one). Every path argument of every command, found from the
    parsers, refuses it at parse time, and a stage's config file, which skips the flags' types, at the guard."""
    import argparse

    from lavit.training.arguments import FinetuningArguments

    checked = 0
    for command_parser in subcommands().values():
        for action in command_parser._actions:
            if path_role(action) is not None:
                with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
                    action.type("")
                with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
                    action.type("  ")
                checked += 1
    assert checked >= 40, checked
    with pytest.raises(PathConflictError, match="--eval_data '': an empty path"):
        check_paths(FinetuningArguments(data="photos", eval_data=""))


def relations(tmp_path: Path, source: Path) -> dict[str, str]:
    """Destinations in each relation to the input folder `source` (tmp/work/source)."""
    (tmp_path / "link").symlink_to(source)
    (source / "child").mkdir()
    (tmp_path / "jump").symlink_to(source / "child")
    return {
        "is": str(source),
        "inside": str(source / "sub" / "out"),
        "contains": str(source.parent),
        "through a symlink": str(tmp_path / "link"),
        "relative from another directory": os.path.relpath(source, tmp_path / "elsewhere"),
        "with ..": str(source / "sub" / ".." / ".." / source.name),
        "with .. after a symlink": str(tmp_path / "jump" / ".."),  # physically the source itself
    }


def command_line(name, command_parser, output, destination, source_action, source) -> list[str]:
    """A command line of `name` with `destination` for its `output` argument and `source` for one input argument;
    the other required arguments get placeholder values."""
    positional, options = [], []
    for action in lavit_arguments(command_parser):
        if action is output:
            value = destination
        elif action is source_action:
            value = source
        elif action.required or not action.option_strings:
            value = "does-not-exist" if path_role(action) else str(action.choices[0]) if action.choices else "x"
        else:
            continue
        if action.option_strings:
            options += [action.option_strings[0], value]
        else:
            positional.append(value)
    return [name, *positional, *options]


def writing_cases():
    for name, command_parser in subcommands().items():
        arguments = list(lavit_arguments(command_parser))
        for output in (action for action in arguments if path_role(action) == OUTPUT):
            for source in (action for action in arguments if path_role(action) == INPUT):
                yield name, command_parser, output, source


def parse_and_check(command_parser, argv):
    if hasattr(command_parser, "parse_args_and_config"):  # a training stage: its parser runs the guard
        return command_parser.parse_args_and_config(argv)
    return check_paths(command_parser.parse_args([dashed_flag(arg) for arg in argv]))


def test_no_command_writes_over_any_of_its_inputs_in_any_path_relation(tmp_path, monkeypatch, capsys):
    cases = list(writing_cases())
    assert len(cases) >= 35  # every (output, input) pair of every writing command
    for index, (name, command_parser, output, source_action) in enumerate(cases):
        root = tmp_path / str(index)
        source = root / "work" / "source"
        source.mkdir(parents=True)
        (source / "keep.txt").write_text("the user's")
        (root / "elsewhere").mkdir()
        monkeypatch.chdir(root / "elsewhere")
        for relation, destination in relations(root, source).items():
            argv = command_line(name, command_parser, output, destination, source_action, str(source))
            if relation == "is":  # the whole command: one line, exit status 1
                code = main(argv)
                err = capsys.readouterr().err.strip().splitlines()
                assert code == 1 and len(err) == 1, (argv, err)
                assert "could destroy it" in err[0] and "LAVIT_DEBUG" not in err[0], (relation, argv, err)
            else:  # the same parser and guard, without building the parsers again (fast)
                with pytest.raises(PathConflictError, match="could destroy it"):
                    parse_and_check(command_parser, argv[1:])
            assert (source / "keep.txt").read_text() == "the user's" and sorted(os.listdir(source)) == [
                "child", "keep.txt"], (relation, argv)


def test_the_guard_compares_resolved_paths_and_skips_inputs_not_on_disk(tmp_path):
    (tmp_path / "model").mkdir()
    check_destination(tmp_path / "model-export", {"--model": str(tmp_path / "model")})  # a sibling: fine
    check_destination(tmp_path / "out", {"--model": "org/name", "--data": None})  # a Hub id: nothing to destroy
    with pytest.raises(PathConflictError, match="contains the input --model"):
        check_destination(tmp_path, {"--model": [str(tmp_path / "other"), str(tmp_path / "model")]})


def test_export_of_a_run_into_the_run_folder_is_refused_and_the_run_kept(tmp_path, lavit_folder, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.replace(lavit_folder, runs / "final")
    (runs / "logs.jsonl").write_text("{}\n")
    assert main(["export", str(runs), "--model", str(runs / "final")]) == 1
    assert "contains the input model" in capsys.readouterr().err
    assert (runs / "logs.jsonl").is_file() and (runs / "final" / "config.json").is_file()


def test_a_folder_lavit_did_not_make_is_never_replaced_renamed_or_deleted(tmp_path, lavit_folder, capsys):
    hub = tmp_path / "hub"
    for user_folder in (hub, tmp_path / "hub.tmp"):  # the destination itself, or the name of lavit's staging
        user_folder.mkdir()
        (user_folder / "mine.txt").write_text("the user's")
        assert main(["export", str(hub), "--model", str(lavit_folder)]) == 1
        err = capsys.readouterr().err
        assert "not made by lavit" in err and "move or delete" in err and str(user_folder) in err
        assert (user_folder / "mine.txt").read_text() == "the user's"
        (user_folder / "mine.txt").unlink()
        user_folder.rmdir()
    # a user's `hub.old` is not taken for lavit's backup: exported twice, it stays as it was
    (tmp_path / "hub.old").mkdir()
    (tmp_path / "hub.old" / "mine.txt").write_text("the user's")
    for _ in range(2):
        assert main(["export", str(hub), "--model", str(lavit_folder)]) == 0
    assert (tmp_path / "hub.old" / "mine.txt").read_text() == "the user's" and is_lavit_folder(hub)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub", "hub.old", "lavit"]


def test_replace_folder_touches_only_marked_folders(tmp_path):
    target = tmp_path / "target"
    staging = fresh_staging_folder(target)
    (staging / "a.txt").write_text("new")
    replace_folder(staging, target)
    assert is_lavit_folder(target) and (target / MARKER_FILE).is_file()
    # a file the user added to lavit's folder keeps the folder from being replaced (and deleted)
    (target / "notes.txt").write_text("the user's")
    with pytest.raises(NotLavitFolderError, match=r"did not write or that changed since lavit wrote them \(notes"):
        fresh_staging_folder(target)
    (target / "notes.txt").unlink()
    replace_folder(fresh_staging_folder(target), target)  # lavit's own files only: replaced
    assert not (target / "a.txt").exists() and is_lavit_folder(target)
    # a backup of the user's, a staging folder of the user's, a link to a lavit folder: all refused, all kept
    user = tmp_path / "target.old"
    user.mkdir()
    (user / "mine.txt").write_text("mine")
    recover_folder(target)
    assert (user / "mine.txt").is_file()
    (tmp_path / "elsewhere").symlink_to(target)
    with pytest.raises(NotLavitFolderError, match="not made by lavit"):
        fresh_staging_folder(tmp_path / "elsewhere")
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / MARKER_FILE).write_text("not json")
    assert not is_lavit_folder(forged)
    with pytest.raises(NotLavitFolderError):
        replace_folder(mark_folder(tmp_path / "forged.tmp"), forged)
    assert (forged / MARKER_FILE).read_text() == "not json"


def test_new_language_model_refuses_a_users_folder(tmp_path, capsys):
    output = tmp_path / "lm"
    output.mkdir()
    (output / "config.json").write_text('{"mine": true}')
    texts = tmp_path / "texts.txt"
    texts.write_text("a small corpus\nof two lines\n")
    assert main(["new-language-model", str(output), "--texts", str(texts), "--vocab-size", "40"]) == 1
    assert "not made by lavit" in capsys.readouterr().err
    assert json.loads((output / "config.json").read_text()) == {"mine": True}
    assert main(["new-language-model", str(tmp_path / "lm2"), "--texts", str(texts), "--vocab-size", "40"]) == 0
    assert main(["new-language-model", str(tmp_path / "lm2"), "--texts", str(texts), "--vocab-size", "40"]) == 0
    assert (tmp_path / "lm2" / "config.json").is_file() and not (tmp_path / "lm2.tmp").exists()


# ------------------------------------------------------------------------------------------------ writes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_written_atomically_get_the_permissions_of_a_plain_write(tmp_path, umask):
    from PIL import Image

    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        write_json_atomically(tmp_path / "new.json", {"a": 1})
        save_png_atomically(Image.new("RGB", (4, 4)), tmp_path / "new.png")
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    for name in ("new.json", "new.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name
    os.chmod(tmp_path / "new.json", 0o640)  # a replaced file keeps its own mode, as `open(path, "w")` keeps it
    write_json_atomically(tmp_path / "new.json", {"a": 2})
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


def test_evaluate_record_on_a_full_disk_keeps_valid_json(tmp_path):
    """A write that fails half way (here the file size limit, as a full disk would) leaves the old file whole."""
    from lavit.evaluation import record_results

    (tmp_path / "lavit_run.json").write_text(json.dumps({"model_name": "mine"}))
    rows = [{"metric": f"m{index}", "value": 1.0, "dataset_name": "d" * 200} for index in range(200)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            record_results(tmp_path, {"evaluation": rows})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert json.loads((tmp_path / "lavit_run.json").read_text()) == {"model_name": "mine"}
    assert os.listdir(tmp_path) == ["lavit_run.json"]  # no temporary file left
    record_results(tmp_path, {"evaluation": rows})
    assert len(json.loads((tmp_path / "lavit_run.json").read_text())["evaluation"]) == 200


WRITING_CALLS = {"write_text", "write_bytes", "dump", "save", "savefig", "to_json", "to_csv"}


def plain_writes(path: Path) -> list[str]:
    """Calls in `path` that write a file in place (`x.write_text`, `json.dump`, `open(..., "w")`), other than
    inside the callback given to `write_atomically` (which writes its temporary file)."""
    tree = ast.parse(path.read_text())
    inside_writer = set()
    for node in ast.walk(tree):
        called = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
        if called == "write_atomically":
            inside_writer |= {id(child) for argument in node.args for child in ast.walk(argument)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside_writer:
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        modes = [argument.value for argument in node.args[1:2] + [keyword.value for keyword in node.keywords
                 if keyword.arg == "mode"] if isinstance(argument, ast.Constant)]
        opened_for_writing = name == "open" and any(set(str(mode)) & set("wx") for mode in modes)
        if opened_for_writing or (name in ("write_text", "write_bytes") or (name == "dump" and getattr(
                node.func.value, "id", "") == "json")):
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def test_every_file_write_of_lavit_goes_through_the_atomic_writer():
    """lavit/, training/ and hub_cards/ write files only through `lavit.atomic` (appends to logs excepted: a
    crash cuts at most their last line, which their readers drop)."""
    found = []
    for folder in ("lavit", "training", "hub_cards"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path.name != "atomic.py":
                found += plain_writes(path)
    assert not found, f"files written in place (use lavit.atomic.write_atomically): {found}"


def test_write_atomically_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomically(target, {"v": 1})

    def half_then_fail(temporary):
        Path(temporary).write_text('{"v": ')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["a.json"]


def test_a_training_run_refuses_a_users_final_folder_before_training(tmp_path, capsys):
    from lavit.training.arguments import LaVITTrainingArguments

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "mine.txt").write_text("the user's")
    with pytest.raises(NotLavitFolderError, match="will not replace"):
        LaVITTrainingArguments(output_dir=str(tmp_path / "run"))
    assert main(["finetune", "--data", str(tmp_path / "data"), "--model", "org/name", "--output_dir",
                 str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not made by lavit" in err[0] and (final / "mine.txt").is_file()
    mark_folder(final)  # a final folder of an earlier lavit run: training may replace it
    LaVITTrainingArguments(output_dir=str(tmp_path / "run"))


def test_checkpoint_rotation_deletes_only_complete_checkpoints_lavit_wrote(tmp_path):
    from lavit.training.checkpoints import rotate_complete_checkpoints, write_completion_marker

    for step in (1, 2, 3, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * step)
        write_completion_marker(folder)
    (tmp_path / "checkpoint-0").mkdir()  # a user's folder (or a crashed, incomplete one): no completion marker
    (tmp_path / "checkpoint-0" / "mine.txt").write_text("the user's")
    rotate_complete_checkpoints(tmp_path, 2, best_checkpoint=str(tmp_path / "checkpoint-1"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-0", "checkpoint-1", "checkpoint-4"]
    assert (tmp_path / "checkpoint-0" / "mine.txt").is_file()


@pytest.mark.parametrize("change", ["added", "edited_same_size", "edited_time_set_back", "none"])
def test_checkpoint_rotation_keeps_a_checkpoint_the_user_changed_after_lavit_completed_it(tmp_path, change):
    """A complete checkpoint with a file added or written to after its completion marker holds the user's work:
    rotation leaves it (with a warning), whatever the size or modification time of the change says."""
    from lavit.training.checkpoints import rotate_complete_checkpoints, write_completion_marker

    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 8)
        write_completion_marker(folder)
    oldest = tmp_path / "checkpoint-1" / "model.safetensors"
    if change == "added":
        (tmp_path / "checkpoint-1" / "notes.txt").write_text("the user's")
    elif change.startswith("edited"):
        before = oldest.stat()
        time.sleep(0.01)
        oldest.write_bytes(b"y" * 8)  # same size
        if change == "edited_time_set_back":
            os.utime(oldest, ns=(before.st_atime_ns, before.st_mtime_ns))
    rotate_complete_checkpoints(tmp_path, 2)
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert kept == (["checkpoint-2", "checkpoint-3"] if change == "none" else
                    ["checkpoint-1", "checkpoint-2", "checkpoint-3"])


def test_numbered_outputs_are_checked_each(tmp_path, capsys):
    """`--visualize out.png` with two images writes out-0.png and out-1.png: neither may be one of the images."""
    images = [tmp_path / "a.png", tmp_path / "out-1.png"]
    for image in images:
        image.write_bytes(b"the user's")
    assert main(["tokenize", *map(str, images), "--model", "org/name", "--visualize", str(tmp_path / "out.png")]) == 1
    assert "could destroy it" in capsys.readouterr().err
    assert all(image.read_bytes() == b"the user's" for image in images)
