"""The fast paths (issue 30) on the CPU: the settings each device gets where the caller names none, found by every
consumer (training attention, text `generate`, image-token generation and so the pipeline); FlexAttention on packed
rows (forward only: FlexAttention has no CPU backward); Liger's kernels through the Trainer's `use_liger_kernel`
(`liger_process.py`, with Liger's Triton kernels run by Triton's interpreter)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from lavit.modeling.kernels_lavit import CPU_DEFAULTS, CUDA_DEFAULTS, speed_defaults
from test_modeling_lavit import interleaved_batch, text_labels

from lavit import LaVITImageGenerationConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEVICES = {"cpu": CPU_DEFAULTS, None: CPU_DEFAULTS, "meta": CPU_DEFAULTS, "cuda": CUDA_DEFAULTS,
           "cuda:1": CUDA_DEFAULTS, torch.device("cuda", 0): CUDA_DEFAULTS}


def test_cuda_gets_the_fast_defaults_and_the_cpu_keeps_its_own():
    for device, expected in DEVICES.items():
        assert speed_defaults(device) == expected, device
    assert CUDA_DEFAULTS.packed_attn_implementation == "flex_attention"
    assert (CUDA_DEFAULTS.cache_implementation, CUDA_DEFAULTS.compile_decoding) == ("static", True)
    assert (CPU_DEFAULTS.packed_attn_implementation, CPU_DEFAULTS.cache_implementation,
            CPU_DEFAULTS.compile_decoding) == (None, "dynamic", False)


@pytest.mark.parametrize("device", DEVICES)
def test_every_consumer_takes_the_device_defaults_unless_told_otherwise(lavit_model, device):
    from lavit.training.arguments import PretrainingArguments

    defaults = speed_defaults(device)
    # 1. image-token generation (and so LaVITPipeline, which passes its settings through it)
    settings = LaVITImageGenerationConfig().for_device(device)
    assert (settings.cache_implementation, settings.compile_decoding) == (defaults.cache_implementation,
                                                                          defaults.compile_decoding)
    chosen = LaVITImageGenerationConfig(cache_implementation="dynamic", compile_decoding=False).for_device(device)
    assert (chosen.cache_implementation, chosen.compile_decoding) == ("dynamic", False)
    # 2. text generation: the cache transformers gets (static: it compiles the decoding step itself)
    added = lavit_model.default_cache_settings({}, device=device)
    assert added == ({} if defaults.cache_implementation == "dynamic" else {"cache_implementation": "static"})
    for chosen_cache in ({"cache_implementation": "dynamic"}, {"assistant_model": lavit_model}):
        assert lavit_model.default_cache_settings(chosen_cache, device=device) == {}
    # 3. training: the language model's kernel for packed rows, and the collator's row length that follows it
    script_args = PretrainingArguments(data="unused", language_model="lm", visual_tokenizer="tokenizer")
    script_args.set_attention(lavit_model, device)
    kernel = lavit_model.get_decoder().config._attn_implementation
    assert kernel == (defaults.packed_attn_implementation or "sdpa")
    assert script_args.row_length(lavit_model) == (None if kernel == "flex_attention" else script_args.max_length)
    for told in (dict(attn_implementation="eager"), dict(packed=False)):
        lavit_model.get_decoder().set_attn_implementation("sdpa")
        script_args = PretrainingArguments(data="unused", language_model="lm", visual_tokenizer="tokenizer", **told)
        script_args.set_attention(lavit_model, device)
        assert lavit_model.get_decoder().config._attn_implementation == told.get("attn_implementation", "sdpa")


@pytest.mark.slow  # FlexAttention compiles its kernel on the first call (half a minute on 2 cores)
def test_flex_attention_on_packed_rows_gives_the_sdpa_loss(lavit_model, lavit_processor):
    """The packed rows of stage 2 (positions restart per segment, no 2-D mask): FlexAttention's block mask and SDPA's
    block-diagonal mask give the same loss, and the same as the padded batch."""
    padded = interleaved_batch(lavit_processor)
    rows = [ids[mask.bool()] for ids, mask in zip(padded["input_ids"], padded["attention_mask"], strict=True)]
    positions = torch.cat([torch.arange(len(row)) for row in rows])[None]
    packed = dict(input_ids=torch.cat(rows)[None], position_ids=positions,
                  pixel_values=padded["pixel_values"], labels=torch.cat(rows)[None].clone(), use_cache=False)
    losses = {}
    with torch.no_grad():
        padded_loss = lavit_model(**padded, labels=text_labels(padded)).loss
        for kernel in ("sdpa", "flex_attention"):
            lavit_model.get_decoder().set_attn_implementation(kernel)
            losses[kernel] = lavit_model(**packed).loss
    assert torch.allclose(losses["flex_attention"], losses["sdpa"], atol=1e-5), losses
    assert torch.allclose(losses["flex_attention"], padded_loss, atol=1e-5), (losses, padded_loss)


@pytest.mark.slow  # its own process: Liger and Triton's interpreter import in ~10-40 s
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel (lavit[liger])")
def test_liger_kernels_through_use_liger_kernel_keep_the_loss():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "tests")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "modeling" / "liger_process.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # 1. the fused linear cross-entropy over the shared head: lavit's loss, per-modality losses and gradients, with
    #    and without num_items_in_batch and for each loss_modalities; no logits in training, logits in evaluation
    compare = report["compare"]
    assert compare["loss"] < 1e-5 and compare["modalities"] < 1e-5 and compare["gradients"] < 1e-5, compare
    assert all(compare["fused_logits"]) and compare["eval_logits"]
    # 2. the Trainer applies it itself (use_liger_kernel) and logs the losses of the run without it
    trainer = report["trainer"]
    assert trainer["applied"] and trainer["liger"] == pytest.approx(trainer["plain"], abs=1e-5), trainer
    # 3. Liger's defaults reach every RMSNorm and MLP of the language model, its RoPE, and the loss; nothing of the
    #    visual side (frozen tokenizer, merger) is touched
    modules = report["modules"]
    assert modules["norms"] and modules["liger_norms"] == modules["norms"]
    assert modules["mlps"] and modules["liger_mlps"] == modules["mlps"]
    assert modules["visual_liger"] == [] and report["rope_patched"] and report["fused_loss_set"]


def test_use_liger_kernel_on_the_cpu_is_refused_with_the_fix(lavit_model, tmp_path, monkeypatch):
    from lavit.training.trainer import LaVITTrainer
    from transformers import TrainingArguments

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, use_liger_kernel=True, report_to="none")
    with pytest.raises(ValueError, match="--use_liger_kernel needs a GPU.*drop --use_liger_kernel"):
        LaVITTrainer(model=lavit_model, args=args, train_dataset=[])
