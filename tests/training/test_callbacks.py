"""`lavit.training.callbacks`: the JSON Lines log, the epoch handed to seeded datasets, the EMA of trained weights
(saved, restored, copied in at the end) and the stop of a run resumed at its last step."""

import json
from types import SimpleNamespace

import pytest
import torch
from lavit.training.callbacks import (
    EMA_FILE,
    LOGS_FILE,
    DataEpochCallback,
    EMACallback,
    JsonlLoggerCallback,
    StopAtMaxStepsCallback,
    TrainingComplete,
)
from transformers import TrainerControl, TrainerState


def state(global_step=0, max_steps=0, main=True) -> TrainerState:
    result = TrainerState(global_step=global_step, max_steps=max_steps)
    result.is_world_process_zero = main
    return result


class EpochRecorder:
    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_jsonl_logger_appends_one_line_per_log_with_its_step(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path / "run"))  # not created yet: the callback makes it
    callback = JsonlLoggerCallback()
    callback.on_log(args, state(3), TrainerControl(), logs={"loss": 1.5})
    callback.on_log(args, state(4), TrainerControl(), logs={"loss": 1.25, "learning_rate": 0.1})
    lines = (tmp_path / "run" / LOGS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "loss": 1.5},
                                                    {"step": 4, "loss": 1.25, "learning_rate": 0.1}]


def test_jsonl_logger_writes_nothing_for_empty_logs_or_on_other_processes(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path))
    JsonlLoggerCallback().on_log(args, state(1), TrainerControl(), logs={})
    JsonlLoggerCallback().on_log(args, state(1, main=False), TrainerControl(), logs={"loss": 1.0})
    assert not (tmp_path / LOGS_FILE).exists()


def test_data_epoch_is_the_steps_done_over_the_optimizer_steps_per_epoch():
    dataset = EpochRecorder()
    callback = DataEpochCallback(dataset)
    args = SimpleNamespace(gradient_accumulation_steps=3)
    loader = list(range(10))  # 10 batches, 3 per step: 4 optimizer steps per epoch (the last one short)
    for global_step in (0, 4, 11, 12):
        callback.on_epoch_begin(args, state(global_step), TrainerControl(), train_dataloader=loader)
    assert dataset.epochs == [0, 1, 2, 3]


def test_data_epoch_of_a_dataset_without_length_counts_passes():
    dataset = EpochRecorder()
    callback = DataEpochCallback(dataset)
    unsized = iter(range(5))
    for _ in range(3):
        callback.on_epoch_begin(SimpleNamespace(gradient_accumulation_steps=1), state(100), TrainerControl(),
                                train_dataloader=unsized)
    assert dataset.epochs == [0, 1, 2]


def test_data_epoch_leaves_a_dataset_without_set_epoch_alone():
    callback = DataEpochCallback([1, 2, 3])
    callback.on_epoch_begin(SimpleNamespace(gradient_accumulation_steps=1), state(), TrainerControl(),
                            train_dataloader=[1])
    assert callback.passes == 0


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen parameters have no average
    return model


def test_ema_averages_only_trained_parameters_and_copies_the_average_in_at_the_end():
    model = tiny_model()
    callback = EMACallback(model, decay=0.5)
    assert callback.names == ["0.weight", "0.bias"]
    start = model[0].weight.detach().clone()
    frozen = model[1].weight.detach().clone()
    callback.on_step_end(None, state(), TrainerControl())  # diffusers' first average is the weights themselves
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for _ in range(2):
        callback.on_step_end(None, state(), TrainerControl())
    trained = model[0].weight.detach().clone()
    callback.on_train_end(None, state(), TrainerControl())
    assert torch.all(model[0].weight > start) and torch.all(model[0].weight < trained)  # between old and new
    assert torch.equal(model[1].weight, frozen)


def test_ema_is_saved_in_the_checkpoint_and_restored_on_resume(tmp_path):
    model = tiny_model()
    callback = EMACallback(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    callback.on_step_end(None, state(), TrainerControl())
    callback.on_step_end(None, state(), TrainerControl())
    (tmp_path / "checkpoint-2").mkdir()
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), state(2), TrainerControl())
    assert (tmp_path / "checkpoint-2" / EMA_FILE).is_file()
    resumed = EMACallback(tiny_model(), decay=0.9, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.ema.optimization_step == callback.ema.optimization_step == 2
    for saved, restored in zip(callback.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(saved, restored)


def test_resuming_ema_from_a_checkpoint_without_its_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{EMA_FILE} is missing: the checkpoint was written without"):
        EMACallback(tiny_model(), decay=0.9, resume_from_checkpoint=str(tmp_path))


def test_a_run_resumed_at_its_last_step_stops_before_taking_a_step():
    with pytest.raises(TrainingComplete):
        StopAtMaxStepsCallback().on_step_begin(None, state(global_step=10, max_steps=10), TrainerControl())


@pytest.mark.parametrize(("global_step", "max_steps"), [(9, 10), (0, 0), (5, 0)])
def test_a_run_with_steps_left_or_without_a_step_limit_goes_on(global_step, max_steps):
    StopAtMaxStepsCallback().on_step_begin(None, state(global_step, max_steps), TrainerControl())
