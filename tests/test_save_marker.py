"""Issue 33: the save mechanism's marker (`.lavit_folder.json`) and what it vouches for, attacked.

F1 a destination holding only a link is not empty, and nothing is written or removed through a link; F2 a finished
save clears only its own pending names; F6 "inside a staging folder" is decided by construction; F7/F8 a marker of
the wrong shape is refused before anything is written; U1 one rule of ownership (`lavit.atomic` too); U2 every file
lavit writes into a lavit folder is recorded; U8 a stopped save is said first by the command-input resolver;
abandoned staging folders are removed only when provably lavit's. Every class of lavit that saves is enumerated
(`saving_instances` of test_user_files, checked against the classes found from the modules).
"""

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lavit.modeling import saving_lavit
from lavit.modeling.saving_lavit import (
    MARKER_FILE,
    NotLavitFilesError,
    UnfinishedSaveError,
    marker_problem,
    read_marker,
)
from test_user_files import every_saving_class, folder_loader, saving_instances, snapshot

# the classes the issue names; every class that saves is checked by the enumerating test of test_user_files
NAMED = ["LaVITTokenizerModel", "LaVITForCausalLM", "LaVITProcessor", "LaVITImageProcessor", "LaVITDetokenizer",
         "LaVITPipeline"]


@pytest.fixture
def builders(tmp_path, lavit_model, lavit_processor):
    found = saving_instances(tmp_path / "sources", lavit_model, lavit_processor)
    assert set(NAMED) <= set(found) and {cls.__name__ for cls in every_saving_class()} - set(found) <= {
        name for name in (cls.__name__ for cls in every_saving_class()) if name.endswith(("PreTrainedModel", "Mixin"))}
    return found


def written_names(obj, folder: Path) -> list[Path]:
    obj.save_pretrained(folder)
    return [Path(name) for name in saving_lavit.folder_entries(folder) if Path(name).name != MARKER_FILE]


# ------------------------------------------------------------------------------------------------ F1


def test_a_link_of_any_kind_makes_a_folder_not_empty(tmp_path):
    (tmp_path / "mylm").mkdir()
    (tmp_path / "mylm" / "model.safetensors").write_text("the user's")
    for name, target in (("to_folder", tmp_path / "mylm"), ("to_file", tmp_path / "mylm" / "model.safetensors"),
                         ("dangling", tmp_path / "nowhere")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "language_model").symlink_to(target)
        assert saving_lavit._holds_files(folder), name
        assert saving_lavit.folder_entries(folder) == ["language_model"]


def test_no_save_writes_or_removes_through_a_link_in_its_destination(tmp_path, builders):
    """`dest/language_model -> ../mylm` (the user's shards) was taken for an empty folder and written through. Every
    class, and every folder it writes (and the top level): a destination holding only a link there, to a folder of
    the user's files named as the save names its own, to a file, or dangling. Whatever happens, the user's files and
    the links stay as they were."""
    for name in NAMED:
        obj, _ = builders[name]()
        names = written_names(obj, tmp_path / "probe" / name)
        folders = sorted({path.parent for path in names if path.parent != Path(".")})
        cases = [(folder, "folder") for folder in folders] + [(names[0], "file"), (names[-1], "dangling")]
        for index, (linked, kind) in enumerate(cases):
            user = tmp_path / "user" / name / str(index)
            user.mkdir(parents=True)
            for path in names:  # the user's own files, under the very names the save writes
                if kind == "folder" and path.parent == linked:
                    (user / path.name).write_text("the user's")
            (user / "notes.txt").write_text("the user's")
            dest = tmp_path / "dest" / name / str(index)
            (dest / linked).parent.mkdir(parents=True, exist_ok=True)
            (dest / linked).symlink_to(user if kind == "folder" else user / "notes.txt" if kind == "file"
                                       else tmp_path / "nowhere")
            before, link = snapshot(user), os.readlink(dest / linked)
            try:
                obj.save_pretrained(dest)
            except NotLavitFilesError as error:
                assert len(str(error).splitlines()) == 1 and str(linked) in str(error), error
            else:
                assert kind != "folder", (name, linked)  # a save writing into a linked folder is always refused
            assert snapshot(user) == before, (name, linked, kind)
            assert os.readlink(dest / linked) == link, (name, linked, kind)
            assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------ F2


