"""Every resumable output (found from the code: the kinds registered with `lavit.resumable`) is tied to what made it:
another model, other settings or other data are refused with one line saying how to start fresh; a second writer is
refused while the first runs, and not after it died; an interrupted run resumed equals the uninterrupted one."""

import ast
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, final_weights, training_args
from PIL import Image

from lavit.resumable import (
    FINGERPRINT_FILE,
    RESUMABLE_OUTPUTS,
    OutputLockedError,
    ResumableOutput,
    ResumeMismatchError,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SOURCE_FOLDERS = ("lavit", "training", "hub_cards", "modeling_lavit", "processing")


def registered_kinds_in_source() -> dict[str, Path]:
    """kind -> file, for every `register_resumable_output("kind", ...)` call in the package's source."""
    kinds = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_resumable_output"
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    kinds[node.args[0].value] = path
    return kinds


def import_every_writer():
    import lavit.training.checkpoints  # noqa: F401

    import lavit.evaluation.runner  # noqa: F401


def test_every_writer_that_resumes_is_registered_and_guarded():
    """Modules that resume (read back their own earlier output) register a kind and use `ResumableOutput`."""
    import_every_writer()
    kinds = registered_kinds_in_source()
    assert set(kinds) == set(RESUMABLE_OUTPUTS) == set(DRIVERS), "a resumable output needs a driver in this test"
    for kind, path in kinds.items():
        assert "ResumableOutput(" in path.read_text(), f"{path} registers {kind!r} but never guards a folder"
    # the code that resumes: the Trainer's resume_from_checkpoint and the evaluation's pending predictions
    for folder in SOURCE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if "resume_from_checkpoint=" in text and "trainer.train(" in text:
                assert "resumable_run(" in text, f"{path} resumes training outside resumable_run"
            if "pending_batches(" in text and path.name == "runner.py":
                assert "ResumableOutput(" in text


# ------------------------------------------------------------------------------------------------ a second writer


def hold_lock(folder: Path, kind: str) -> subprocess.Popen:
    """Another process that opens `folder` as the same run (its recorded fingerprint) and keeps writing."""
    code = (
        "import json, sys, time; from pathlib import Path\n"
        "from lavit.resumable import ResumableOutput, register_resumable_output\n"
        f"register_resumable_output({kind!r}, 'test')\n"
        f"folder = Path({str(folder)!r}); fingerprint = json.loads((folder / {FINGERPRINT_FILE!r}).read_text())\n"
        "fingerprint.pop('kind')\n"
        f"with ResumableOutput(folder, {kind!r}, fingerprint):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


# ------------------------------------------------------------------------------------------------ drivers


class EvaluationDriver:
    """`lavit.evaluation.evaluate` on three images with a tiny model, two batches."""

    kind = "evaluation"
    differs = {"other model": "model.weights", "other settings": "num_beams", "other data": "other data"}

    def __init__(self, tmp_path, lavit_model, lavit_processor):
        from lavit.evaluation import EvalConfig, EvalSample

        self.model, self.processor = lavit_model, lavit_processor
        rng = np.random.default_rng(0)
        (tmp_path / "images").mkdir()
        self.samples = []
        for index in range(3):
            path = tmp_path / "images" / f"{index}.png"
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
            self.samples.append(EvalSample(str(index), str(path), references=["a photo"]))
        self.config = EvalConfig("caption", generation={"max_new_tokens": 2, "min_new_tokens": 1, "num_beams": 1},
                                 batch_size=2, use_java=False)
        self.tmp_path = tmp_path

    def run(self, folder, variant="same", interrupt_after=None):
        from dataclasses import replace

        from lavit.evaluation import evaluate

        model, samples, config = self.model, self.samples, self.config
        if variant == "other model":
            model = type(self.model)(self.model.config).eval()
            model.load_state_dict(self.model.state_dict())
            with torch.no_grad():
                model.lm_head.weight.mul_(1.01)
        elif variant == "other settings":
            config = replace(config, generation={**config.generation, "num_beams": 2})
        elif variant == "other data":
            other = self.tmp_path / "images" / "other.png"
            Image.new("RGB", (40, 40), "red").save(other)
            samples = [replace(samples[0], image=str(other)), *samples[1:]]
        if interrupt_after is not None:  # killed at its next generate call: the batches before are written
            calls = iter(range(interrupt_after))
            generate = model.generate

            def interrupted(*args, **kwargs):
                if next(calls, None) is None:
                    raise KeyboardInterrupt("killed")
                return generate(*args, **kwargs)

            model.generate = interrupted
        try:
            evaluate(model, self.processor, samples, config, folder, show_progress=False)
        finally:
            model.__dict__.pop("generate", None)

    def result(self, folder):
        from lavit.evaluation import read_predictions

        return {key: record["prediction"] for key, record in read_predictions(folder).items()}


class TrainingDriver:
    """Stage 1 (`train_tokenizer`) continuing a tiny tokenizer folder on photos, 4 steps, a checkpoint every 2."""

    kind = "training"
    differs = {"other model": "models.model", "other settings": "learning_rate", "other data": "data.data"}

    def __init__(self, tmp_path, components):
        self.tmp_path, self.components = tmp_path, components

    def script(self, variant="same", **overrides):
        from lavit.training.arguments import TokenizerTrainingArguments

        model, data = self.components["tokenizer"], self.components["photos"]
        if variant == "other model":
            from lavit import LaVITTokenizerModel

            model = self.tmp_path / "other_tokenizer"
            if not model.exists():
                shutil.copytree(self.components["tokenizer"], model)
                tokenizer = LaVITTokenizerModel.from_pretrained(model)
                with torch.no_grad():
                    next(tokenizer.merger.parameters()).mul_(1.01)
                tokenizer.save_pretrained(model)
        elif variant == "other data":
            data = self.tmp_path / "other_photos"
            if not data.exists():
                shutil.copytree(self.components["photos"], data)
                first = sorted(path for path in data.rglob("*") if path.suffix in (".png", ".jpg"))[0]
                Image.open(first).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first)
        return TokenizerTrainingArguments(data=str(data), model=str(model), **overrides)

    def run(self, folder, variant="same", interrupt_after=None, save_only_model=False, resume="auto"):
        from lavit.training.stage1_tokenizer import train_tokenizer

        arguments = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                         save_only_model=save_only_model)
        if variant == "other settings":
            arguments["learning_rate"] = 2e-3
        callbacks = [] if interrupt_after is None else [CrashAfter(interrupt_after)]
        train_tokenizer(self.script(variant, resume=resume), training_args(folder, **arguments), callbacks=callbacks)

    def result(self, folder):
        return final_weights(Path(folder) / "final")


