"""Issue 24, the findings left open (D1-D3): lavit replaces or deletes only what it wrote *and* what is unchanged
since; every file a command derives from its named output obeys the named output's rule; `save_pretrained` never
writes over what it reads.

The surfaces are enumerated: every function of `lavit.atomic` that deletes, every kind of change to a lavit folder,
every command with a file output (found from the parsers), every `save_pretrained` lavit defines.
"""

import ast
import inspect
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import lavit.atomic as atomic
from lavit.atomic import (
    MARKER_FILE,
    NotLavitFileError,
    NotLavitFolderError,
    backup_path,
    changed_files,
    fresh_staging_folder,
    is_lavit_file,
    mark_folder,
    recover_folder,
    replace_folder,
    require_replaceable,
    save_png_atomically,
)
from lavit.cli import FILE_OUTPUTS, build_parser, main
from lavit.paths import OutputFile, check_output_files, numbered_outputs

# ------------------------------------------------------------------------------------------------ D1


def _edit_same_size(folder: Path):
    path = folder / "weights.bin"
    path.write_bytes(path.read_bytes()[::-1])


def _edit_same_size_and_time(folder: Path):
    path = folder / "weights.bin"
    status = path.stat()
    path.write_bytes(path.read_bytes()[::-1])
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))  # `touch -r`: only the content tells


def _edit_other_size(folder: Path):
    (folder / "config.json").write_text('{"edited": "by the user"}')


def _edit_nested(folder: Path):
    (folder / "sub" / "notes.md").write_text("the user's own notes")


def _add_file(folder: Path):
    (folder / "mine.txt").write_text("the user's")


def _add_nested_file(folder: Path):
    (folder / "sub" / "mine.txt").write_text("the user's")


def _replace_by_link(folder: Path):
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(folder.parent / "elsewhere.json")


CHANGES = {"edited, same size": _edit_same_size, "edited, same size and time": _edit_same_size_and_time,
           "edited, other size": _edit_other_size, "edited in a subfolder": _edit_nested, "file added": _add_file,
           "file added in a subfolder": _add_nested_file, "file replaced by a link": _replace_by_link}


def lavit_made_folder(target: Path) -> Path:
    staging = fresh_staging_folder(target)
    (staging / "sub").mkdir()
    (staging / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (staging / "config.json").write_text('{"lavit": true}')
    (staging / "sub" / "notes.md").write_text("lavit's notes")
    return replace_folder(staging, target)


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): (os.readlink(path) if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file() or path.is_symlink()}


# every way lavit replaces or deletes a folder (the test below checks this list against lavit.atomic's source)
REPLACERS = {
    "replace_folder": lambda target: replace_folder(mark_folder(target.with_name(target.name + ".tmp")), target),
    "fresh_staging_folder": fresh_staging_folder,
    "require_replaceable": require_replaceable,
    "recover_folder (a backup edited by the user)": lambda target: recover_folder(
        shutil.copytree(target, backup_path(target), symlinks=True) and target),
}


def test_every_deleting_function_of_lavit_atomic_is_enumerated():
    tree = ast.parse(inspect.getsource(atomic))
    deleting = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and any(
        isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "rmtree" for call in ast.walk(node))}
    assert deleting <= {name.split(" ")[0] for name in REPLACERS}  # and the check commands call first


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("replacer", REPLACERS)
def test_a_lavit_folder_the_user_changed_is_never_replaced(tmp_path, change, replacer):
    target = lavit_made_folder(tmp_path / "hub")
    (tmp_path / "elsewhere.json").write_text("{}")
    assert changed_files(target) == []
    CHANGES[change](target)
    before = snapshot(target)
    if replacer.startswith("recover_folder"):  # the backup is the changed folder; the target is lavit's
        os.replace(target, tmp_path / "changed")
        lavit_made_folder(target)
        shutil.copytree(tmp_path / "changed", backup_path(target), symlinks=True)
        recover_folder(target)
        assert snapshot(backup_path(target)) == before, change
        return
    with pytest.raises(NotLavitFolderError, match="changed since lavit wrote them") as error:
        REPLACERS[replacer](target)
    assert "move them out of" in str(error.value)
    assert snapshot(target) == before, (replacer, change)


