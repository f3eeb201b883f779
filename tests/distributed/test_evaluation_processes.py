"""Held-out evaluation under training's conditions: two processes report the metrics of one (sums over all
processes, divided once; the codebook statistics from the codes of the whole held-out set). Slow: launches
processes."""

import json

import pytest
from conftest import training_settings
from processes import run_processes

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def evaluations(output_dir) -> list[dict]:
    lines = (output_dir / "logs.jsonl").read_text().splitlines()
    return [{key: value for key, value in entry.items() if key.startswith("eval_") and "runtime" not in key
             and "per_second" not in key} for entry in map(json.loads, lines) if "eval_loss" in entry]


def test_two_processes_report_the_held_out_metrics_of_one(components, tmp_path):
    # 4 held-out images, 2 per device batch: one process runs 2 batches, two processes one each (no padding repeats).
    # The weights stay as initialised (learning rate 0, VQ not yet on): the two runs evaluate the same model.
    script = {"data": str(components["photos"]), "tokenizer_config": "tiny", "crop_scale": 1.0, "resume": "no",
              "eval_split_size": 4, "quantizer_start_step": 100}
    results = []
    for processes in (1, 2):
        output = tmp_path / f"run{processes}"
        training = training_settings(output, max_steps=2, per_device_train_batch_size=4 // processes,
                                     per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1,
                                     learning_rate=0.0)
        run_processes({"stage": "tokenizer", "script": script, "training": training}, tmp_path, processes,
                      f"eval{processes}")
        results.append(evaluations(output))
    one, two = results
    assert len(one) == len(two) == 2 and {"eval_codebook_usage", "eval_perplexity"} <= set(one[-1])
    for expected, got in zip(one, two, strict=True):
        assert expected.keys() == got.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name
