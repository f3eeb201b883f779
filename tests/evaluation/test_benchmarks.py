"""`lavit.evaluation.benchmarks`: every paper benchmark names a task, a reader and a metric that `lavit evaluate`
runs, the generic forms leave the format to the user, and the labels of their results never collide."""

import dataclasses

import pytest

from lavit.evaluation.benchmarks import BENCHMARKS, Benchmark
from lavit.evaluation.data import FORMATS
from lavit.evaluation.runner import TASK_TYPES, EvalConfig

GENERIC = ("caption", "vqa", "text-to-image")


@pytest.mark.parametrize("key", sorted(BENCHMARKS))
def test_every_benchmark_makes_a_valid_evaluation_config(key):
    benchmark = BENCHMARKS[key]
    # the fields `lavit evaluate` copies into its EvalConfig, which checks each against its declared range
    config = EvalConfig(task=benchmark.task, vqa_metric=benchmark.vqa_metric,
                        vizwiz_two_stage=benchmark.vizwiz_two_stage, name=benchmark.name,
                        dataset_type=benchmark.dataset_type, split=benchmark.split)
    assert config.task in TASK_TYPES
    assert benchmark.format is None or benchmark.format in FORMATS


def test_only_the_generic_forms_leave_the_format_to_the_user():
    assert {key for key, benchmark in BENCHMARKS.items() if benchmark.format is None} == set(GENERIC)
    for task in GENERIC:  # each generic form is named after its task and labelled as custom data
        assert BENCHMARKS[task].task == task and BENCHMARKS[task].dataset_type == "custom"
    assert {benchmark.task for benchmark in BENCHMARKS.values()} == set(TASK_TYPES)


def test_the_paper_protocols_gqa_exact_match_and_vizwiz_two_stage():
    assert {key for key, benchmark in BENCHMARKS.items() if benchmark.vqa_metric != "vqa_accuracy"} == {"gqa"}
    assert BENCHMARKS["gqa"].vqa_metric == "exact_match"
    assert {key for key, benchmark in BENCHMARKS.items() if benchmark.vizwiz_two_stage} == {"vizwiz"}
    paper = [benchmark for key, benchmark in BENCHMARKS.items() if key not in GENERIC]
    assert all(benchmark.split for benchmark in paper)  # the model card's model-index needs a split


def test_result_labels_are_unique_so_recording_one_benchmark_never_replaces_another():
    # record_results replaces card rows by (metric, dataset_name = the benchmark's name)
    names = [benchmark.name for benchmark in BENCHMARKS.values()]
    assert len(names) == len(set(names))


def test_a_benchmark_is_frozen_and_defaults_to_one_stage_vqa_accuracy():
    benchmark = Benchmark("vqa", None, "my VQA", "me/my-vqa")
    assert (benchmark.split, benchmark.vqa_metric, benchmark.vizwiz_two_stage) == (None, "vqa_accuracy", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BENCHMARKS["vqav2"].vqa_metric = "exact_match"  # a shared table nobody may change in place
    assert BENCHMARKS["vqav2"].vqa_metric == "vqa_accuracy"
