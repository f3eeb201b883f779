"""Training stages, data and collators for LaVIT (installed as `lavit.training`)."""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
    # the Trainer imports DeepSpeed when it is installed; on a machine without any accelerator DeepSpeed would pick
    # the CPU anyway, after a warning on every run. Naming it keeps runs that do not use DeepSpeed quiet.
    os.environ["DS_ACCELERATOR"] = "cpu"

# the training stages, one owner of their names: command -> (stage script, the line `lavit --help` lists it with).
# Light on purpose: the command listing reads it without importing a stage, and `training.arguments.STAGE_ARGUMENTS`
# adds each stage's argument dataclasses.
STAGES = {
    "train-tokenizer": ("lavit.training.stage1_tokenizer", "stage 1: train the visual tokenizer"),
    "train": ("lavit.training.stage2_pretrain", "stage 2: unified pretraining"),
    "finetune": ("lavit.training.finetune", "caption / VQA / chat fine-tuning, full or LoRA"),
    "pretokenize": ("lavit.training.pretokenize", "store keep masks and code ids of a dataset"),
    "train-detokenizer": ("lavit.training.stage3_detokenizer", "train the pixel detokenizer"),
}
