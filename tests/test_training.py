"""Stage 2 and fine-tuning through the real entry points: resume after a crash, learning-rate groups, LoRA merge,
and multi-process data parallel on CPU (torchrun and `accelerate launch` DDP, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 with CPU
offload) matching one process on the same global batch; stage 1 and the detokenizer's EMA under ZeRO-3."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, training_args, training_settings, write_stage_components
from lavit.training.arguments import CONFIG_PRESETS, load_config_preset
from safetensors.torch import load_file
from transformers import TrainerCallback

from lavit import LaVITForCausalLM, LaVITTokenizerModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny (untrained, deterministic) visual tokenizer, a tiny LM and a photo dataset, pre-tokenized too."""
    from lavit.training.preprocess import PreprocessArguments, preprocess

    root = tmp_path_factory.mktemp("components")
    components = write_stage_components(root)
    tokenized = preprocess(PreprocessArguments(data=str(components["photos"]), visual_tokenizer=str(root / "tokenizer"),
                                               output=str(root / "photos_tokenized"), batch_size=4))
    return {**components, "tokenized": tokenized}


def stage2_script(components, data="photos", **overrides):
    from lavit.training.stage2_pretrain import PretrainingArguments

    settings = dict(data=str(components[data]), visual_tokenizer=str(components["tokenizer"]),
                    language_model=str(components["lm"]), max_length=96, resume="auto", visual_learning_rate=None)
    settings.update(overrides)
    return PretrainingArguments(**settings)


def final_weights(folder) -> dict:
    return load_file(Path(folder) / "model.safetensors")