def test_an_unchanged_lavit_folder_is_replaced_and_a_permission_change_alone_is_no_change(tmp_path):
    target = lavit_made_folder(tmp_path / "hub")
    os.chmod(target / "config.json", 0o600)  # the metadata moves (ctime), the content does not
    assert changed_files(target) == []
    lavit_made_folder(target)
    assert (target / "weights.bin").is_file() and changed_files(target) == []


def test_export_keeps_a_file_the_user_edited_in_an_exported_folder(tmp_path, lavit_folder, capsys):
    hub = tmp_path / "hub"
    assert main(["export", str(hub), "--model", str(lavit_folder)]) == 0
    card = (hub / "README.md").read_text() + "\nMy own section.\n"
    (hub / "README.md").write_text(card)
    capsys.readouterr()
    assert main(["export", str(hub), "--model", str(lavit_folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "README.md" in err[0] and "changed since lavit wrote them" in err[0], err
    assert (hub / "README.md").read_text() == card


def test_markers_of_earlier_versions_listing_names_still_work(tmp_path):
    target = lavit_made_folder(tmp_path / "hub")
    atomic.write_json_atomically(target / MARKER_FILE, {"made_by": "lavit", "kind": "folder",
                                                        "files": ["config.json", "sub/notes.md", "weights.bin"]})
    assert changed_files(target) == []
    _add_file(target)
    assert changed_files(target) == ["mine.txt"]


# ------------------------------------------------------------------------------------------------ D2


def file_output_commands() -> dict:
    """command -> its file output arguments, found from the parsers."""
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    found = {}
    for name, command_parser in commands.items():
        for action in command_parser._actions:
            if action.type is OutputFile:
                found.setdefault(name, []).append(action)
    return found


# a command line giving each file-output command several outputs (two images, or two prompts)
SEVERAL_OUTPUTS = {
    "tokenize": ["tokenize", "a.png", "b.png", "--model", "org/name", "--visualize", "{out}"],
    "generate": ["generate", "a red bus", "--num-images", "2", "-o", "{out}", "--model", "org/name"],
    "reconstruct": ["reconstruct", "a.png", "b.png", "-o", "{out}", "--model", "org/name"],
}


def test_every_file_output_is_checked_by_the_one_rule():
    assert set(file_output_commands()) == set(FILE_OUTPUTS) == set(SEVERAL_OUTPUTS)


def test_a_huge_count_of_outputs_is_checked_from_the_folder_listing(tmp_path):
    """The check lists the folder instead of naming every output (10**15 images are refused later, by the memory
    bound); it finds exactly the numbered names below the count."""
    for name in ("out-3.png", "out-03.png", "out-x.png", "out-7.png", "out-3.jpg", "other-1.png"):
        (tmp_path / name).write_bytes(b"the user's")
    with pytest.raises(NotLavitFileError, match="out-3.png"):
        check_output_files(tmp_path / "out.png", 10**15, {}, "--output")
    check_output_files(tmp_path / "out.png", 3, {}, "--output")  # out-0 .. out-2: none there
    (tmp_path / "out-3.png").unlink()
    check_output_files(tmp_path / "out.png", 7, {}, "--output")
    with pytest.raises(NotLavitFileError, match="out-7.png"):
        check_output_files(tmp_path / "out.png", 8, {}, "--output")


@pytest.mark.parametrize("command", sorted(SEVERAL_OUTPUTS))
def test_no_derived_output_overwrites_a_users_file(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(name)
    out = tmp_path / "out.png"
    argv = [part.replace("{out}", str(out)) for part in SEVERAL_OUTPUTS[command]]
    files = numbered_outputs(out, 2)
    assert files == [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    for users in [*files, out]:  # each derived name, and the named one with one output
        users.write_bytes(b"the user's own file")
        one = argv if users != out else [part for part in argv if part not in ("b.png",)]
        if users == out and command == "generate":
            one = [part if part != "2" else "1" for part in argv]
        assert main(one) == 1, (command, users)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(users) in err[0] and "not written by lavit" in err[0], (command, err)
        assert "move or delete" in err[0] and "org/name" not in err[0]  # refused before the model is looked for
        assert users.read_bytes() == b"the user's own file"
        users.unlink()


def test_lavit_replaces_its_own_images_and_refuses_the_users(tmp_path):
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    ours, users, text = tmp_path / "ours.png", tmp_path / "users.png", tmp_path / "text.png"
    save_png_atomically(image, ours)
    image.save(users)  # a plain PNG: no lavit Software text
    text.write_text("not an image")
    edited = tmp_path / "edited.png"  # lavit's image edited in a program that keeps the PNG's text chunks
    save_png_atomically(image, edited)
    with Image.open(edited) as written:
        info = PngInfo()
        for key, value in written.text.items():
            info.add_text(key, value)
        changed = written.convert("RGB")
    changed.putpixel((0, 0), (255, 0, 0))
    changed.save(edited, pnginfo=info)
    assert is_lavit_file(ours) and not any(map(is_lavit_file, (users, text, edited)))
    save_png_atomically(Image.new("RGB", (4, 4)), ours)  # a rerun replaces lavit's own file
    for path in (users, text, edited):
        before = path.read_bytes()
        with pytest.raises(NotLavitFileError, match="not written by lavit"):
            save_png_atomically(image, path)
        with pytest.raises(NotLavitFileError, match="--output"):
            check_output_files(path, 1, {}, "--output")
        assert path.read_bytes() == before
    (tmp_path / "link.png").symlink_to(ours)  # a link is never written through
    with pytest.raises(NotLavitFileError):
        check_output_files(tmp_path / "link.png", 1, {}, "--output")


def test_tokenize_visualize_reruns_over_its_own_images(tmp_path, lavit_folder, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(photo)
    argv = ["tokenize", str(photo), str(photo), "--model", str(lavit_folder), "--visualize",
            str(tmp_path / "kept.png")]
    for _ in range(2):
        assert main(argv) == 0, capsys.readouterr().err
    assert all(is_lavit_file(path) for path in numbered_outputs(tmp_path / "kept.png", 2))


# ------------------------------------------------------------------------------------------------ D3


def lavit_saving_classes() -> list[type]:
    """Every class of lavit's model files that can be saved (found from the modules of `lavit.modeling`)."""
    import importlib
    import pkgutil

    import lavit.modeling
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedModel

    found = set()
    for module_info in pkgutil.iter_modules(lavit.modeling.__path__):
        module = importlib.import_module(f"lavit.modeling.{module_info.name}")
        found |= {value for value in vars(module).values() if isinstance(value, type) and value.__module__ ==
                  module.__name__ and issubclass(value, (PreTrainedModel, DiffusionPipeline))}
    return sorted(found, key=lambda cls: cls.__name__)


def test_every_save_pretrained_of_lavit_goes_through_the_source_guard():
    from lavit.modeling.saving_lavit import SaveBesideSourcesMixin

    classes = lavit_saving_classes()
    assert {"LaVITForCausalLM", "LaVITPipeline", "LaVITDetokenizer", "LaVITTokenizerModel"} <= {
        cls.__name__ for cls in classes}
    unguarded = [cls.__name__ for cls in classes if SaveBesideSourcesMixin not in cls.__mro__ and
                 "save_beside_sources" not in inspect.getsource(cls.save_pretrained)]
    assert not unguarded


def every_saving_class() -> list[type]:
    """Every public class of `modeling_lavit/` and `processing/` with a `save_pretrained` (found from the modules of
    `lavit.modeling` and `lavit.processing`), configs aside: a config is written by its model's guarded save and,
    loaded alone, records no folder to compare."""
    import importlib
    import pkgutil

    import lavit.modeling
    import lavit.processing
    from transformers import PreTrainedConfig

    found = set()
    for package in (lavit.modeling, lavit.processing):
        for module_info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{module_info.name}")
            found |= {value for name, value in vars(module).items() if isinstance(value, type) and not
                      name.startswith("_") and value.__module__ == module.__name__ and
                      hasattr(value, "save_pretrained") and not issubclass(value, PreTrainedConfig)}
    return sorted(found, key=lambda cls: cls.__name__)


def saving_instances(tmp_path, lavit_model, lavit_processor) -> dict:
    """Class name -> a function giving an instance of it loaded from a folder of its own, and that folder."""
    from conftest import tiny_detokenizer_config, tiny_tokenizer_config

    from lavit import LaVITDetokenizer, LaVITEvaVisionModel, LaVITPipeline, LaVITTextToImagePipeline

    def reloaded(obj, name):
        obj.save_pretrained(tmp_path / name)
        return type(obj).from_pretrained(tmp_path / name), tmp_path / name

    def pipeline():
        torch.manual_seed(0)
        return LaVITPipeline.from_detokenizer(lavit_model, lavit_processor,
                                              LaVITDetokenizer(tiny_detokenizer_config()))

    def text_to_image():
        lavit_model.save_pretrained(tmp_path / "t2i")
        lavit_processor.save_pretrained(tmp_path / "t2i")
        return LaVITTextToImagePipeline(model=type(lavit_model).from_pretrained(tmp_path / "t2i"),
                                        processor=type(lavit_processor).from_pretrained(tmp_path / "t2i")), \
            tmp_path / "t2i"

    return {
        "LaVITForCausalLM": lambda: reloaded(lavit_model, "lm"),
        "LaVITModel": lambda: reloaded(lavit_model.model, "base"),
        "LaVITTokenizerModel": lambda: reloaded(lavit_model.visual_tokenizer, "tokenizer"),
        "LaVITEvaVisionModel": lambda: reloaded(LaVITEvaVisionModel(tiny_tokenizer_config().vision_config), "eva"),
        "LaVITDetokenizer": lambda: reloaded(LaVITDetokenizer(tiny_detokenizer_config()), "detokenizer"),
        "LaVITConditionEncoder": lambda: reloaded(pipeline().condition_encoder, "conditions"),
        "LaVITPipeline": lambda: reloaded(pipeline(), "pipeline"),
        "LaVITProcessor": lambda: reloaded(lavit_processor, "processor"),
        "LaVITImageProcessor": lambda: reloaded(lavit_processor.image_processor, "image_processor"),
        "LaVITTextToImagePipeline": text_to_image,
    }


def test_every_class_that_saves_refuses_to_mix_its_files_with_its_source(tmp_path, lavit_model, lavit_processor):
    """`LaVITProcessor.save_pretrained` wrote into any folder. Every class of lavit that saves (found from the
    modules), loaded from a folder, refuses to save into the folder holding it or into a folder of files inside it
    (nothing written), and saves into the folder itself (staged beside it: what was there still loads). Bases with
    no model of their own (`*PreTrainedModel`, the mixins) are checked to route their save through the guard."""
    from lavit.modeling.saving_lavit import SaveBesideSourcesMixin, SourceFolderError

    classes = every_saving_class()
    builders = saving_instances(tmp_path, lavit_model, lavit_processor)
    assert {"LaVITProcessor", "LaVITImageProcessor", "LaVITTextToImagePipeline", "LaVITPipeline"} <= set(builders)
    for cls in classes:
        if cls.__name__ not in builders:  # an abstract base or a mixin of the ones below
            assert cls.__name__.endswith(("PreTrainedModel", "Mixin")), f"{cls.__name__}: add a builder here"
            assert SaveBesideSourcesMixin in cls.__mro__ or issubclass(cls, SaveBesideSourcesMixin) or any(
                SaveBesideSourcesMixin in sub.__mro__ for sub in classes if cls in sub.__mro__[1:]), cls
            continue
        obj, source = builders[cls.__name__]()
        assert isinstance(obj, cls), cls
        inner = source / "inner"
        inner.mkdir()
        (inner / "notes.txt").write_text("the user's")
        before = snapshot(source.parent)
        for destination in (source.parent, inner):
            with pytest.raises(SourceFolderError, match=f"the folder this {type(obj).__name__} was loaded from"):
                obj.save_pretrained(destination)
            assert snapshot(source.parent) == before, (cls, destination)
        obj.save_pretrained(source)  # its own folder: staged beside it, moved in
        assert (inner / "notes.txt").read_text() == "the user's"
        assert not [path for path in source.parent.iterdir() if ".saving-" in path.name], cls
        if not isinstance(obj, __import__("transformers").Pipeline):
            assert isinstance(type(obj).from_pretrained(source), cls)


def weights(*models) -> dict:
    return {f"{index}.{name}": tensor.detach().clone() for index, model in enumerate(models)
            for name, tensor in model.state_dict().items()}


def saved_objects(tmp_path, lavit_model, lavit_processor):
    """(name, the object saved to a folder, how to load it back, its weights) of every kind lavit saves."""
    from conftest import tiny_detokenizer_config

    from lavit import LaVITDetokenizer, LaVITForCausalLM, LaVITPipeline, LaVITTokenizerModel

    detokenizer = LaVITDetokenizer(tiny_detokenizer_config())
    pipe = LaVITPipeline.from_detokenizer(lavit_model, lavit_processor, detokenizer)
    pipe_weights = lambda loaded: weights(loaded.language_model, loaded.unet, loaded.vae,  # noqa: E731
                                          loaded.condition_encoder)
    return [("language model", lavit_model, LaVITForCausalLM.from_pretrained, weights),
            ("visual tokenizer", lavit_model.visual_tokenizer, LaVITTokenizerModel.from_pretrained, weights),
            ("detokenizer", detokenizer, LaVITDetokenizer.from_pretrained, weights),
            ("pipeline", pipe, LaVITPipeline.from_pretrained, pipe_weights)]


def test_save_pretrained_into_its_own_folder_keeps_every_weight_and_never_mixes_folders(
        tmp_path, lavit_model, lavit_processor):
    for name, obj, load, state in saved_objects(tmp_path, lavit_model, lavit_processor):
        folder = tmp_path / name.replace(" ", "_") / "model"
        shard = {"max_shard_size": "40KB"} if name != "pipeline" else {}
        obj.save_pretrained(folder, **shard)
        expected = state(obj)
        loaded = load(folder)
        # into the folder it was loaded from, sharded differently: every weight survives, no stale shard is left
        loaded.save_pretrained(folder, **({"max_shard_size": "25KB"} if name != "pipeline" else {}))
        again = state(load(folder))
        assert again.keys() == expected.keys() and all(again[key].equal(expected[key]) for key in expected), name
        assert not [path for path in folder.parent.iterdir() if path.name != "model"], name  # no staging left
        indexes = list(folder.rglob("*.safetensors.index.json"))
        listed = {file for index in indexes for file in __import__("json").loads(index.read_text())["weight_map"]
                  .values()}
        shards = {path.name for path in folder.rglob("model-*.safetensors")}
        assert shards == listed, name
        # into a folder of files inside its source, or into a folder that holds its source: refused, nothing written
        before = snapshot(folder.parent)
        inner = next(path for path in sorted(folder.rglob("*")) if path.is_dir()) if name == "pipeline" else None
        for destination in [folder.parent, *([inner] if inner else [])]:
            from lavit.modeling.saving_lavit import SourceFolderError

            with pytest.raises(SourceFolderError, match="the folder this .* was loaded from"):
                loaded.save_pretrained(destination)
            assert snapshot(folder.parent) == before, (name, destination)
        loaded.save_pretrained(folder / "checkpoint-1")  # a new folder inside its source: allowed
        assert state(load(folder / "checkpoint-1")).keys() == expected.keys()


def test_save_pretrained_never_overwrites_or_removes_a_users_file(tmp_path, lavit_model, lavit_processor):
    """#26 item 2: transformers and diffusers remove old shards by name, so saving into a folder of the user's deleted
    `language_model/model-00001-of-00003.safetensors` and `unet/diffusion_pytorch_model-00001-of-00009.safetensors`.
    Every saver lavit defines: a destination file the save would overwrite or remove must be lavit's, unchanged."""
    from lavit.modeling.saving_lavit import NotLavitFilesError

    for name, obj, load, state in saved_objects(tmp_path, lavit_model, lavit_processor):
        probe = tmp_path / "probe" / name.replace(" ", "_")
        obj.save_pretrained(probe)
        written = [path.relative_to(probe) for path in probe.rglob("*") if path.is_file() and path.name != MARKER_FILE]
        assert list(probe.rglob(MARKER_FILE)) == [probe / MARKER_FILE], name  # one record of the whole save
        weight_folders = {path.parent for path in written if path.name.endswith(".safetensors")}
        user_files = [*written, *(folder / f"{stem}-00001-of-00003.safetensors" for folder in weight_folders
                                  for stem in ("model", "diffusion_pytorch_model"))]
        families = {(path.parent, path.name.split(".")[0].split("-")[0]) for path in written
                    if path.name.endswith(".safetensors")}
        for user_file in user_files:  # each file alone: the save would overwrite or remove it
            destination = tmp_path / "user" / name.replace(" ", "_") / str(len(list(tmp_path.rglob("user/*/*"))))
            (destination / user_file).parent.mkdir(parents=True, exist_ok=True)
            (destination / user_file).write_bytes(b"the user's")
            (destination / "notes.txt").write_text("mine")
            before = snapshot(destination)
            if user_file in written or (user_file.parent, user_file.name.split("-")[0]) in families:
                with pytest.raises(NotLavitFilesError, match=f"lavit did not write .*{user_file.name}"):
                    obj.save_pretrained(destination)
                assert snapshot(destination) == before, (name, user_file)
            else:  # weights of another library's names there (`diffusion_pytorch_model*` beside `model*`): not its
                obj.save_pretrained(destination)
                assert (destination / user_file).read_bytes() == b"the user's", (name, user_file)
        # a folder lavit saved into: saved again (its own files replaced), the user's other files kept; a file of
        # lavit's the user edited since is theirs
        mine = tmp_path / "mine" / name.replace(" ", "_")
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("mine")
        obj.save_pretrained(mine)
        obj.save_pretrained(mine)
        assert (mine / "notes.txt").read_text() == "mine" and state(load(mine)).keys() == state(obj).keys()
        edited = mine / written[0]
        edited.write_bytes(edited.read_bytes() + b" ")
        with pytest.raises(NotLavitFilesError):
            obj.save_pretrained(mine)


def test_a_save_into_its_own_folder_removes_only_the_weights_it_was_loaded_from(tmp_path, lavit_model):
    """The attack of #24 (S12): `from_pretrained(d).save_pretrained(d)` deleted the user's
    `diffusion_pytorch_model.safetensors` and `model-00001-of-00002.safetensors` added to `d`, which a save into any
    other folder refuses. In its own folder a save replaces the weights the object was loaded from (the single file,
    the index and the shards it names) and leaves the user's files where they are."""
    from lavit import LaVITForCausalLM

    for source_shards in (None, "40KB"):
        folder = tmp_path / f"model-{source_shards}"
        lavit_model.save_pretrained(folder, **({"max_shard_size": source_shards} if source_shards else {}))
        users = {"diffusion_pytorch_model.safetensors": b"the user's decoder"}
        if source_shards is None:  # a shard name the source's index does not list (it has none)
            users["model-00001-of-00002.safetensors"] = b"the user's shard"
        for file_name, content in users.items():
            (folder / file_name).write_bytes(content)
        loaded = LaVITForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            loaded.lm_head.weight.add_(1.0)
        loaded.save_pretrained(folder)  # one file now: the source's shards and index go, the user's files stay
        for file_name, content in users.items():
            assert (folder / file_name).read_bytes() == content, (source_shards, file_name)
        assert not list(folder.glob("*.index.json")), source_shards
        again = LaVITForCausalLM.from_pretrained(folder)
        assert torch.equal(again.lm_head.weight, loaded.lm_head.weight), source_shards


def test_the_attacks_shard_names_in_a_users_pipeline_folder_survive(tmp_path, lavit_model, lavit_processor):
    """The repro of #26 item 2 (p5.py), as it was run."""
    from lavit.modeling.saving_lavit import NotLavitFilesError

    pipe = saved_objects(tmp_path, lavit_model, lavit_processor)[-1][1]
    user = tmp_path / "user"
    for relative in ("language_model/model-00001-of-00003.safetensors",
                     "unet/diffusion_pytorch_model-00001-of-00009.safetensors"):
        (user / relative).parent.mkdir(parents=True, exist_ok=True)
        (user / relative).write_text("the user's shard")
    with pytest.raises(NotLavitFilesError, match="model-00001-of-00003.safetensors"):
        pipe.save_pretrained(user)
    assert sorted(str(path.relative_to(user)) for path in user.rglob("*") if path.is_file()) == [
        "language_model/model-00001-of-00003.safetensors", "unet/diffusion_pytorch_model-00001-of-00009.safetensors"]


def folder_loader(obj):
    """How the folder `obj` saves is loaded: its class's `from_pretrained` (a transformers pipeline has none: its
    model's)."""
    from transformers import Pipeline

    return type(obj.model).from_pretrained if isinstance(obj, Pipeline) else type(obj).from_pretrained


def test_a_save_stopped_anywhere_is_refused_on_load_and_finished_by_the_next_save(
        tmp_path, monkeypatch, lavit_model, lavit_processor):
    """A kill mid-save left a folder of cut or mixed files that loaded without a word (and, for a new folder, that the
    next save refused as the user's: a Trainer resumed over a killed checkpoint stopped). Every class of lavit that
    saves, stopped after the library wrote its files and before they moved into a new folder (nothing of it arrives
    there), or after some files of a save over its earlier save were moved in: loading the folder (or a part of it)
    is refused, and the same save again finishes it."""
    from lavit.modeling import saving_lavit

    real_replace = os.replace
    for name, build in saving_instances(tmp_path, lavit_model, lavit_processor).items():
        obj, _ = build()
        load = folder_loader(obj)
        saved = tmp_path / "stopped" / name
        library_save = type(obj)._save_folder

        def save_then_stop(self, folder, *args, library_save=library_save, **kwargs):
            library_save(self, folder, *args, **kwargs)
            raise OSError("No space left on device (the test's)")

        monkeypatch.setattr(type(obj), "_save_folder", save_then_stop)
        with pytest.raises(OSError, match="the test's"):
            obj.save_pretrained(saved)
        monkeypatch.setattr(type(obj), "_save_folder", library_save)
        # nothing of a save stopped before its files moved reaches a new folder, nor stays beside it (the attack
        # of #24: safetensors' temporary `.tmpXXXXXX`, left in a new folder written in place, kept it unfinished)
        assert list(saved.iterdir()) == [], name
        assert not [path for path in saved.parent.iterdir() if saving_lavit.STAGING_INFIX in path.name], name
        obj.save_pretrained(saved)
        load(saved)

        moved = []

        def replace_then_stop(source, destination, moved=moved):
            if saving_lavit.STAGING_INFIX in str(source):
                moved.append(destination)
                if len(moved) == 2:  # one file of the new save in place, the others still the old save's
                    raise OSError("No space left on device (the test's)")
            return real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace_then_stop)
        with pytest.raises(OSError, match="the test's"):
            obj.save_pretrained(saved)
        monkeypatch.setattr(os, "replace", real_replace)
        with pytest.raises(saving_lavit.UnfinishedSaveError, match=f"run the same save into {saved}"):
            load(saved)
        obj.save_pretrained(saved)
        assert "saving" not in saving_lavit.read_marker(saved), name
        load(saved)
