"""Training stages, data and collators for LaVIT (installed as `lavit.training`)."""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
    # the Trainer imports DeepSpeed when it is installed; on a machine without any accelerator DeepSpeed would pick
    # the CPU anyway, after a warning on every run. Naming it keeps runs that do not use DeepSpeed quiet.
    os.environ["DS_ACCELERATOR"] = "cpu"