def stop_after_first_move(monkeypatch, obj, folder, **kwargs):
    """Saves `obj` into `folder` (holding an earlier save), stopped (a full disk) after its first file moved in."""
    real_replace, moved, staging = os.replace, [], f".{Path(folder).name}{saving_lavit.STAGING_INFIX}"

    def replace_then_stop(source, destination):
        if staging in str(source) and staging not in str(destination) and MARKER_FILE not in str(destination):
            moved.append(destination)
            if len(moved) == 2:
                raise OSError("No space left on device (the test's)")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_then_stop)
    with pytest.raises(OSError, match="the test's"):
        obj.save_pretrained(folder, **kwargs)
    monkeypatch.setattr(os, "replace", real_replace)


def stop_after_library_save(monkeypatch, obj, folder, **kwargs):
    """Saves `obj` into the new folder `folder`, stopped after the library wrote its files (a `"*"` record)."""
    library_save = type(obj)._save_folder

    def save_then_stop(self, target, *args, **more):
        library_save(self, target, *args, **more)
        raise OSError("No space left on device (the test's)")

    monkeypatch.setattr(type(obj), "_save_folder", save_then_stop)
    with pytest.raises(OSError, match="the test's"):
        obj.save_pretrained(folder, **kwargs)
    monkeypatch.setattr(type(obj), "_save_folder", library_save)


def test_another_finished_save_never_clears_a_stopped_saves_record(tmp_path, monkeypatch, builders, lavit_model,
                                                                   lavit_processor):
    """An LM save killed mid-move, then `processor.save_pretrained(same folder)` finished and cleared the record: the
    folder loaded A's weights with B's generation config. Every class, stopped mid-move over its earlier save;
    another object's save into the folder finishes; the folder is still refused, until the same save again finishes
    it."""
    for name in NAMED:
        obj, _ = builders[name]()
        other = lavit_processor if name not in ("LaVITProcessor", "LaVITImageProcessor") else lavit_model
        load = folder_loader(obj)
        for stop in (stop_after_first_move,):  # a save stopped before its first move leaves nothing in the folder
            folder = tmp_path / "stopped" / name / stop.__name__
            obj.save_pretrained(folder)
            stop(monkeypatch, obj, folder)
            other.save_pretrained(folder)
            pending = read_marker(folder)["saving"]
            assert isinstance(pending, list) and pending, (name, stop.__name__)
            with pytest.raises(UnfinishedSaveError, match="was being saved when that save stopped"):
                load(folder)
            obj.save_pretrained(folder)
            assert "saving" not in read_marker(folder), (name, stop.__name__, read_marker(folder).get("saving"))
            load(folder)


def test_a_stopped_sharded_save_is_finished_by_a_save_that_shards_otherwise(tmp_path, monkeypatch, lavit_model):
    """The stopped save left shards the next save does not write: they are removed as stale (they are weight files
    of the folder the new save writes weights into) and the record clears."""
    for first, second in (({"max_shard_size": "40KB"}, {}), ({}, {"max_shard_size": "40KB"})):
        folder = tmp_path / str(len(first))
        stop_after_library_save(monkeypatch, lavit_model, folder, **first)
        left = {path.name for path in folder.glob("model*.safetensors*")}
        lavit_model.save_pretrained(folder, **second)
        assert "saving" not in read_marker(folder)
        now = {path.name for path in folder.glob("model*.safetensors*")}
        assert not (left - now) & {path.name for path in folder.iterdir()}
        index = folder / "model.safetensors.index.json"
        listed = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
        assert {path.name for path in folder.glob("model*.safetensors")} == listed
        type(lavit_model).from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ F6


