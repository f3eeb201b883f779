"""A training stage for the multi-process tests: `torchrun --nproc_per_node N distributed_stage.py SETTINGS.json`;
SETTINGS holds `stage` ("tokenizer", "pretrain" or "detokenizer"), the stage's `script` and `training` arguments."""

import faulthandler
import json
import os
import sys

import torch.distributed
from lavit.training.arguments import (
    DetokenizerTrainingArguments,
    LaVITTrainingArguments,
    PretrainingArguments,
    TokenizerTrainingArguments,
)
from lavit.training.stage1_tokenizer import train_tokenizer
from lavit.training.stage2_pretrain import pretrain
from lavit.training.stage3_detokenizer import train_detokenizer

STAGES = {"tokenizer": (TokenizerTrainingArguments, train_tokenizer), "pretrain": (PretrainingArguments, pretrain),
          "detokenizer": (DetokenizerTrainingArguments, train_detokenizer)}

if __name__ == "__main__":
    settings = json.loads(open(sys.argv[1]).read())
    # a hung rank is a failure: every rank dumps its stack and exits before the test's own timeout
    faulthandler.dump_traceback_later(settings.get("timeout", 480), exit=True)
    arguments_class, train = STAGES[settings.get("stage", "pretrain")]
    train(arguments_class(**settings["script"]), LaVITTrainingArguments(**settings["training"]))
    if torch.distributed.is_initialized():
        # every rank has finished and saved before any leaves: a rank that finished first never tears its
        # connections down while the other still talks to it
        torch.distributed.barrier()
    # then the process ends without the interpreter's teardown, where a C++ thread of the DeepSpeed/gloo stack
    # aborted now and then under load ("terminate called without an active exception", SIGABRT of one rank, after
    # both had saved; with destroy_process_group too): the test judges what the ranks wrote, which is complete here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
