"""Every training stage (found from the CLI's stage registry) trains on streamed data, with 0 and 2 dataloader workers
started by fork and by spawn, and gets the batches and crops of the run without workers (every stage draws random
crops here, and mirrors where it can): the same final weights; a streamed
run killed and resumed with workers ends where the uninterrupted one does. The data is three WebDataset shards, so
`datasets` would hand the workers different shards (and the run other batches) without `WorkerBatches`."""

import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import final_weights, training_args
from transformers import TrainerCallback

from lavit.cli import TRAINING_COMMANDS

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


@pytest.fixture(scope="module")
def sharded_photos(components, tmp_path_factory) -> Path:
    """The photo imagefolder as three WebDataset shards (`.png` + `.txt` per record, records dealt round-robin)."""
    photos, folder = components["photos"], tmp_path_factory.mktemp("shards")
    records = [json.loads(line) for line in (photos / "metadata.jsonl").read_text().splitlines()]
    for shard in range(3):
        with tarfile.open(folder / f"shard-{shard:02d}.tar", "w") as tar:
            for index, record in list(enumerate(records))[shard::3]:
                for suffix, payload in ((".png", (photos / record["file_name"]).read_bytes()),
                                        (".txt", record["text"].encode())):
                    member = tarfile.TarInfo(f"{index:05d}{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return folder


@pytest.fixture(scope="module")
def base_model(components, tmp_path_factory):
    """A LaVIT folder for fine-tuning: stage 2 for one step."""
    from lavit.training.arguments import PretrainingArguments
    from lavit.training.stage2_pretrain import pretrain

    script = PretrainingArguments(data=str(components["photos"]), visual_tokenizer=str(components["tokenizer"]),
                                  language_model=str(components["lm"]), max_length=96, resume="no")
    return pretrain(script, training_args(tmp_path_factory.mktemp("base") / "run", max_steps=1))


def stage_run(command, components, photos, base_model):
    """`(entry point, script arguments)` of the stage behind `command`, streaming `photos`."""
    from lavit.training import arguments

    photos = str(photos)
    if command == "train-tokenizer":
        from lavit.training.stage1_tokenizer import train_tokenizer

        return train_tokenizer, arguments.TokenizerTrainingArguments(data=photos, tokenizer_config="tiny",
                                                                     crop_scale=0.5, streaming=True)
    if command == "train":
        from lavit.training.stage2_pretrain import pretrain

        return pretrain, arguments.PretrainingArguments(
            data=photos, visual_tokenizer=str(components["tokenizer"]), language_model=str(components["lm"]),
            max_length=96, streaming=True, crop_scale=0.5, horizontal_flip=True)
    if command == "finetune":
        from lavit.training.finetune import finetune

        return finetune, arguments.FinetuningArguments(model=str(base_model), data=photos, task="caption",
                                                      streaming=True, crop_scale=0.5, horizontal_flip=True)
    if command == "train-detokenizer":
        from lavit.training.stage3_detokenizer import train_detokenizer

        return train_detokenizer, arguments.DetokenizerTrainingArguments(
            data=photos, visual_tokenizer=str(components["tokenizer"]), detokenizer_config="tiny", ema_decay=0.0,
            streaming=True, crop_scale=0.5)
    if command == "pretokenize":
        return None, None  # writes a whole dataset with save_to_disk: it never streams (see its own test)
    raise AssertionError(f"no streamed run for the stage {command!r}: add one here")


def run(entry, script, folder, workers, start_method="fork", callbacks=()):
    from dataclasses import replace

    arguments = training_args(folder, max_steps=4, save_steps=2, per_device_train_batch_size=2,
                              dataloader_num_workers=workers)
    previous = multiprocessing.get_start_method()
    torch.multiprocessing.set_start_method(start_method, force=True)
    try:
        return entry(replace(script), arguments, callbacks=list(callbacks))
    finally:
        torch.multiprocessing.set_start_method(previous, force=True)


def assert_same_weights(first: Path, second: Path):
    expected, got = final_weights(first), final_weights(second)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_every_stage_trains_streamed_with_any_workers_and_resumes(command, components, sharded_photos, base_model,
                                                                  tmp_path):
    entry, script = stage_run(command, components, sharded_photos, base_model)
    if entry is None:
        return
    reference = run(entry, script, tmp_path / "w0", workers=0)
    assert_same_weights(reference, run(entry, script, tmp_path / "w2", workers=2))
    assert_same_weights(reference, run(entry, script, tmp_path / "spawn", workers=2, start_method="spawn"))
    with pytest.raises(KeyboardInterrupt):
        run(entry, script, tmp_path / "crashed", workers=2, callbacks=[CrashAt(3)])
    assert_same_weights(reference, run(entry, script, tmp_path / "crashed", workers=2))


def test_pretokenize_reads_streamed_data_as_the_whole_dataset(components, tmp_path):
    from datasets import load_from_disk
    from lavit.training.arguments import PretokenizeArguments
    from lavit.training.pretokenize import pretokenize

    folders = [pretokenize(PretokenizeArguments(data=str(components["photos"]), streaming=streaming, batch_size=4,
                                              visual_tokenizer=str(components["tokenizer"]),
                                              output=str(tmp_path / f"streaming={streaming}")))
               for streaming in (False, True)]
    first, second = (load_from_disk(str(folder)) for folder in folders)
    assert first["code_ids"] == second["code_ids"] and len(first) > 0
