"""`lavit.cli.evaluate`: the `lavit evaluate` parser (benchmarks, required flags, the ranges of its numbers),
`evaluation_config` (the benchmark's task, metric, labels and split, and only the generation settings the user
gave), and the runner's refusals that come before any data or model is read."""

import argparse

import pytest

from lavit.cli import main
from lavit.cli.evaluate import RUNNERS, add_parsers, evaluation_config, run_evaluate
from lavit.evaluation.benchmarks import BENCHMARKS


def evaluate_parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="lavit").add_subparsers(dest="command")
    add_parsers(commands)
    return commands.choices["evaluate"]


def parse(*argv) -> argparse.Namespace:
    return evaluate_parser().parse_args([*argv, "--model", "org/model", "--output", "out"])


def test_every_benchmark_is_a_choice():
    (benchmark,) = [action for action in evaluate_parser()._actions if action.dest == "benchmark"]
    assert list(benchmark.choices) == sorted(BENCHMARKS)


def test_model_and_output_are_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_parser().parse_args(["coco-karpathy"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --model, --output" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--num-candidates", "1025"),
                                             ("--limit", "0"), ("--seed", "-1")])
def test_numbers_outside_their_range_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse("gqa", flag, value)
    assert f"argument {flag}: must be an integer" in capsys.readouterr().err


def test_a_caption_benchmark_keeps_the_official_generation_unless_asked():
    args = parse("coco-karpathy")
    config = evaluation_config(args, BENCHMARKS["coco-karpathy"])
    assert config.task == "caption" and config.generation == {}
    assert (config.name, config.dataset_type, config.split) == ("COCO Karpathy test", "yerevann/coco-karpathy", "test")
    assert config.batch_size == 8 and config.seed == 0 and config.use_java is None

    args = parse("coco-karpathy", "--num-beams", "3", "--split", "val", "--no-java", "--prompt", "a photo of")
    config = evaluation_config(args, BENCHMARKS["coco-karpathy"])
    assert config.generation == {"num_beams": 3} and config.split == "val" and config.use_java is False
    assert config.prompt == "a photo of"


def test_text_to_image_takes_the_steps_and_not_the_text_settings():
    args = parse("coco-t2i", "--steps", "10", "--num-beams", "3", "--max-new-tokens", "5")
    config = evaluation_config(args, BENCHMARKS["coco-t2i"])
    assert config.task == "text-to-image" and config.generation == {"num_inference_steps": 10}


def test_the_benchmarks_metric_and_two_stage_vqa_carry_over():
    assert evaluation_config(parse("gqa"), BENCHMARKS["gqa"]).vqa_metric == "exact_match"
    vizwiz = evaluation_config(parse("vizwiz"), BENCHMARKS["vizwiz"])
    assert vizwiz.vqa_metric == "vqa_accuracy" and vizwiz.vizwiz_two_stage is True


def test_several_candidates_need_a_clip_model():
    with pytest.raises(ValueError, match="num_candidates must be 1, or more with a clip_model"):
        evaluation_config(parse("coco-t2i", "--num-candidates", "4"), BENCHMARKS["coco-t2i"])
    config = evaluation_config(parse("coco-t2i", "--num-candidates", "4", "--clip-model", "clip"),
                               BENCHMARKS["coco-t2i"])
    assert config.num_candidates == 4 and config.clip_model == "clip"


def test_record_into_a_hub_id_is_refused_before_reading_data(capsys):
    code = main(["evaluate", "coco-karpathy", "--model", "org/model", "--output", "out", "--record"])
    err = capsys.readouterr().err
    assert code == 1
    assert "lavit evaluate: error: --record writes into the model folder, but org/model is not a local folder" in err
    assert RUNNERS == {"evaluate": run_evaluate}