class CrashAfter:
    """A `TrainerCallback` that kills the run (KeyboardInterrupt) at the end of step `step`."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt("killed")

        return Crash()


DRIVERS = {"evaluation": EvaluationDriver, "training": TrainingDriver}


@pytest.fixture
def driver(request, tmp_path):
    kind = request.param
    if kind == "evaluation":
        return EvaluationDriver(tmp_path, request.getfixturevalue("lavit_model"),
                                request.getfixturevalue("lavit_processor"))
    return TrainingDriver(tmp_path, request.getfixturevalue("components"))


@pytest.mark.slow  # several runs per kind (evaluation about 10 s alone, training about 40 s)
@pytest.mark.parametrize("driver", list(DRIVERS), indirect=True)
def test_a_resumable_output_refuses_to_mix_and_to_share_and_resumes_exactly(driver, tmp_path):
    # 1. The uninterrupted run, and an interrupted one resumed: the same result.
    driver.run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        driver.run(tmp_path / "out", interrupt_after=1 if isinstance(driver, EvaluationDriver) else 3)
    driver.run(tmp_path / "out")
    expected, got = driver.result(tmp_path / "whole"), driver.result(tmp_path / "out")
    assert expected.keys() == got.keys()
    for key in expected:
        assert (torch.equal(expected[key], got[key]) if torch.is_tensor(expected[key])
                else expected[key] == got[key]), key

    # 2. Another model, other settings, other data: refused, naming what differs and how to start fresh.
    for variant, field in driver.differs.items():
        with pytest.raises(ResumeMismatchError) as error:
            driver.run(tmp_path / "out", variant)
        message = str(error.value)
        assert "another --output" in message and "\n" not in message, message
        assert field in message, (variant, message)
    driver.run(tmp_path / "fresh", "other settings")  # a folder of its own works

    # 3. A second writer is refused while the first holds the folder; once that one is killed, the folder is free.
    holder = hold_lock(tmp_path / "out", driver.kind)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            driver.run(tmp_path / "out")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    driver.run(tmp_path / "out")


def test_a_folder_with_output_but_no_record_of_what_made_it_is_not_resumed(tmp_path):
    import_every_writer()
    (tmp_path / "predictions-00000.jsonl").write_text('{"id": "0", "prediction": "a cat"}\n')
    guard = ResumableOutput(tmp_path, "evaluation", {"model": "m"}, "give another --output",
                            has_content=lambda folder: True)
    with pytest.raises(ResumeMismatchError, match="without lavit_resume.json.*give another --output"):
        guard.__enter__()
    # the guard's lock is released after a refusal: the same folder can be opened by the next attempt
    (tmp_path / "predictions-00000.jsonl").unlink()
    with ResumableOutput(tmp_path, "evaluation", {"model": "m"}):
        assert json.loads((tmp_path / FINGERPRINT_FILE).read_text()) == {"kind": "evaluation", "model": "m"}


@pytest.mark.parametrize("driver", list(DRIVERS), indirect=True)
def test_a_users_file_of_a_name_the_writer_uses_is_refused_before_any_work(driver, tmp_path):
    """The attack of #24: `lavit evaluate --output FOLDER` replaced the user's `FOLDER/results.json`. In a folder no
    lavit run wrote into (no fingerprint), every file of a name the kind's writer writes or appends to
    (`OUTPUT_FILES`: results.json, logs.jsonl) is the user's, and the run stops at once, naming it."""
    from lavit.atomic import NotLavitFileError
    from lavit.resumable import OUTPUT_FILES

    assert OUTPUT_FILES[driver.kind], f"the {driver.kind} writer writes no file of a fixed name?"
    for name in OUTPUT_FILES[driver.kind]:
        folder = tmp_path / f"users-{name}"
        folder.mkdir()
        (folder / name).write_text("the user's own")
        with pytest.raises(NotLavitFileError, match=rf"holds {name}, which no lavit {driver.kind} run wrote there"):
            driver.run(folder)
        assert (folder / name).read_text() == "the user's own"
        assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == [name]
        # the same in the folder of a run of another kind that does not write that file (atk36 F5: training with
        # --resume no appended to the user's logs.jsonl in an evaluation's output)
        other = next(kind for kind in OUTPUT_FILES if kind != driver.kind)
        (folder / FINGERPRINT_FILE).write_text(json.dumps({"kind": other}))
        with pytest.raises(NotLavitFileError, match=rf"holds {name}, .*\(a {other} run wrote it\)"):
            driver.run(folder)
        assert (folder / name).read_text() == "the user's own"


