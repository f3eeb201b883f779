"""Crash consistency with real `kill -9` (SIGKILL) of training and export processes, at several points including
halfway through writing a file: a resumed run gives bit-identical weights and losses to the uninterrupted one, a
checkpoint counts only when complete, and a replaced folder is always whole (old or new)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, final_weights, training_settings
from lavit.training.sample_data import write_photo_imagefolder
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TIMEOUT_S = 300


def run_stage(settings: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    """Runs `crash_stage.py` (beside this file) on `settings` in a fresh process (one thread: comparable runs)."""
    settings_file = tmp_path / f"{name}.json"
    settings_file.write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "tests"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(Path(__file__).with_name("crash_stage.py")), str(settings_file)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def losses(output_dir: Path) -> dict[int, float]:
    entries = map(json.loads, (output_dir / "logs.jsonl").read_text().splitlines())
    return {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photo_imagefolder(tmp_path_factory.mktemp("photos") / "photos")


def tokenizer_settings(photos, output_dir) -> dict:
    """Stage 1 with random crops, the quantizer switched on at step 3 (k-means init) and checkpoints every 2 steps."""
    script = {"data": str(photos), "tokenizer_config": "tiny", "crop_scale": 0.5, "quantizer_start_step": 3,
              "resume": "auto"}
    training = training_settings(output_dir, max_steps=8, save_steps=2, logging_steps=1,
                                 per_device_train_batch_size=2)
    return {"stage": "tokenizer", "script": script, "training": training}


@pytest.fixture(scope="module")
def uninterrupted(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_stage(tokenizer_settings(photos, root / "run"), root, "reference")
    assert result.returncode == 0, result.stderr[-6000:]
    return losses(root / "run"), load_file(root / "run" / "final" / "model.safetensors")


@pytest.mark.parametrize(("point", "step", "resumed_from"), [
    ("step_end", 5, 4),  # mid-epoch, nothing being written
    ("trainer_state", 6, 4),  # trainer_state.json of checkpoint-6 cut in half
    ("weights", 4, 2),  # model.safetensors of checkpoint-4 cut in half
    ("before_marker", 6, 4),  # every file of checkpoint-6 written, the completion marker not
])
def test_stage1_killed_anywhere_resumes_bit_identical(photos, uninterrupted, tmp_path, point, step, resumed_from):
    settings = tokenizer_settings(photos, tmp_path / "run")
    killed = run_stage({**settings, "kill": {"at": point, "step": step}}, tmp_path, "killed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-6000:]
    assert not (tmp_path / "run" / "final").exists()

    resumed = run_stage(settings, tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    if point != "step_end":  # the newest checkpoint is incomplete: the run says so and takes the previous one
        assert f"resuming from {tmp_path / 'run' / f'checkpoint-{resumed_from}'}" in resumed.stderr
        assert f"checkpoint-{step} is incomplete" in resumed.stderr
    expected_losses, expected_weights = uninterrupted
    got = losses(tmp_path / "run")  # the killed run's lines, then the resumed run's from step resumed_from + 1
    assert got == expected_losses
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name in expected_weights:
        assert torch.equal(weights[name], expected_weights[name]), name


EXPORT_KILLER = """
import os, signal, sys
import shutil
import transformers.modeling_utils
from lavit import atomic
from lavit.cli import main