class CrashAt(TrainerCallback):
    """Simulates a killed run: dies at `step`, after writing a half checkpoint (no trainer_state.json)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            partial = Path(args.output_dir) / f"checkpoint-{self.step}"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "model.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt("killed")


def test_resume_after_a_crash_gives_the_uninterrupted_run(components, tmp_path):
    from lavit.training.stage2_pretrain import pretrain

    arguments = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3)
    reference = pretrain(stage2_script(components), training_args(tmp_path / "reference", **arguments))

    with pytest.raises(KeyboardInterrupt):
        pretrain(stage2_script(components), training_args(tmp_path / "crashed", **arguments), callbacks=[CrashAt(5)])
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = pretrain(stage2_script(components), training_args(tmp_path / "crashed", **arguments))

    log = [json.loads(line) for line in (tmp_path / "crashed" / "logs.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry][-1] == 5  # resumed at step 4, ran 5 and 6
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    # the folder is Hub-ready: code, processor and weights load with the Auto classes
    from transformers import AutoModelForCausalLM, AutoProcessor

    assert AutoProcessor.from_pretrained(resumed, trust_remote_code=True).tokenizer is not None
    assert isinstance(AutoModelForCausalLM.from_pretrained(resumed, trust_remote_code=True), torch.nn.Module)


def test_visual_modules_and_rows_get_their_own_learning_rate(components, tmp_path):
    from lavit.training.stage2_pretrain import build_unified_model, data_collator, pretraining_dataset
    from lavit.training.trainer import LaVITTrainer

    script = stage2_script(components, visual_learning_rate=1e-2)
    model, processor = build_unified_model(script)
    dataset, _ = pretraining_dataset(script, processor.tokenizer, model.config)
    trainer = LaVITTrainer(model=model, args=training_args(tmp_path, max_steps=1, weight_decay=0.0,
                                                           adam_beta2=0.999, learning_rate=1e-4),
                           train_dataset=dataset, data_collator=data_collator(processor, model.config, True),
                           visual_learning_rate=1e-2)
    trainer.create_optimizer()
    rates = {group["lr"] for group in trainer.optimizer.param_groups}
    assert rates == {1e-4, 1e-2}
    embeddings = model.get_input_embeddings().weight
    before = embeddings.detach().clone()
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("skipped_records")
    model.train()
    model(**batch).loss.backward()
    trainer.optimizer.step()
    change = (embeddings.detach() - before).abs()
    text_rows, visual_rows = slice(0, model.config.text_vocab_size), slice(model.config.text_vocab_size, None)
    # Adam's first step moves every touched entry by about lr: the visual rows 100x more than the text rows
    text_step = change[text_rows][change[text_rows] > 0].mean()
    visual_step = change[visual_rows][change[visual_rows] > 0].mean()
    assert 50 < float(visual_step / text_step) < 200


def test_lora_finetuning_merges_into_a_plain_checkpoint(components, tmp_path):
    from lavit.training.finetune import FinetuningArguments, finetune
    from lavit.training.stage2_pretrain import pretrain

    base = pretrain(stage2_script(components), training_args(tmp_path / "stage2", max_steps=2))
    finetuned = finetune(
        FinetuningArguments(model=str(base), data=str(components["photos"]), task="caption", lora=True, lora_r=4,
                            resume="no"),
        training_args(tmp_path / "lora", max_steps=4, learning_rate=1e-2),
    )
    assert not (finetuned / "adapter_config.json").exists()
    before, after = final_weights(base), final_weights(finetuned)
    assert before.keys() == after.keys()  # merged: no lora_A/lora_B left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("language_model" in name and "proj" in name for name in changed), changed
    LaVITForCausalLM.from_pretrained(finetuned)


def run_processes(settings: dict, tmp_path, processes: int, name: str, launcher: str = "torchrun") -> list[float]:
    """Runs `tests/distributed_stage.py` in `processes` processes (torchrun, or `accelerate launch`) and returns the
    logged losses."""
    settings_file = tmp_path / f"{name}.json"
    settings_file.write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "tests")}
    port = str(29500 + hash(name) % 500)
    if launcher == "accelerate":  # --multi_gpu is accelerate's data-parallel launcher; use_cpu keeps it on CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                   "--num_processes", str(processes), "--main_process_port", port, "--mixed_precision", "no",
                   "--dynamo_backend", "no"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", port]
    command += [str(REPO_ROOT / "tests" / "distributed_stage.py"), str(settings_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-12000:]
    log = Path(settings["training"]["output_dir"]) / "logs.jsonl"
    return [entry["loss"] for entry in map(json.loads, log.read_text().splitlines()) if "loss" in entry]


def data_parallel_settings(components, output_dir, per_device_batch_size: int, **training) -> dict:
    script = {"data": str(components["tokenized"]), "visual_tokenizer": str(components["tokenizer"]),
              "language_model": str(components["lm"]), "max_length": 24, "order": "both", "resume": "no",
              "visual_learning_rate": None, "packed": False}  # 22 rows: every step takes 4 distinct ones
    training = training_settings(output_dir, logging_steps=1, max_steps=3, gradient_accumulation_steps=1,
                                 per_device_train_batch_size=per_device_batch_size, **training)
    return {"script": script, "training": training}


@pytest.fixture(scope="module")
def one_process_run(components, tmp_path_factory):
    """Stage 2 in one process on a global batch of 4: its losses and final weights."""
    root = tmp_path_factory.mktemp("one_process")
    losses = run_processes(data_parallel_settings(components, root / "run", 4), root, 1, "one")
    return losses, final_weights(root / "run" / "final")


@pytest.mark.parametrize("launcher", ["torchrun_ddp", "accelerate_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                      "deepspeed_zero3_offload"])
def test_two_processes_match_one_process_on_the_same_global_batch(components, one_process_run, tmp_path, launcher):
    extra = {}
    if launcher.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        extra["deepspeed"] = str(CONFIG_PRESETS / f"{launcher.removeprefix('deepspeed_')}.json")
    settings = data_parallel_settings(components, tmp_path / "two", 2, **extra)
    two = run_processes(settings, tmp_path, 2, launcher, "accelerate" if launcher == "accelerate_ddp" else "torchrun")
    one, expected = one_process_run
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-4), (one, two)
    # the saved model is whole (ZeRO-3 gathers its shards) and holds the same weights
    got = final_weights(tmp_path / "two" / "final")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name
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
    from lavit.training.stage3_detokenizer import EMA_FILE

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


def test_detokenizer_training_resumes_with_its_ema_and_loads_anywhere(components, tmp_path):
    from lavit.training.stage3_detokenizer import EMA_FILE, DetokenizerTrainingArguments, train_detokenizer
    from transformers import AutoModel

    def script():
        return DetokenizerTrainingArguments(
            data=str(components["photos"]), visual_tokenizer=str(components["tokenizer"]), detokenizer_config="tiny",
            ema_decay=0.9, resume="auto",
        )

    arguments = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3)
    reference = train_detokenizer(script(), training_args(tmp_path / "reference", **arguments))
    with pytest.raises(KeyboardInterrupt):
        train_detokenizer(script(), training_args(tmp_path / "crashed", **arguments), callbacks=[CrashAt(5)])
    assert (tmp_path / "crashed" / "checkpoint-4" / EMA_FILE).is_file()
    resumed = train_detokenizer(script(), training_args(tmp_path / "crashed", **arguments))
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    # the final weights are the EMA: trained parameters moved, less than the raw weights of the last checkpoint
    initial = LaVITTokenizerModel.from_pretrained(components["tokenizer"]).decoder.state_dict()
    assert all(torch.equal(initial[key], got[f"decoder.{key}"]) for key in initial)  # frozen feature decoder
    raw = load_file(tmp_path / "reference" / "checkpoint-6" / "model.safetensors")
    name = "unet.conv_out.weight"
    assert not torch.allclose(raw[name], got[name])
    detokenizer = AutoModel.from_pretrained(resumed, trust_remote_code=True)
    images = detokenizer.decode(torch.tensor([1, 2, 3]), torch.tensor([3]), num_inference_steps=2)
    assert images[0].size == (32, 32)


def test_skipped_records_reach_every_log_sink(lavit_model, tmp_path):
    """The count is added before any log callback runs: a sink registered first (as the Trainer's TensorBoard or W&B
    callbacks are) and logs.jsonl both get it, in every stage (they all log through `LaVITTrainer.log`)."""
    from lavit.training.data import BadRecordCounter
    from lavit.training.trainer import JsonlLoggerCallback, LaVITTrainer

    class Sink(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    counter = BadRecordCounter()
    counter.skip("unreadable image", "record 3: cannot read")
    sink = Sink()
    trainer = LaVITTrainer(model=lavit_model, args=training_args(tmp_path), skip_counter=counter,
                           callbacks=[sink, JsonlLoggerCallback()])
    trainer.log({"loss": 1.5})
    trainer.log({"eval_loss": 2.0})
    jsonl = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert sink.logs[0]["skipped_records"] == jsonl[0]["skipped_records"] == 1
    assert "skipped_records" not in sink.logs[1] and "skipped_records" not in jsonl[1]