def test_a_users_folder_named_like_a_staging_folder_keeps_the_marker_on(tmp_path, monkeypatch, builders):
    """`.backup.saving-2024/proc` switched the marker off (and a mixed folder then loaded)."""
    for name in NAMED:
        obj, _ = builders[name]()
        folder = tmp_path / f".backup{saving_lavit.STAGING_INFIX}2024" / name
        assert not saving_lavit._inside_staging(folder)
        obj.save_pretrained(folder)
        assert read_marker(folder) and read_marker(folder)["files"], name
        stop_after_first_move(monkeypatch, obj, folder)
        with pytest.raises(UnfinishedSaveError):
            folder_loader(obj)(folder)


# ------------------------------------------------------------------------------------------------ F7/F8

WRONG_SHAPES = {
    "files a string": {"made_by": "lavit", "files": "abc"},
    "files a number": {"made_by": "lavit", "files": 5},
    "saving a number": {"made_by": "lavit", "files": {}, "saving": 5},
    "saving an object": {"made_by": "lavit", "files": {}, "saving": {"a": 1}},
    "a list": [1, 2],
    "a record of another shape": {"made_by": "lavit", "files": {"config.json": {"size": "big"}}},
    "a name outside the folder": {"made_by": "lavit", "files": {"../x": None}},
    "an absolute name": {"made_by": "lavit", "files": ["/etc/passwd"]},
    "another maker": {"made_by": "someone", "files": {}},
    "kind a number": {"made_by": "lavit", "kind": 3, "files": {}},
    "a name that is not text (found by hypothesis)": {"made_by": "lavit", "saving": [None]},
}


def plant(folder: Path, shape) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user.txt").write_text("mine")
    marker = folder / MARKER_FILE
    if shape == "a folder":
        marker.mkdir()
        (marker / "inside.txt").write_text("mine")
    elif shape == "a link":
        marker.symlink_to(folder / "user.txt")
    elif shape == "not JSON":
        marker.write_bytes(b"\xff\x00 not json")
    else:
        marker.write_text(json.dumps(WRONG_SHAPES[shape]))


def test_a_marker_of_the_wrong_shape_is_refused_before_anything_is_written(tmp_path, builders):
    """`"files": "abc"` raised AttributeError after the files moved, leaving "saving" for ever; a marker that is a
    folder raised IsADirectoryError and left a `.tmp`. Every class, every wrong shape: one line naming the marker
    and the fix, nothing written (nor beside the folder)."""
    for name in NAMED:
        obj, _ = builders[name]()
        for shape in [*WRONG_SHAPES, "a folder", "a link", "not JSON"]:
            folder = tmp_path / "wrong" / name / shape.replace(" ", "_")
            plant(folder, shape)
            before, beside = snapshot(folder.parent), sorted(folder.parent.parent.iterdir())
            with pytest.raises(NotLavitFilesError) as error:
                obj.save_pretrained(folder)
            assert len(str(error.value).splitlines()) == 1 and str(folder / MARKER_FILE) in str(error.value)
            assert "is not a marker lavit wrote" in str(error.value) and f"move {folder / MARKER_FILE}" in str(
                error.value), (name, shape)
            assert snapshot(folder.parent) == before and sorted(folder.parent.parent.iterdir()) == beside, shape


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=3) |
                           st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(json_values, st.fixed_dictionaries(
    {"made_by": st.just("lavit")}, optional={"files": json_values, "saving": json_values, "kind": json_values,
                                             "lavit_version": json_values})))
def test_the_one_reader_never_raises_and_every_reader_agrees(tmp_path_factory, content):
    """Any JSON at the marker's path: the reader answers a marker of lavit's shape or a problem, never raises, and
    every use of an accepted marker (ownership, the stopped-save check, a save's start and end) works on it."""
    folder = tmp_path_factory.mktemp("marker")
    (folder / "config.json").write_text("{}")
    (folder / MARKER_FILE).write_text(json.dumps(content))
    marker, problem = read_marker(folder), marker_problem(folder)
    assert (marker is None) != (problem is None)
    if marker is None:
        assert problem and not saving_lavit.written_by_lavit(folder, Path("config.json"))
        with pytest.raises(NotLavitFilesError, match="is not a marker lavit wrote"):
            saving_lavit.require_marker_shape(folder, "the test's folder")
        return
    saving_lavit.written_by_lavit(folder, Path("config.json"))
    try:
        saving_lavit.refuse_unfinished_save(folder)
    except UnfinishedSaveError:
        assert marker.get("saving")
    saving_lavit._begin_saving(folder, [Path("config.json")])
    saving_lavit.record_saved_files(folder, [Path("config.json")])
    assert marker_problem(folder) is None and "config.json" not in (read_marker(folder).get("saving") or [])


