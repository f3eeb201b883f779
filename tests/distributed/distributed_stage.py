"""A training stage for the multi-process tests: `torchrun --nproc_per_node N distributed_stage.py SETTINGS.json`;
SETTINGS holds `stage` ("tokenizer", "pretrain" or "detokenizer"), the stage's `script` and `training` arguments."""

import faulthandler
import json
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
        # a clean exit: gloo aborts at interpreter shutdown otherwise; the barrier keeps a rank that finished first
        # from tearing its connections down while the other still talks to it (seen once as SIGABRT under ZeRO-3
        # offload, after both ranks had saved)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
