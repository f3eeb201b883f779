"""`lavit.training.evaluation`: the message of a held-out split that cannot be made, the Trainer's evaluation
settings filled in (and refused when contradictory), the held-out records a generated metric can use, and the
model-card rows of the evaluation the final weights had."""

import dataclasses
import math

import numpy as np
import pytest
from conftest import png_bytes, real_photos, training_args
from lavit.training.arguments import FinetuningArguments
from lavit.training.evaluation import (
    EVALUATION_SETTINGS,
    TASK_METRICS,
    GenerationEvaluator,
    configure_evaluation,
    eval_split_problem,
    evaluation_card_rows,
)
from PIL import Image
from transformers.trainer_utils import IntervalStrategy


@pytest.fixture(scope="module")
def photo():
    return png_bytes(np.ascontiguousarray(real_photos()[1][::16, ::16]))


def script(**settings) -> FinetuningArguments:
    return FinetuningArguments(model="m", data="d", **settings)


def test_a_split_of_too_few_records_asks_for_two_and_names_the_fixes():
    problem = eval_split_problem(script(eval_split_size=0.1), 1, 1)
    assert "--data has 1 record(s)" in problem and "needs at least 2" in problem
    assert "--eval_split_size 0" in problem and "--eval_data PATH" in problem


def test_a_split_that_leaves_nothing_to_train_gives_the_range_of_counts():
    problem = eval_split_problem(script(eval_split_size=10), 10, 10)
    assert problem.startswith("--eval_split_size 10 holds out 10 of the 10 records")
    assert "count in [1, 9]" in problem and "set by --preset" not in problem


def test_a_split_the_preset_asked_for_names_the_preset_unless_the_run_gave_the_size():
    arguments = script(eval_split_size=0.1, preset="small-data")
    assert "--preset small-data holds out" in eval_split_problem(arguments, 1, 1)
    arguments.given_flags = frozenset({"eval_split_size"})
    assert "--eval_split_size holds out" in eval_split_problem(arguments, 1, 1)


def test_held_out_data_with_an_explicit_eval_strategy_no_is_refused(tmp_path):
    arguments = script()
    arguments.given_flags = frozenset({"eval_strategy"})
    with pytest.raises(ValueError, match="--eval_strategy no turns evaluation off, but the run holds out data"):
        configure_evaluation(training_args(tmp_path), arguments, has_eval_data=True)


def test_an_accuracy_metric_is_greater_is_better_and_a_given_strategy_is_kept(tmp_path):
    arguments = training_args(tmp_path, eval_strategy="epoch", metric_for_best_model="vqa_accuracy",
                              load_best_model_at_end=True, save_strategy="epoch")
    assert configure_evaluation(arguments, script(), has_eval_data=True) == []
    assert arguments.eval_strategy == IntervalStrategy.EPOCH and arguments.greater_is_better is True


def test_without_held_out_data_the_presets_evaluation_settings_are_turned_off(tmp_path):
    arguments = training_args(tmp_path, eval_strategy="steps", eval_steps=5, load_best_model_at_end=True)
    finetuning = script(preset="small-data", early_stopping_patience=3)
    assert configure_evaluation(arguments, finetuning, has_eval_data=False) == []
    assert arguments.eval_strategy == EVALUATION_SETTINGS["eval_strategy"]
    assert not arguments.load_best_model_at_end and finetuning.early_stopping_patience is None


def test_every_finetuning_task_has_the_metric_its_best_checkpoint_is_chosen_by():
    task = next(item for item in dataclasses.fields(FinetuningArguments) if item.name == "task")
    choices = next(value for value in task.metadata.values() if hasattr(value, "choices")).choices
    assert set(TASK_METRICS) == set(choices)


def test_generated_metrics_refuse_the_chat_task(lavit_processor):
    with pytest.raises(ValueError, match="generated metrics exist for 'caption' and 'vqa', not 'chat'"):
        GenerationEvaluator([], lavit_processor, "chat")


