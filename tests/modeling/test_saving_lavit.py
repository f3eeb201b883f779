"""saving_lavit.py at unit level, with a plain function that writes files standing in for a library's save: the
staged save into a folder (files moved into place, recorded in lavit's marker, returned paths pointing at them, stale
weight shards removed), its refusals (a destination inside or around a source, a file, a user's file), the file
records that tell lavit's unchanged files apart, where objects were loaded from, the code files a Hub folder needs,
and `loads_json`."""

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
from lavit.modeling.saving_lavit import (
    MARKER_FILE,
    NotLavitFilesError,
    SourceFolderError,
    code_files,
    file_record,
    loaded_from,
    loads_json,
    read_marker,
    remember_source,
    save_beside_sources,
    unchanged,
)


def writer(files: dict):
    """A save that writes `files` ({relative name: text}) into the folder it is given and returns their paths."""

    def save(folder: Path):
        written = []
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            written.append(str(folder / name))
        return written

    return save


def leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.parent.iterdir() if ".saving-" in path.name]


def test_a_save_moves_its_files_into_place_records_them_and_returns_their_final_paths(tmp_path):
    target = tmp_path / "out"
    returned = save_beside_sources(writer({"config.json": "{}", "sub/model.safetensors": "w"}), target, [], "Thing")
    assert returned == [str(target / "config.json"), str(target / "sub" / "model.safetensors")]
    assert (target / "sub" / "model.safetensors").read_text() == "w"
    marker = read_marker(target)
    assert marker["made_by"] == "lavit" and "saving" not in marker
    assert set(marker["files"]) == {"config.json", "sub/model.safetensors"}
    assert marker["files"]["config.json"] == file_record(target / "config.json")
    assert leftovers(target) == []  # the staging folder is gone


def test_a_new_save_replaces_lavits_files_and_removes_the_shards_it_no_longer_writes(tmp_path):
    target = tmp_path / "out"
    shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b",
              "model.safetensors.index.json": "{}", "notes.txt": "mine"}
    save_beside_sources(writer(shards), target, [], "Thing")
    save_beside_sources(writer({"model.safetensors": "single"}), target, [], "Thing")
    assert sorted(os.listdir(target)) == sorted([MARKER_FILE, "model.safetensors", "notes.txt"])
    assert set(read_marker(target)["files"]) == {"model.safetensors", "notes.txt"}


def test_a_users_file_in_the_way_is_refused_before_anything_moves(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("the user's")
    with pytest.raises(NotLavitFilesError, match=r"holds files lavit did not write \(config.json\) that saving this "
                                                 r"Thing there would overwrite"):
        save_beside_sources(writer({"model.safetensors": "w", "config.json": "{}"}), target, [], "Thing")
    assert sorted(os.listdir(target)) == ["config.json"] and (target / "config.json").read_text() == "the user's"
    assert leftovers(target) == []


def test_a_file_lavit_wrote_and_the_user_edited_since_is_the_users(tmp_path):
    target = tmp_path / "out"
    save_beside_sources(writer({"config.json": "{}"}), target, [], "Thing")
    (target / "config.json").write_text("{ }")
    with pytest.raises(NotLavitFilesError, match="config.json"):
        save_beside_sources(writer({"config.json": "{}"}), target, [], "Thing")


def test_a_destination_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotLavitFilesError, match="is a file, not a folder: choose a folder"):
        save_beside_sources(writer({"a": "b"}), tmp_path / "out", [], "Thing")


def test_a_destination_around_or_inside_a_source_is_refused_naming_the_source(tmp_path):
    source = tmp_path / "model"
    (source / "checkpoint").mkdir(parents=True)
    (source / "checkpoint" / "old.bin").write_text("x")
    with pytest.raises(SourceFolderError, match=rf"contains {source}, the folder this Thing was loaded from"):
        save_beside_sources(writer({"a": "b"}), tmp_path, [source], "Thing")
    with pytest.raises(SourceFolderError, match=rf"lies inside {source}.* save into {source} itself"):
        save_beside_sources(writer({"a": "b"}), source / "checkpoint", [source], "Thing")
    assert isinstance(SourceFolderError("x"), ValueError)


