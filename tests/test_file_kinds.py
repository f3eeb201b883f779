"""Issue 24 section 6: what lavit publishes or loads is allowed (an allowlist checked by content), not merely "not
detected as bad"."""

import bz2
import gzip
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, real_photos
from lavit.hub_cards import check_export_folder, export_model, push_to_hub
from PIL import Image
from safetensors.torch import save_file

from lavit.cli import main
from lavit.file_kinds import folder_problems
from lavit.file_kinds import main as file_kinds_main


class Payload:  # pickled by reference: loading it imports and calls code
    def __reduce__(self):
        return (print, ("pickle code ran",))


def bad_files(folder: Path, outside: Path) -> list[str]:
    """One file of every kind that must not be published, under names that look harmless; returns their names."""
    state = {"w": np.zeros(3)}
    joblib.dump(state, folder / "a.json", compress=("lzma", 3))  # the example, under a JSON name
    joblib.dump(state, folder / "b.txt", compress=("gzip", 3))
    joblib.dump(state, folder / "c.md", compress=("bz2", 3))
    joblib.dump(state, folder / "d.joblib", compress=("zlib", 3))
    joblib.dump(state, folder / "e.safetensors")  # uncompressed joblib
    torch.save({"w": torch.zeros(2)}, folder / "f.safetensors")  # a torch zip under a safe name
    torch.save({"w": torch.zeros(2)}, folder / "g.bin")
    (folder / "h.pkl").write_bytes(pickle.dumps(Payload()))
    (folder / "i.txt").write_bytes(b"\x80" + pickle.dumps(Payload())[1:])  # not UTF-8
    (folder / "j.json").write_bytes(pickle.dumps({"a": 1}, protocol=0))  # an ASCII pickle
    np.save(folder / "k.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "l.npy", np.zeros(3))  # numbers only, but not a kind lavit publishes
    (folder / "m.safetensors").write_bytes(os.urandom(4096))
    (folder / "n.png").write_bytes(lzma.compress(pickle.dumps(Payload())))
    (folder / "o.py").write_text("import os\nos.system('echo hi')\n")  # not one of lavit's files
    shipped = folder / "modeling_lavit.py"
    shipped.write_text(shipped.read_text() + "\nimport os\n")  # lavit's name, other content
    with zipfile.ZipFile(folder / "p.zip", "w") as archive:
        archive.writestr("data.pkl", pickle.dumps({"a": 1}))
    (folder / "q.json").write_bytes(gzip.compress(b'{"a": 1}'))  # compressed JSON is not JSON
    (folder / "r.gz").write_bytes(bz2.compress(b"text"))
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}'
    (folder / "s.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # past the end
    (outside / "secret.txt").write_text("not for the Hub")
    (folder / "t.txt").symlink_to(outside / "secret.txt")  # a link out of the folder
    (outside / "away").mkdir()
    (folder / "u").symlink_to(outside / "away", target_is_directory=True)
    os.mkfifo(folder / "v.json")  # reading it would hang
    (outside / "w.pkl").write_bytes(pickle.dumps(Payload()))
    os.link(outside / "w.pkl", folder / "w.json")  # a hard link: checked by its content like any file
    return [f"{letter}." for letter in "abcdefghijklmnopqrs"] + ["modeling_lavit.py", "t.txt", "u", "v.json",
                                                                 "w.json"]


def good_files(folder: Path) -> list[str]:
    """Files of allowed kinds that a card or a folder may hold; returns their names."""
    Image.fromarray(real_photos()[0]).save(folder / "card.png")
    Image.fromarray(real_photos()[1]).save(folder / "card.jpg")
    save_file({"w": torch.ones(2, 3)}, folder / "extra.safetensors")
    (folder / "notes.txt").write_text("réglages, 日本語\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "inside.md").symlink_to(folder / "README.md")  # a link within the folder
    os.link(folder / "config.json", folder / "config-copy.json")  # a hard link to an allowed file
    return ["card.png", "card.jpg", "extra.safetensors", "notes.txt", "chat_template.jinja", "inside.md",
            "config-copy.json"]


def test_only_allowlisted_kinds_pass_checked_by_content(lavit_folder, tmp_path):
    hub = export_model(lavit_folder, tmp_path / "hub")
    assert folder_problems(hub) == []  # the real export passes, marker included
    check_export_folder(hub)
    outside = tmp_path / "outside"
    outside.mkdir()
    bad, good = bad_files(hub, outside), good_files(hub)
    problems = folder_problems(hub)
    named = {problem.split(":")[0].split(" ")[0] for problem in problems}
    for name in bad:
        assert any(entry.startswith(name) for entry in named), (name, problems)
    for name in good:
        assert name not in named, (name, problems)
    assert len(problems) == len(bad)  # nothing else: every allowed file passes
    assert "t.txt links outside the folder" in " ".join(problems) and "v.json is not a regular file" in problems
    with pytest.raises(ValueError, match="a.json: not UTF-8 JSON"):  # checked before any Hub call
        push_to_hub(hub, "someone/lavit-test")


def test_push_refuses_a_folder_with_a_joblib_pickle_before_uploading(lavit_folder, tmp_path):
    """The issue's example: a joblib `compress="lzma"` pickle beside an export; `push_to_hub` refuses the folder
    before any Hub call (tests run offline: a call would fail with another error)."""
    hub = export_model(lavit_folder, tmp_path / "hub")
    joblib.dump({"w": np.zeros(3)}, hub / "extra.joblib", compress="lzma")
    with pytest.raises(ValueError, match="extra.joblib: not a kind of file lavit publishes"):
        push_to_hub(hub, "someone/lavit-test")


def pickled_model_folder(lavit_folder: Path, tmp_path: Path, payload=None) -> Path:
    """A LaVIT folder whose weights are `pytorch_model.bin` (a `torch.save` pickle) instead of safetensors."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(lavit_folder, folder)
    state = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(payload if payload is not None else state, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_with_the_command_that_converts_them(lavit_folder, tmp_path, capsys):
    from lavit import LaVITForCausalLM

    folder = pickled_model_folder(lavit_folder, tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(real_photos()[0]).save(photo)
    for argv in (["caption", str(photo)], ["export", str(tmp_path / "hub")], ["reconstruct", str(photo), "-o",
                                                                            str(tmp_path / "out.png")]):
        assert main([*argv, "--model", str(folder)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pytorch_model.bin" in err[0], err
        assert "python -m lavit.file_kinds convert" in err[0] and "weights_only=False" not in err[0]
    assert main(["finetune", "--data", str(photo), "--model", str(folder), "--output_dir", str(tmp_path / "run")]) == 1
    assert "python -m lavit.file_kinds convert" in capsys.readouterr().err  # the stages' parser checks it too
    with pytest.raises(ValueError, match="holds its weights as pickles"):
        export_model(folder, tmp_path / "hub")
    # the conversion the message names, for a trusted folder: the same weights, now safetensors
    assert file_kinds_main(["convert", str(folder), str(tmp_path / "converted")]) == 0
    converted = LaVITForCausalLM.from_pretrained(tmp_path / "converted")
    original = LaVITForCausalLM.from_pretrained(lavit_folder)
    for (name, value), (_, expected) in zip(converted.state_dict().items(), original.state_dict().items(),
                                            strict=True):
        assert torch.equal(value, expected), name
    assert not list((tmp_path / "converted").glob("*.bin"))
    assert main(["export", str(tmp_path / "hub"), "--model", str(tmp_path / "converted")]) == 0


def hub_cache_with(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as the cached snapshot of the Hub model `repo_id`, in huggingface_hub's cache layout under `cache`."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.mark.slow  # three commands in a fresh process
def test_a_hub_model_with_pickled_weights_is_refused_by_every_command_and_stage(lavit_folder, tmp_path):
    """A Hub id is checked like a local folder: from its cached snapshot offline (the Hub's file list online), by
    the one check every command and stage parser runs on the flags that name a model; a safetensors repo loads."""
    cache = tmp_path / "hub-cache"
    hub_cache_with(cache, "someone/pickled", pickled_model_folder(lavit_folder, tmp_path))
    hub_cache_with(cache, "someone/safe", lavit_folder)
    photo = tmp_path / "photo.png"
    Image.fromarray(real_photos()[0]).save(photo)
    commands = [["caption", str(photo)], ["finetune", "--data", str(photo), "--output_dir", str(tmp_path / "run")],
                ["train-detokenizer", "--data", str(photo), "--visual_tokenizer", str(lavit_folder), "--output_dir",
                 str(tmp_path / "run3")]]
    script = f"""
from lavit.cli import main
for argv in {commands!r}:
    print("rc", main([*argv, "--model", "someone/pickled"]), flush=True)
print("rc", main(["caption", {str(photo)!r}, "--model", "someone/safe"]), flush=True)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                            cwd=cache)  # not beside the fixture's folder named `lavit`, which `-c` would import
    codes = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("rc ")]
    assert codes == ["1", "1", "1", "0"], (result.stdout, result.stderr[-3000:])
    refusals = [line for line in result.stderr.splitlines() if "the Hub model someone/pickled" in line]
    assert len(refusals) == 3 and all("pytorch_model.bin" in line and "hf download someone/pickled" in line
                                      and "python -m lavit.file_kinds convert" in line for line in refusals), refusals


def test_a_malicious_pickle_is_never_run_and_no_message_suggests_weights_only_false(lavit_folder, tmp_path,
                                                                                       capfd):
    folder = pickled_model_folder(lavit_folder, tmp_path, payload=Payload())
    assert file_kinds_main(["convert", str(folder), str(tmp_path / "converted")]) == 1
    err = capfd.readouterr()
    assert "holds more than tensors" in err.err and "weights_only=False" not in err.err
    assert "pickle code ran" not in err.out + err.err and not (tmp_path / "converted").exists()
    # a loader's own message (PyTorch, transformers) is rephrased by the command line's error line
    from lavit.command_inputs import one_line

    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "weights_only" in str(error.value) and "weights_only" not in one_line(error.value)
    assert "lavit does not load it" in one_line(error.value)


def test_no_message_of_lavit_suggests_weights_only_false():
    found = []
    for folder in ("lavit", "training", "hub_cards", "modeling_lavit", "processing"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if "weights_only=False" in path.read_text():
                found.append(str(path.relative_to(REPO_ROOT)))
    assert not found


@pytest.mark.slow  # a new Python process that imports lavit
def test_the_conversion_command_runs_as_documented(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lavit.file_kinds"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: python -m lavit.file_kinds convert" in result.stderr
