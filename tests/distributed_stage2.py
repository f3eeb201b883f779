"""Stage 2 for the multi-process tests: `torchrun --nproc_per_node N distributed_stage2.py SETTINGS.json`."""

import json
import sys

import torch.distributed
from lavit.training.arguments import LaVITTrainingArguments
from lavit.training.stage2_pretrain import PretrainingArguments, pretrain

settings = json.loads(open(sys.argv[1]).read())
pretrain(PretrainingArguments(**settings["script"]), LaVITTrainingArguments(**settings["training"]))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # a clean exit: gloo aborts at interpreter shutdown otherwise