def test_json_nested_deeper_than_the_parser_goes_is_a_problem_not_a_crash(tmp_path):
    """The attack of #24 (S7): a marker nested 100,000 levels deep raised RecursionError out of the marker reader.
    Every JSON reader of lavit parses through `saving_lavit.loads_json` (a test finds any other), so such a file
    is bad JSON like any other: the marker, an index, a config, an adapter config."""
    import re

    from conftest import REPO_ROOT

    for folder in ("lavit", "modeling_lavit", "processing", "training", "hub_cards"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            direct = [line for line in path.read_text().splitlines()
                      if re.search(r"(?<![\w.])json\.loads?\((?!json\.dumps)", line) and "def loads_json" not in line]
            assert path.name == "saving_lavit.py" and len(direct) == 1 or not direct, (path, direct)
    from lavit.command_inputs import CommandError, adapter_config, require_folder
    from lavit.file_kinds import _json_problem

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / MARKER_FILE).write_text(deep)
    assert read_marker(tmp_path) is None and "not JSON" in marker_problem(tmp_path)
    with pytest.raises(NotLavitFilesError, match="is not a marker lavit wrote"):
        saving_lavit.require_marker_shape(tmp_path, "the test's folder")
    (tmp_path / "config.json").write_text(deep)
    assert "nested deeper than the JSON parser goes" in _json_problem(tmp_path / "config.json")
    with pytest.raises(CommandError, match="config.json is not a JSON object"):
        require_folder(str(tmp_path), ("lavit",))
    (tmp_path / "adapter_config.json").write_text(deep)
    with pytest.raises(CommandError, match="adapter_config.json is not valid JSON"):
        adapter_config(tmp_path, str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(deep)
    assert saving_lavit._loaded_from(tmp_path, {(Path("."), "model")}) == {Path("model.safetensors"),
                                                                          Path("model.safetensors.index.json")}


def test_a_save_over_a_part_of_a_lavit_folder_names_that_folder(pipeline_folder, lavit_model):
    """The attack of #24 (S14d): a language model saved into a pipeline's `unet/` was told the files there were not
    lavit's, though the pipeline's marker records them. The refusal names the folder whose files they are."""
    before = snapshot(pipeline_folder)
    with pytest.raises(NotLavitFilesError, match=rf"holds files of the folder lavit saved at {pipeline_folder} "
                                                 rf"\(config.json.*recorded by its marker\).*breaking that folder"):
        lavit_model.save_pretrained(pipeline_folder / "unet")
    assert snapshot(pipeline_folder) == before


# ------------------------------------------------------------------------------------------------ U1, U2, U8


def test_export_over_a_killed_save_uses_the_saves_rule_of_ownership(tmp_path, monkeypatch, lavit_model,
                                                                    lavit_folder, capsys):
    """`lavit export DEST` over a DEST a killed save of lavit 0.1 left (`"saving": "*"`) said "holds files lavit did
    not write",
    though the UnfinishedSaveError had said the next save may replace them."""
    from lavit.atomic import changed_files
    from lavit.cli import main

    dest = tmp_path / "hub"  # what a save of lavit 0.1 into a new folder, written in place, left when it stopped
    lavit_model.save_pretrained(dest)
    marker = read_marker(dest)
    (dest / MARKER_FILE).write_text(json.dumps({**{key: marker[key] for key in ("made_by", "kind", "lavit_version")},
                                                "saving": "*"}))
    assert changed_files(dest) == []
    assert main(["export", str(dest), "--model", str(lavit_folder)]) == 0, capsys.readouterr().err
    assert "saving" not in read_marker(dest)
    (dest / "mine.txt").write_text("the user's")  # a file no record names stays the user's
    assert changed_files(dest) == ["mine.txt"]


def test_every_file_lavit_writes_into_a_lavit_folder_is_recorded(tmp_path, lavit_folder, lavit_model):
    """`lavit evaluate --model RUN/final --record` wrote lavit_run.json unrecorded, so `finetune --resume no` then
    refused RUN/final as holding files lavit did not write. Every writer of lavit's that writes into a folder after
    its save (found from the sources: every call of lavit.atomic's JSON writers) records what it wrote."""
    from lavit.training.data import BatchRecordCounts

    from lavit.atomic import changed_files, require_lavit_folder
    from lavit.evaluation.runner import record_results

    root = Path(__file__).resolve().parents[1]
    calls = {}
    for path in [*root.glob("lavit/**/*.py"), *root.glob("training/*.py"), *root.glob("hub_cards/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(getattr(node, "func", None), "id", "")
            if isinstance(node, ast.Call) and name.startswith("write_") and name.endswith(("atomically", "recorded")):
                calls.setdefault(name, set()).add(str(path.relative_to(root)))
    unrecorded = {  # writers that write into no lavit folder, or must not change its marker
        "lavit/atomic.py": "the writers themselves, the marker's own writes",
        "hub_cards/export.py": "an export's staging folder, marked with every file when it is swapped in",
        "lavit/resumable.py": "a run's folder (its lock and resume fingerprint): not a saved folder",
        "training/sample_data.py": "a data folder",
        "training/checkpoints.py": "the completion marker lists the lavit marker as it is: it must not change after",
    }
    assert set().union(*(found for name, found in calls.items() if name != "write_json_recorded")) <= set(
        unrecorded), calls
    assert {"lavit/evaluation/runner.py", "training/data.py", "lavit/demo.py"} <= calls["write_json_recorded"]
    final = tmp_path / "run" / "final"
    lavit_model.save_pretrained(final)
    record_results(final, {"evaluation": [{"metric": "CIDEr", "value": 1.0, "dataset_name": "coco"}]})
    checkpoint = tmp_path / "run" / "checkpoint-1"
    lavit_model.save_pretrained(checkpoint)
    BatchRecordCounts.save(checkpoint, (1, 7))
    for folder in (final, checkpoint):
        assert changed_files(folder) == [] and "saving" not in read_marker(folder), folder
        require_lavit_folder(folder, "replace")


def test_a_command_on_a_stopped_save_says_so_first(tmp_path, capsys):
    """`lavit caption --model CKPT` on a checkpoint killed mid-save said "not a model folder (no config.json)"."""
    from lavit.cli import main
    from lavit.command_inputs import CommandError, resolve_model_folder

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    saving_lavit._begin_saving(checkpoint.resolve(), None)  # killed before the library wrote config.json
    with pytest.raises(CommandError, match="was being saved when that save stopped"):
        resolve_model_folder(str(checkpoint))
    photo = tmp_path / "photo.png"
    __import__("PIL.Image").Image.new("RGB", (32, 32)).save(photo)
    capsys.readouterr()
    assert main(["caption", str(photo), "--model", str(checkpoint)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was being saved" in err[0] and "no config.json" not in err[0], err


# ------------------------------------------------------------------------------------------------ staging folders


def gone_process() -> dict:
    process = subprocess.Popen(["true"])
    process.wait()
    return {"host": saving_lavit.socket.gethostname(), "pid": process.pid, "started": 1}


def abandoned(parent: Path, name: str, suffix: str, marker: dict | None) -> Path:
    folder = parent / f".{name}{saving_lavit.STAGING_INFIX}{suffix}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("half written")
    if marker is not None:
        (folder / MARKER_FILE).write_text(json.dumps(marker))
    return folder


def test_staging_folders_of_killed_saves_are_removed_only_when_provably_lavits(tmp_path, builders):
    """`.checkpoint-2.saving-*` stayed after a successful resume. Every class, into a new and into a used folder:
    the next save of NAME removes NAME's staging folders whose marker (lavit's) names a process that is gone, and an
    empty one without a marker (a save killed before it wrote one), and nothing else: a user's folder of that name
    with a file in it, another folder's staging, one of a live process, of a machine that is not this one."""
    for name in NAMED:
        obj, _ = builders[name]()
        for used in (False, True):
            parent = tmp_path / "staging" / name / str(used)
            folder = parent / "checkpoint-2"
            if used:
                obj.save_pretrained(folder)
            staging = lambda **fields: {"made_by": "lavit", "kind": "staging", "staging_of": "checkpoint-2",  # noqa
                                        "process": gone_process(), **fields}
            removed = abandoned(parent, "checkpoint-2", "a1", staging())
            empty = parent / f".checkpoint-2{saving_lavit.STAGING_INFIX}e3"  # killed before its marker (the attack)
            empty.mkdir()
            kept = [abandoned(parent, "checkpoint-2", "users", None),
                    abandoned(parent, "checkpoint-2", "other", staging(staging_of="checkpoint-3")),
                    abandoned(parent, "checkpoint-3", "b2", {**staging(), "staging_of": "checkpoint-3"}),
                    abandoned(parent, "checkpoint-2", "live", staging(process=saving_lavit._this_process())),
                    abandoned(parent, "checkpoint-2", "far", staging(process={**gone_process(), "host": "elsewhere"})),
                    abandoned(parent, "checkpoint-2", "bad", {"made_by": "lavit", "kind": "staging", "files": 3})]
            before = {path: snapshot(path) for path in kept}
            obj.save_pretrained(folder)
            assert not removed.exists() and not empty.exists(), (name, used)
            assert {path: snapshot(path) for path in kept} == before, (name, used)
            assert sorted(path.name for path in parent.iterdir() if path not in kept) == ["checkpoint-2"]


def test_a_save_killed_mid_move_leaves_a_staging_folder_the_next_save_removes(tmp_path, lavit_model):
    folder = tmp_path / "checkpoint-2"
    lavit_model.save_pretrained(folder)
    child = os.fork()
    if child == 0:  # the killed save: stopped by SIGKILL after its first file moved in
        real_replace = os.replace

        def replace_then_die(source, destination):
            real_replace(source, destination)
            if saving_lavit.STAGING_INFIX in str(source) and MARKER_FILE not in str(destination):
                os._exit(137)

        os.replace = replace_then_die
        try:
            lavit_model.save_pretrained(folder)
        finally:
            os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 137
    left = [path for path in tmp_path.iterdir() if saving_lavit.STAGING_INFIX in path.name]
    assert len(left) == 1 and read_marker(left[0])["kind"] == "staging"
    with pytest.raises(UnfinishedSaveError):
        type(lavit_model).from_pretrained(folder)
    lavit_model.save_pretrained(folder)
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-2"]
    type(lavit_model).from_pretrained(folder)


def test_two_saves_into_one_new_folder_take_turns(tmp_path, lavit_model):
    """The attack of #24: two processes saving different models into one new folder both wrote in place and mixed
    their shards (both exited 0; 1 try in 4 loaded a mix). A save holds a lock on its folder: the second waits, then
    replaces the first's files whole."""
    import time

    import torch

    folder, started = tmp_path / "shared", tmp_path / "first-started"
    other = type(lavit_model)(lavit_model.config)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.fill_(0.5)
    child = os.fork()
    if child == 0:  # the first save: it pauses once its record says "saving", before the library writes a file
        real_begin = saving_lavit._begin_saving

        def begin_then_pause(target, names):
            real_begin(target, names)
            started.write_text("")
            time.sleep(3)

        saving_lavit._begin_saving = begin_then_pause
        try:
            lavit_model.save_pretrained(folder, max_shard_size="100KB")
            os._exit(0)
        finally:
            os._exit(3)
    while not started.exists():
        time.sleep(0.05)
    began = time.monotonic()
    other.save_pretrained(folder, max_shard_size="150KB")  # waits for the first save, then replaces its files
    waited = time.monotonic() - began
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert waited > 1.5, waited
    loaded = type(lavit_model).from_pretrained(folder)
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert read_marker(folder).get("saving") is None


# ------------------------------------------------------------------------------------------------ return values


def test_every_save_returns_what_its_library_save_returns(tmp_path, monkeypatch, builders):
    """`LaVITDetokenizer.save_pretrained` dropped its result."""
    for name in NAMED:
        obj, _ = builders[name]()
        sentinel = [f"the library's answer for {name}"]
        monkeypatch.setattr(type(obj), "_save_folder", lambda self, folder, *_, sentinel=sentinel, **__: sentinel)
        assert obj.save_pretrained(tmp_path / "returned" / name) is sentinel, name
        monkeypatch.undo()


def test_lavit_atomic_takes_a_marker_of_the_wrong_shape_for_no_marker_and_says_why(tmp_path):
    from lavit.atomic import NotLavitFolderError, is_lavit_folder, require_lavit_folder

    for shape in [*WRONG_SHAPES, "a folder", "a link", "not JSON"]:
        folder = tmp_path / shape.replace(" ", "_")
        plant(folder, shape)
        before = snapshot(folder)
        assert not is_lavit_folder(folder), shape
        with pytest.raises(NotLavitFolderError, match=f"its {MARKER_FILE} is not lavit's") as error:
            require_lavit_folder(folder, "replace")
        assert len(str(error.value).splitlines()) == 1 and snapshot(folder) == before


def test_a_destination_that_cannot_be_staged_beside_is_saved_in_place_when_empty(tmp_path, monkeypatch, lavit_model):
    """The attack of #24 (atk36 F1): a save into a mount point (or a writable folder in a read-only one) failed with
    "Invalid cross-device link" once every save went through a staging folder beside its destination, and left a
    marker saying "saving" that no save could finish. Such a destination is written in place while empty (as the
    library writes), and one holding files is refused before anything is written."""
    import torch

    if os.path.ismount("/dev/shm"):  # a real mount point: its parent is another file system
        assert not saving_lavit._can_stage_beside(Path("/dev/shm"))
    assert saving_lavit._can_stage_beside(tmp_path)
    monkeypatch.setattr(saving_lavit, "_can_stage_beside", lambda target: False)
    folder = tmp_path / "volume"
    lavit_model.save_pretrained(folder)
    assert "saving" not in read_marker(folder)
    loaded = type(lavit_model).from_pretrained(folder)
    assert all(torch.equal(value, lavit_model.state_dict()[key]) for key, value in loaded.state_dict().items())
    before = snapshot(folder)
    with pytest.raises(NotLavitFilesError, match="cannot be saved over: the folder around it is read-only or on "
                                                 "another file system"):
        lavit_model.save_pretrained(folder)
    assert snapshot(folder) == before and [path.name for path in tmp_path.iterdir()] == ["volume"]


def test_a_save_into_its_own_folder_keeps_the_users_shards_beside_the_single_file_it_was_loaded_from(
        tmp_path, lavit_model):
    """The attack of #24 (atk36 F2): the user's sharded checkpoint (index and shards) copied beside a single
    `model.safetensors` was deleted by `from_pretrained(d).save_pretrained(d)`: transformers reads the single file
    and never those shards. They are kept (a single-file save), or the save is refused (a sharded one would
    overwrite them)."""
    from lavit.modeling.saving_lavit import NotLavitFilesError

    folder = tmp_path / "model"
    lavit_model.save_pretrained(folder)
    users = {"model-00001-of-00002.safetensors": b"shard 1", "model-00002-of-00002.safetensors": b"shard 2",
             "model.safetensors.index.json": b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'}
    for name, content in users.items():
        (folder / name).write_bytes(content)
    loaded = type(lavit_model).from_pretrained(folder)
    loaded.save_pretrained(folder)
    assert all((folder / name).read_bytes() == content for name, content in users.items())
    with pytest.raises(NotLavitFilesError, match="lavit did not write .*model.safetensors.index.json"):
        loaded.save_pretrained(folder, max_shard_size="100KB")
    assert all((folder / name).read_bytes() == content for name, content in users.items())
