"""Multi-process training: two processes (torchrun, accelerate, DeepSpeed ZeRO-2/3, ZeRO-3 offload) give the losses,
the held-out metrics, the best checkpoint and the saved weights of one process on the same global batch. Slow: each
test launches processes."""
import json
import shutil

import pytest
import torch
from conftest import final_weights, training_settings
from lavit.training.arguments import CONFIG_PRESETS, load_config_preset
from processes import run_processes
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def data_parallel_settings(components, output_dir, per_device_batch_size: int, **training) -> dict:
    """Stage 2 for 3 steps on 18 of the 22 rows (every step takes 4 distinct ones), evaluated after every step on the
    4 held out (2 per device batch: one process runs 2 batches, two processes one each) and saved at every step; the
    best checkpoint is the one of the highest held-out loss, so that it is not the last one: the final weights must
    come back from an earlier checkpoint (under ZeRO-3, from its shards)."""
    script = {"data": str(components["tokenized"]), "visual_tokenizer": str(components["tokenizer"]),
              "language_model": str(components["lm"]), "max_length": 24, "order": "both", "resume": "no",
              "visual_learning_rate": None, "packed": False, "eval_split_size": 4}
    training = training_settings(output_dir, logging_steps=1, max_steps=3, gradient_accumulation_steps=1,
                                 per_device_train_batch_size=per_device_batch_size, per_device_eval_batch_size=2,
                                 eval_strategy="steps", eval_steps=1, save_steps=1, metric_for_best_model="loss",
                                 greater_is_better=True, load_best_model_at_end=True, **training)
    return {"script": script, "training": training}


def held_out_metrics(output_dir) -> tuple[list[dict], list[int]]:
    """The held-out metrics of every evaluation in `logs.jsonl` (timings left out), and the best steps logged."""
    entries = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    evaluations = [{key: value for key, value in entry.items() if key.startswith("eval_") and "runtime" not in key
                    and "per_second" not in key} for entry in entries if "eval_loss" in entry]
    return evaluations, [entry["best_model_step"] for entry in entries if "best_model_step" in entry]


@pytest.fixture(scope="module")
def one_process_run(components, tmp_path_factory):
    """Stage 2 in one process on a global batch of 4: its losses, final (best) and last weights and held-out
    metrics."""
    root = tmp_path_factory.mktemp("one_process")
    losses = run_processes(data_parallel_settings(components, root / "run", 4), root, 1, "one")
    weights = final_weights(root / "run" / "final")
    # the final folder holds the best checkpoint (step 1), not the weights as trained (step 3)
    assert_same_weights(weights, load_file(root / "run" / "checkpoint-1" / "model.safetensors"))
    last = load_file(root / "run" / "checkpoint-3" / "model.safetensors")
    assert any(not torch.allclose(weights[name], last[name]) for name in weights)
    return losses, weights, last, held_out_metrics(root / "run")


def assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name


@pytest.mark.parametrize("launcher", ["torchrun_ddp", "accelerate_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                      "deepspeed_zero3_offload"])
def test_two_processes_match_one_process_on_the_same_global_batch(components, one_process_run, tmp_path, launcher):
    extra = {}
    if launcher.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        extra["deepspeed"] = str(CONFIG_PRESETS / f"{launcher.removeprefix('deepspeed_')}.json")
    settings = data_parallel_settings(components, tmp_path / "two", 2, **extra)
    two = run_processes(settings, tmp_path, 2, launcher, "accelerate" if launcher == "accelerate_ddp" else "torchrun")
    one, expected, last, (one_evaluations, one_best) = one_process_run
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-4), (one, two)
    # held-out metrics summed over the processes: the values of one process, at every evaluation
    two_evaluations, two_best = held_out_metrics(tmp_path / "two")
    assert len(one_evaluations) == len(two_evaluations) == 3
    assert {"eval_loss", "eval_text_loss", "eval_image_loss"} <= set(one_evaluations[0])
    for step, (reference, got) in enumerate(zip(one_evaluations, two_evaluations, strict=True), start=1):
        assert reference.keys() == got.keys(), step
        for name in reference:
            assert got[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-5), (step, name)
    # the same best checkpoint, restored: the saved model is whole (ZeRO-3 gathers its shards) and holds its weights
    assert one_best == two_best == [1]
    assert_same_weights(expected, final_weights(tmp_path / "two" / "final"))
    # and the weights as trained, saved whole in the last checkpoint, are those of one process too
    assert_same_weights(last, load_file(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    shutil.rmtree(tmp_path / "two", ignore_errors=True)


def test_tokenizer_training_under_zero3_matches_ddp(components, tmp_path):
    """Stage 1 with the quantizer switched on mid-run (k-means init, EMA codebook, synchronised across ranks): ZeRO-3
    shards the trained weights but gives the losses and the final weights (codebook included) of DDP."""
    pytest.importorskip("deepspeed")
    # fewer codes than a rank's latents: k-means gives distinct codes (duplicates tie, and float noise breaks ties)
    settings = {**load_config_preset("tiny", "tokenizer"), "codebook_size": 16}
    (tmp_path / "tokenizer.json").write_text(json.dumps(settings))
    script = {"data": str(components["photos"]), "tokenizer_config": str(tmp_path / "tokenizer.json"),
              "quantizer_start_step": 2, "resume": "no"}
    runs = {}
    for launcher, extra in (("ddp", {}), ("zero3", {"deepspeed": str(CONFIG_PRESETS / "zero3.json")})):
        training = training_settings(tmp_path / launcher, logging_steps=1, max_steps=4, per_device_train_batch_size=2,
                                     **extra)
        runs[launcher] = run_processes({"stage": "tokenizer", "script": script, "training": training}, tmp_path, 2,
                                       f"tokenizer_{launcher}")
    assert len(runs["ddp"]) == 4
    assert runs["ddp"] == pytest.approx(runs["zero3"], abs=1e-4), runs
    expected, got = final_weights(tmp_path / "ddp" / "final"), final_weights(tmp_path / "zero3" / "final")
    assert expected.keys() == got.keys() and any("codebook" in name for name in expected)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name


def test_detokenizer_ema_is_the_final_model_under_zero3(components, tmp_path):
    """Under ZeRO-3 each rank holds parameter shards; the EMA (kept whole on every rank) must still become the saved
    model: the final weights equal the EMA written with the last checkpoint, not the raw trained weights."""
    pytest.importorskip("deepspeed")
    from lavit.training.callbacks import EMA_FILE

    output_dir = tmp_path / "zero3"
    script = {"data": str(components["photos"]), "visual_tokenizer": str(components["tokenizer"]),
              "detokenizer_config": "tiny", "ema_decay": 0.5, "vae_steps": 0, "resume": "no"}
    training = training_settings(output_dir, learning_rate=1e-2, logging_steps=1, save_steps=3, max_steps=3,
                                 per_device_train_batch_size=2, deepspeed=str(CONFIG_PRESETS / "zero3.json"))
    run_processes({"stage": "detokenizer", "script": script, "training": training}, tmp_path, 2, "detokenizer")
    ema = load_file(output_dir / "checkpoint-3" / EMA_FILE)
    final = final_weights(output_dir / "final")
    assert ema and set(ema) <= set(final)
    for name in ema:
        assert torch.allclose(ema[name], final[name], atol=1e-6), name
    raw = load_file(output_dir / "checkpoint-3" / "model.safetensors")
    assert any(not torch.allclose(raw[name], final[name]) for name in ema)
