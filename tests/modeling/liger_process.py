"""Liger through the Trainer's `use_liger_kernel`, in a process of its own (run by `test_kernels_lavit.py`): Liger
patches transformers' LLaMA module for the whole process, and `TRITON_INTERPRET=1`, set before Triton is imported, runs
Liger's Triton kernels on the CPU through Triton's interpreter. Prints one JSON line with what the test checks.

1. The same tiny LaVIT model, float32, in training mode: the loss, per-modality losses and gradients of the logits
   path, and of the fused linear cross-entropy that `transformers.integrations.liger.apply_liger_kernel` (the
   Trainer's own call) puts in (Liger's RMSNorm kernel does not run in Triton's interpreter, so this step applies
   the loss only; step 3 checks where the other kernels go).
2. Two steps of `LaVITTrainer` with `use_liger_kernel=True` (the Trainer applies the kernels in `train()`) and
   without: the logged losses.
3. `apply_liger_kernel` with Liger's defaults: which modules of the language model and of the visual side got
   Liger's forwards.
"""

import json
import os
import sys
import tempfile

import torch
from conftest import real_photos, text_vocab_size, tiny_lavit_config, tiny_text_tokenizer
from lavit.modeling.kernels_lavit import register_liger_kernel
from lavit.training.trainer import LaVITTrainer
from transformers import TrainingArguments
from transformers.integrations.liger import apply_liger_kernel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm  # before Liger replaces these names

from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
LOSS_ONLY = {"rope": False, "rms_norm": False, "swiglu": False}
TEXTS = ["<image>a photo of a cat", "a red bus on the street", "question: what is <image> answer: a rocket"]


def make_batch(processor):
    photos = real_photos()
    batch = processor(images=[photos[1], photos[3]], text=TEXTS, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def losses_and_gradients(model, batch, **settings) -> dict:
    model.zero_grad()
    outputs = model(**batch, **settings)
    outputs.loss.backward()
    trained = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
               if parameter.grad is not None}
    return dict(loss=outputs.loss.detach(), text_loss=outputs.text_loss, image_loss=outputs.image_loss,
                logits=outputs.logits, gradients=trained)


def compare_losses(reference_model, fused_model, batch) -> dict:
    """Largest differences between the two paths over every loss setting the Trainer and users pass."""
    result = {"loss": 0.0, "modalities": 0.0, "gradients": 0.0, "fused_logits": [], "eval_logits": None}
    targets = int((batch["labels"] != -100).sum())
    for settings in ({}, {"num_items_in_batch": torch.tensor(targets + 7)}, {"loss_modalities": "text"},
                     {"loss_modalities": "image"}):
        reference = losses_and_gradients(reference_model, batch, **settings)
        fused = losses_and_gradients(fused_model, batch, **settings)
        result["loss"] = max(result["loss"], float((reference["loss"] - fused["loss"]).abs()))
        for name in ("text_loss", "image_loss"):
            if (reference[name] is None) != (fused[name] is None):
                result["modalities"] = float("inf")
            elif reference[name] is not None:
                result["modalities"] = max(result["modalities"], float((reference[name] - fused[name]).abs()))
        assert reference["gradients"].keys() == fused["gradients"].keys()
        for name, gradient in reference["gradients"].items():
            result["gradients"] = max(result["gradients"], float((gradient - fused["gradients"][name]).abs().max()))
        result["fused_logits"].append(fused["logits"] is None)
    with torch.no_grad():
        result["eval_logits"] = fused_model.eval()(**batch).logits is not None
    return result


def trainer_losses(model, processor, output_dir, use_liger_kernel: bool) -> list[float]:
    photos = real_photos()
    rows = [{"text": TEXTS[0], "image": photos[1]}, {"text": TEXTS[2], "image": photos[3]}] * 2

    def collate(records):
        batch = processor(images=[record["image"] for record in records], text=[record["text"] for record in records],
                          padding=True, return_tensors="pt")
        return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}

    args = TrainingArguments(output_dir=output_dir, use_cpu=True, per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                             remove_unused_columns=False, use_liger_kernel=use_liger_kernel,
                             liger_kernel_config=LOSS_ONLY if use_liger_kernel else None, disable_tqdm=True)
    trainer = LaVITTrainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    # the loss kernel is in place: a training forward with targets makes no logits
    applied = model.train()(**collate(rows[:2])).logits is None
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], applied


def patched_modules(model) -> dict:
    """Names of the modules whose forward is Liger's, by kind, on the language model and on the visual side."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    def liger_forward(module, liger_class):
        forward = module.__dict__.get("forward", getattr(type(module), "forward", None))
        return getattr(forward, "__func__", forward) is liger_class.forward

    found = {"norms": [], "liger_norms": [], "mlps": [], "liger_mlps": [], "visual_liger": []}
    for name, module in model.named_modules():
        if name.startswith("model.language_model."):
            if isinstance(module, (LlamaRMSNorm, LigerRMSNorm)):
                found["norms"].append(name)
                found["liger_norms"] += [name] if liger_forward(module, LigerRMSNorm) else []
            if isinstance(module, LlamaMLP):
                found["mlps"].append(name)
                found["liger_mlps"] += [name] if liger_forward(module, LigerSwiGLUMLP) else []
        elif liger_forward(module, LigerRMSNorm) or liger_forward(module, LigerSwiGLUMLP):
            found["visual_liger"].append(name)
    return found


def main():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    text_tokenizer = tiny_text_tokenizer()
    processor = LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), text_tokenizer)
    config = tiny_lavit_config(text_vocab_size(text_tokenizer))
    torch.manual_seed(0)
    reference = LaVITForCausalLM(config).train()
    frozen = LaVITForCausalLM(config).eval()
    frozen.load_state_dict(reference.state_dict())
    # expanded image spans: the Trainer's `num_items_in_batch` counts every target (visual ones too)
    processor.set_visual_tokenizer(frozen)
    batch = make_batch(processor)
    report = {}
    # 1. the Trainer's own call, loss kernel only, on a copy of the same weights
    register_liger_kernel()
    fused = LaVITForCausalLM(config).train()
    fused.load_state_dict(reference.state_dict())
    apply_liger_kernel(fused, LOSS_ONLY)
    report["compare"] = compare_losses(reference, fused, batch)
    # 2. two Trainer steps with and without use_liger_kernel, from the same weights
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for use_liger_kernel in (False, True):
            torch.manual_seed(0)
            model = LaVITForCausalLM(config)
            model.load_state_dict(reference.state_dict())
            runs[use_liger_kernel] = trainer_losses(model, processor, folder, use_liger_kernel)
    report["trainer"] = {"plain": runs[False][0], "liger": runs[True][0], "applied": runs[True][1]}
    # 3. Liger's default kernels: where they land
    patched = LaVITForCausalLM(config)
    apply_liger_kernel(patched, {})
    report["modules"] = patched_modules(patched)
    report["rope_patched"] = modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb
    report["fused_loss_set"] = patched.linear_cross_entropy is not None
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