point, destination, model = sys.argv[1:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "shard":  # halfway through a weight shard of the new export
    save = transformers.modeling_utils.safe_save_file
    def half_shard(tensors, filename, *args, **kwargs):
        save(tensors, filename, *args, **kwargs)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        die()
    transformers.modeling_utils.safe_save_file = half_shard
elif point == "swapped":  # the new folder swapped in, the old one not yet deleted
    rmtree = shutil.rmtree
    atomic.shutil.rmtree = lambda path, *args, **kwargs: die() if str(path).endswith(".tmp") else rmtree(path)
elif point == "between_renames":  # no renameat2: the old folder moved aside, the new one not yet in place
    atomic._exchange = lambda first, second: False
    replace = os.replace
    def replace_then_die(source, target):
        replace(source, target)
        if str(target).endswith(".old"):
            die()
    atomic.os.replace = replace_then_die
sys.exit(main(["export", destination, "--model", model, "--max-shard-size", "200KB"]))
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def lavit_folder(tmp_path_factory):
    from conftest import text_vocab_size, tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    folder = tmp_path_factory.mktemp("lavit") / "model"
    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    LaVITForCausalLM(tiny_lavit_config(text_vocab_size(tokenizer))).save_pretrained(folder)
    LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("point", ["shard", "swapped", "between_renames"])
def test_export_killed_while_replacing_a_folder_leaves_it_whole(lavit_folder, tmp_path, point):
    from lavit.hub_cards import check_export_folder, export_model

    from lavit.atomic import recover_folder

    destination = tmp_path / "hub"
    export_model(lavit_folder, destination, {"model_name": "old"}, max_shard_size="200KB")
    old = folder_bytes(destination)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", EXPORT_KILLER, point, str(destination), str(lavit_folder)],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    if point == "between_renames":  # the one instant without renameat2: the old folder waits beside, whole
        assert not destination.exists()
        recover_folder(destination)  # what the next export or save does first
    check_export_folder(destination)
    now = folder_bytes(destination)
    if point == "swapped":
        assert now != old and json.loads(now["lavit_run.json"]) == {}  # the new export, whole
    else:
        assert now == old
    export_model(lavit_folder, destination, max_shard_size="200KB")  # the next export cleans up and replaces it
    check_export_folder(destination)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub"]


def test_a_stale_extension_build_lock_is_named_instead_of_waited_on(tmp_path, monkeypatch):
    """A run killed while DeepSpeed compiled a CPU op leaves `<extensions>/<op>/lock`; later runs would wait on it
    forever. A lock in a folder nothing touched for 10 minutes stops the run with the file to remove; a fresh one (a
    build in progress elsewhere) does not."""
    from lavit.training.checkpoints import STALE_LOCK_SECONDS, check_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "py311_cpu" / "cpu_adam"
    build.mkdir(parents=True)
    (build / "build.ninja").write_text("rule cxx\n")
    (build / "lock").touch()
    check_extension_locks()  # a build in progress: its files are fresh
    old = time.time() - STALE_LOCK_SECONDS - 60
    for path in build.iterdir():
        os.utime(path, (old, old))
    with pytest.raises(RuntimeError, match=f"{build / 'lock'} is a stale build lock.*rm {build / 'lock'}"):
        check_extension_locks()


@pytest.fixture(scope="module")
def components(photos, tmp_path_factory):
    """A tiny untrained visual tokenizer (with its image processor) and a tiny LM for stages 2 and 3."""
    from conftest import tiny_tokenizer_config, write_tiny_language_model

    from lavit import LaVITImageProcessor, LaVITTokenizerModel

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    LaVITTokenizerModel(tiny_tokenizer_config()).save_pretrained(root / "tokenizer")
    LaVITImageProcessor.from_tokenizer_config(tiny_tokenizer_config()).save_pretrained(root / "tokenizer")
    return {"tokenizer": str(root / "tokenizer"), "lm": str(write_tiny_language_model(root / "lm")),
            "photos": str(photos)}


STAGE_SCRIPTS = {
    "pretrain": lambda parts: {"data": parts["photos"], "visual_tokenizer": parts["tokenizer"],
                               "language_model": parts["lm"], "max_length": 96, "visual_learning_rate": 1e-2},
    "detokenizer": lambda parts: {"data": parts["photos"], "visual_tokenizer": parts["tokenizer"],
                                  "detokenizer_config": "tiny", "ema_decay": 0.9, "crop_scale": 0.5},
}


@pytest.mark.parametrize("stage", sorted(STAGE_SCRIPTS))
def test_stages_2_and_3_killed_mid_write_resume_bit_identical(components, tmp_path, stage):
    """Stage 2 (random pair order, packed rows) and the detokenizer (random crops, noise, condition dropout, EMA)
    killed halfway through writing checkpoint-4's trainer_state.json: the resumed run falls back to checkpoint-2."""
    def settings(output_dir):
        training = training_settings(output_dir, max_steps=6, save_steps=2, logging_steps=1,
                                     per_device_train_batch_size=2)
        return {"stage": stage, "script": {**STAGE_SCRIPTS[stage](components), "resume": "auto"},
                "training": training}

    reference = run_stage(settings(tmp_path / "reference"), tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-6000:]
    killed = run_stage({**settings(tmp_path / "run"), "kill": {"at": "trainer_state", "step": 4}}, tmp_path, "killed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-6000:]
    resumed = run_stage(settings(tmp_path / "run"), tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "checkpoint-4 is incomplete" in resumed.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    expected = final_weights(tmp_path / "reference" / "final")  # stage 3: a pipeline folder
    got = final_weights(tmp_path / "run" / "final")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("stage", ["tokenizer", "detokenizer"])
def test_a_run_killed_between_its_last_checkpoint_and_its_final_save_ends_as_the_uninterrupted_run(
        photos, components, tmp_path, stage):
    """The last checkpoint (step max_steps, in the middle of an epoch) is complete but `final` is missing: the resumed
    run trains no step more (the Trainer alone takes one) and saves the uninterrupted run's weights, EMA included."""
    if stage == "tokenizer":
        settings = tokenizer_settings(photos, tmp_path / "run")
    else:
        training = training_settings(tmp_path / "run", max_steps=4, save_steps=2, logging_steps=1,
                                     per_device_train_batch_size=2)
        settings = {"stage": stage, "script": {**STAGE_SCRIPTS[stage](components), "resume": "auto"},
                    "training": training}
    max_steps = settings["training"]["max_steps"]
    reference = run_stage(settings, tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-6000:]
    expected = final_weights(tmp_path / "run" / "final")
    expected_losses = losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final")  # what a kill after the last checkpoint leaves: no final folder

    resumed = run_stage(settings, tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert not (tmp_path / "run" / f"checkpoint-{max_steps + 1}").exists()
    assert losses(tmp_path / "run") == expected_losses
    got = final_weights(tmp_path / "run" / "final")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_stuck_launch_shows_its_stack_when_stopped(tmp_path):
    """Every stage's command line turns on `enable_stack_dumps`: SIGUSR1 prints where a live run is, and the SIGTERM
    that launchers send to the other ranks when one fails prints the stack before the process ends."""
    # "ready" is printed inside the function, so a signal sent once it is read finds the process there (printed
    # before the call, a loaded machine could deliver it while the process was still at module level)
    script = ("import time\nfrom lavit.training.arguments import enable_stack_dumps\nenable_stack_dumps()\n"
              "def stuck_in_a_collective():\n    print('ready', flush=True)\n    time.sleep(90)\n"
              "stuck_in_a_collective()\n")
    log = tmp_path / "stderr.txt"

    def dumps() -> int:
        return log.read_text().count("in stuck_in_a_collective")

    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout.readline().strip() == "ready"
        for expected, stop in ((1, signal.SIGUSR1), (2, signal.SIGTERM)):
            process.send_signal(stop)
            deadline = time.time() + 30
            while dumps() < expected and time.time() < deadline:
                time.sleep(0.1)
        process.wait(timeout=30)
    assert dumps() == 2, log.read_text()  # once per signal
    assert process.returncode == -signal.SIGTERM