def test_a_new_folder_inside_a_source_and_the_source_itself_are_allowed(tmp_path):
    source = tmp_path / "model"
    save_beside_sources(writer({"model.safetensors": "v1"}), source, [], "Thing")
    save_beside_sources(writer({"a.txt": "b"}), source / "checkpoint-1", [source.resolve()], "Thing")
    save_beside_sources(writer({"model.safetensors": "v2"}), source, [source.resolve()], "Thing")
    assert (source / "checkpoint-1" / "a.txt").read_text() == "b"
    assert (source / "model.safetensors").read_text() == "v2"


def test_a_save_that_fails_leaves_the_destination_and_no_staging_folder(tmp_path):
    target = tmp_path / "out"
    save_beside_sources(writer({"model.safetensors": "v1"}), target, [], "Thing")

    def failing(folder):
        (folder / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_beside_sources(failing, target, [], "Thing")
    assert (target / "model.safetensors").read_text() == "v1"
    assert "saving" not in read_marker(target) and leftovers(target) == []


def test_a_file_record_tells_an_edit_of_the_same_size_and_follows_links(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abcd")
    record = file_record(path)
    assert record["size"] == 4 and len(record["sha256"]) == 64 and unchanged(path, record)
    os.utime(path, ns=(0, 0))  # new times alone are no change: the content is hashed again
    assert unchanged(path, record)
    path.write_bytes(b"abce")
    assert not unchanged(path, record)
    link = tmp_path / "link"
    link.symlink_to("weights.bin")
    assert file_record(link) == {"link": "weights.bin"} and unchanged(link, {"link": "weights.bin"})
    assert not unchanged(link, {"link": "other.bin"}) and not unchanged(path, {"link": "weights.bin"})
    assert unchanged(path, None)  # a marker of lavit <= 0.x recorded names only


def test_loaded_from_keeps_the_local_folders_an_object_names(tmp_path):
    folder = tmp_path / "processor"
    folder.mkdir()

    class Loaded:
        name_or_path = "org/a-hub-id"
        config = type("Config", (), {"_name_or_path": str(tmp_path / "missing")})()

    image_processor = remember_source(Loaded(), folder)
    assert loaded_from(image_processor) == [folder.resolve()]
    obj, unused = remember_source((Loaded(), {"unused": 1}), f"{tmp_path}/./processor")
    assert unused == {"unused": 1} and loaded_from(obj) == [folder.resolve()]
    assert loaded_from(Loaded(), object()) == []


def test_code_files_follow_relative_imports_transitively_and_once(tmp_path):
    (tmp_path / "modeling_a.py").write_text("from .configuration_a import A\nfrom .utils_a import x\nimport os\n")
    (tmp_path / "configuration_a.py").write_text("  from .utils_a import y\n")
    (tmp_path / "utils_a.py").write_text("from .modeling_a import z  # a cycle\nfrom transformers import B\n")
    (tmp_path / "unrelated.py").write_text("")
    assert [path.name for path in code_files(tmp_path / "modeling_a.py")] == [
        "configuration_a.py", "modeling_a.py", "utils_a.py"]
    assert [path.name for path in code_files(tmp_path / "configuration_a.py")] == [
        "configuration_a.py", "modeling_a.py", "utils_a.py"]
    (tmp_path / "broken.py").write_text("from .missing import name\n")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        code_files(tmp_path / "broken.py")


def test_loads_json_passes_options_and_refuses_deep_nesting_as_bad_json():
    assert loads_json('{"b": 1, "a": 2}', object_pairs_hook=OrderedDict) == OrderedDict(b=1, a=2)
    with pytest.raises(json.JSONDecodeError, match="nested deeper than the JSON parser goes"):
        loads_json("[" * 100_000)