def test_caption_records_without_image_or_text_are_skipped_and_counted(lavit_processor, photo):
    records = [{"image": photo, "text": " a cat "}, {"image": None, "text": "x"}, {"image": photo, "text": "  "},
               {"image": b"broken", "text": "x"}]
    evaluator = GenerationEvaluator(records, lavit_processor, "caption")
    usable = evaluator.usable()
    assert [(prompt, references) for _, prompt, references in usable] == [(lavit_processor.image_token, ["a cat"])]
    assert usable[0][0].mode == "RGB" and evaluator.counter.total == 3


def test_vqa_references_are_the_human_answers_or_the_one_answer_ten_times(lavit_processor, photo):
    records = [{"image": photo, "question": "what?", "answer": "cat", "answers": ["cat", "kitten"]},
               {"image": photo, "question": "color?", "answer": "red"}]
    usable = GenerationEvaluator(records, lavit_processor, "vqa").usable()
    assert [references for _, _, references in usable] == [["cat", "kitten"], ["red"] * 10]
    assert usable[1][1] == lavit_processor.image_token + "Question: color? Answer:"


def test_only_the_first_max_samples_records_are_scored(lavit_processor, photo):
    records = [{"image": photo, "text": f"caption {index}"} for index in range(5)]
    usable = GenerationEvaluator(records, lavit_processor, "caption", max_samples=2).usable()
    assert [references for _, _, references in usable] == [["caption 0"], ["caption 1"]]


LOG = [{"loss": 2.0, "step": 10}, {"eval_loss": 1.23456, "eval_runtime": 3.0, "eval_CIDEr": 0.5, "step": 10},
       {"eval_loss": 1.5, "eval_runtime": 2.0, "eval_CIDEr": 0.4, "step": 20}]


def test_card_rows_are_those_of_the_restored_best_checkpoint():
    rows = evaluation_card_rows(LOG, "runs/x/checkpoint-10/", "image-to-text", "photos")
    assert {row["metric"]: row["value"] for row in rows} == {"loss": 1.2346, "CIDEr": 0.5}
    assert {row["metric_type"] for row in rows} == {"loss", "cider"}
    assert all(row["data"] == "photos (held out, step 10)" and row["dataset_split"] == "held-out" for row in rows)


def test_card_rows_without_a_best_checkpoint_are_the_last_evaluation_and_none_without_one():
    rows = evaluation_card_rows(LOG, None, "visual-question-answering", "vqa.jsonl")
    assert {row["metric"]: row["value"] for row in rows} == {"loss": 1.5, "CIDEr": 0.4}
    assert rows[0]["task_type"] == "visual-question-answering"
    assert evaluation_card_rows(LOG[:1], None, "image-to-text", "photos") == []


@pytest.mark.parametrize("count", [2, 3, 9, 23, 1001])
def test_a_share_that_rounds_up_to_every_record_names_the_largest_share_that_works(count):
    problem = eval_split_problem(script(eval_split_size=0.99999), count, count)
    assert f"holds out {count} of the {count} records" in problem and "(0, 1)" not in problem
    largest = float(problem.split("a share of at most ")[1].split()[0])
    assert 1 <= math.ceil(largest * count) <= count - 1  # the advice, taken, leaves a record on each side


def test_held_out_data_that_is_the_training_data_is_said_however_the_path_is_spelled(tmp_path, monkeypatch, caplog):
    from lavit.training.evaluation import same_source, split_eval_records
    from lavit.training.sample_data import write_imagefolder

    data = write_imagefolder(tmp_path / "data", [Image.new("RGB", (8, 8), "red")] * 2, ["a", "b"])
    (tmp_path / "link").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    assert same_source("data", str(tmp_path / "link")) and same_source("Org/Set", "org/set")
    assert not same_source("data", "org/set")
    with caplog.at_level("WARNING", logger="lavit.training.evaluation"):
        split_eval_records([], FinetuningArguments(model="m", data=str(data), eval_data="link"), seed=0,
                           require_text=False)
    assert "--eval_data link is --data: the run evaluates on the records it trains on" in caplog.text