@pytest.mark.slow
def test_a_checkpoint_saved_without_optimizer_state_is_resumed_only_when_asked(components, tmp_path, caplog):
    driver = TrainingDriver(tmp_path, components)
    with pytest.raises(KeyboardInterrupt):
        driver.run(tmp_path / "out", interrupt_after=3, save_only_model=True)
    with pytest.raises(ValueError, match="has no optimizer, learning-rate schedule, random state.*--resume "
                                         "weights_only.*--resume no"):
        driver.run(tmp_path / "out", save_only_model=True)
    driver.run(tmp_path / "out", save_only_model=True, resume="weights_only")
    assert "weights_only" in caplog.text and (tmp_path / "out" / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize("image_ids, caption_ids", [(["a1", "b2"], ["a1", "b2"]), ([1, 2], ["1", "2"]),
                                                    (["1", "2"], [1, 2]), ([1, 2], [1, 2])])
def test_coco_ids_of_any_type_keep_their_captions(tmp_path, image_ids, caption_ids):
    from lavit.evaluation.data import read_coco_captions, read_vqav2

    coco = {"images": [{"id": key, "file_name": f"{index}.jpg"} for index, key in enumerate(image_ids)],
            "annotations": [{"image_id": key, "caption": f"caption of {index}"}
                            for index, key in enumerate(caption_ids)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    samples = read_coco_captions(tmp_path / "coco.json", tmp_path)
    assert [sample.references for sample in samples] == [["caption of 0"], ["caption of 1"]]
    assert [sample.id for sample in samples] == [str(key) for key in image_ids]
    questions = {"data_subtype": "val2014", "questions": [{"question_id": key, "image_id": 7, "question": "q?"}
                                                          for key in image_ids]}
    answers = {"annotations": [{"question_id": key, "answers": [{"answer": f"answer {index}"}]}
                               for index, key in enumerate(caption_ids)]}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    samples = read_vqav2(tmp_path / "questions.json", tmp_path / "answers.json", tmp_path)
    assert [sample.references for sample in samples] == [["answer 0"], ["answer 1"]]


def test_every_id_gets_its_own_image_file():
    from lavit.evaluation.runner import image_file_name

    ids = ["a/b", "a_b", "a b", "a?b", "x", ".x", "_x", "COCO_val2014_000000000042", "../up", "..", "é", "e"]
    names = [image_file_name(key) for key in ids]
    assert len(set(names)) == len(ids), names
    assert all("/" not in name and not name.startswith(".") for name in names), names
    assert image_file_name("COCO_val2014_000000000042") == "COCO_val2014_000000000042.png"  # plain ids stay readable


def test_cli_evaluate_into_the_same_output_with_other_settings_is_refused_before_recording(
        tmp_path, lavit_model, lavit_processor, capsys):
    """The issue's case: `lavit evaluate --record` again into the same --output with another --num-beams reported the
    first run's predictions under the second's settings and wrote them into the model card."""
    from lavit.cli import main

    folder = tmp_path / "model"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    (tmp_path / "images").mkdir()
    for name in "ab":
        Image.new("RGB", (40, 40), "red" if name == "a" else "blue").save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "test.json").write_text(json.dumps([{"image": f"{name}.png", "caption": ["a photo"]} for name in "ab"]))
    argv = ["evaluate", "coco-karpathy", "--model", str(folder), "--annotations", str(tmp_path / "test.json"),
            "--images", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--no-java",
            "--max-new-tokens", "2", "--record"]
    assert main(argv) == 0
    card = (folder / "lavit_run.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--num-beams", "3"]) != 0
    error = capsys.readouterr().err.strip()
    assert "num_beams" in error and "another --output" in error, error
    assert (folder / "lavit_run.json").read_text() == card  # nothing recorded


@pytest.mark.slow
def test_resume_no_starts_a_folder_over_and_its_older_checkpoints_are_never_resumed(components, tmp_path):
    """`--resume no` into a folder of another run is the user's explicit fresh start: allowed, and the checkpoints
    written before it (here the other run's checkpoint-4, newer by step) are never resumed by a later `auto`."""
    driver = TrainingDriver(tmp_path, components)
    driver.run(tmp_path / "whole")
    driver.run(tmp_path / "out", "other settings")  # checkpoints 2 and 4 of another run
    with pytest.raises(KeyboardInterrupt):
        driver.run(tmp_path / "out", interrupt_after=3, resume="no")  # rewrites checkpoint-2, dies at step 3
    driver.run(tmp_path / "out")  # auto: resumes its own checkpoint-2, not the other run's checkpoint-4
    expected, got = driver.result(tmp_path / "whole"), driver.result(tmp_path / "out")
    assert all(torch.equal(expected[key], got[key]) for key in expected)
