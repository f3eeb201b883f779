"""Argument dataclasses shared by the stages, and the parser behind their command lines.

Every stage takes its own arguments dataclass plus a [`LaVITTrainingArguments`] (the usual `TrainingArguments`,
with the defaults LaVIT training wants), from the command line or from one JSON/YAML file.
"""

import faulthandler
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class LaVITTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's optimiser defaults (AdamW, betas 0.9/0.95, weight decay 0.1, warmup then
    cosine decay) and the settings the LaVIT collators need (their columns are not model inputs)."""

    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps (a float < 1: fraction of training)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept on disk."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the columns the collators read."})

    # `--help` lists a stage's own options first, then these under their own heading
    _argument_group_name = "Trainer options (transformers.TrainingArguments)"

    def __post_init__(self):
        super().__post_init__()
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # pinned memory needs an accelerator (torch warns on every epoch)


@dataclass
class DataArguments:
    data: str = field(metadata={"help": "Image-text data: an imagefolder with metadata.jsonl, a JSON/JSONL/CSV/Parquet "
                                        "file, WebDataset .tar shards (a file or a folder), or a load_dataset name."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of downloading it first "
                                                             "(needs --max_steps)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (found automatically)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    resume: str = field(default="auto", metadata={"help": "'auto': continue from the latest complete checkpoint in "
                                                          "output_dir; 'no': start fresh; or a checkpoint path."})


@dataclass
class SequenceArguments(DataArguments):
    """Batch layout and attention kernel of the LM stages (stage 2 and fine-tuning)."""

    packed: bool = field(default=True, metadata={"help": "Packed rows (segments restart their positions) instead "
                                                         "of one padded row per segment."})
    packed_row_length: int | None = field(default=None, metadata={
        "help": "Packed mode: the most tokens per row; 0 puts all segments of a batch in one row. Default: one row "
                "for flex_attention/flash attention (they skip masked blocks), else --max_length (SDPA and eager "
                "compute every pair of a row)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the LM: 'sdpa' (default), 'flex_attention', 'flash_attention_2', 'eager'."})

    def set_attention(self, model):
        """Switches the LM to `attn_implementation` (the visual tokenizer keeps its own attention)."""
        if self.attn_implementation:
            model.get_decoder().set_attn_implementation(self.attn_implementation)

    def row_length(self, model) -> int | None:
        """The collator's `max_row_length` for this model's attention kernel."""
        if self.packed_row_length is not None:
            return self.packed_row_length or None
        kernel = getattr(model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
        skips_masked_blocks = kernel == "flex_attention" or kernel.startswith("flash_attention")
        return None if skips_masked_blocks else self.max_length


def enable_stack_dumps() -> None:
    """Makes a stuck or failing rank show where it is: the Python stacks of all threads are printed on a fatal error,
    on SIGTERM (what torchrun/accelerate send the other ranks when one fails or a collective times out after
    `--ddp_timeout`) and on SIGUSR1 (`kill -USR1 PID` on a live run), then SIGTERM ends the process as before."""
    stream = sys.__stderr__  # the process's own stderr: `sys.stderr` may be a capture without a file descriptor
    if stream is None or not hasattr(stream, "fileno"):
        return
    faulthandler.enable(stream)
    faulthandler.register(signal.SIGTERM, stream, all_threads=True, chain=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, stream, all_threads=True)


def parse_arguments(dataclass_types, argv=None):
    """Parses `argv` (default: the command line) into the given dataclasses; a single `.json`/`.yaml` argument is
    read as a config file. Launchers' `--local_rank=N` is accepted (TrainingArguments has it). Every stage's command
    line goes through here, so it also turns on [`enable_stack_dumps`]."""
    enable_stack_dumps()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(dataclass_types, usage="%(prog)s [OPTIONS] [TRAINER OPTIONS]  |  %(prog)s config.yaml")
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def limit_records(records, max_samples: int | None):
    """The first `max_samples` records (streaming too)."""
    if max_samples is None:
        return records
    if isinstance(records, datasets.Dataset):
        max_samples = min(max_samples, len(records))
    return records.take(max_samples)


CONFIG_PRESETS = Path(__file__).parent / "configs"


def config_preset_names(kind: str) -> list[str]:
    """Names of the packaged `configs/{kind}_{name}.json` presets."""
    return sorted(preset.stem.removeprefix(f"{kind}_") for preset in CONFIG_PRESETS.glob(f"{kind}_*.json"))


def load_config_preset(name_or_path: str, kind: str) -> dict:
    """Settings of a new model: a JSON file, or the name of a preset `configs/{kind}_{name}.json` ('tiny', 'small',
    'paper')."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_PRESETS / f"{kind}_{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"{kind}_config {name_or_path!r} is neither a file nor a preset "
                                f"{config_preset_names(kind)}")
    return json.loads(path.read_text())
