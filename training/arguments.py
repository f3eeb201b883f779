"""The arguments of every stage and the parser behind their command lines.

Every stage takes its own arguments dataclass (`TokenizerTrainingArguments`, `PretrainingArguments`,
`FinetuningArguments`, `DetokenizerTrainingArguments`, `PreprocessArguments`) plus, when it trains, a
[`LaVITTrainingArguments`] (the usual `TrainingArguments`, with the defaults LaVIT training wants). A stage's
`make_parser` returns a [`LaVITArgumentParser`] of those dataclasses, which reads the command line or one JSON/YAML
file; `lavit <stage>` and `python -m lavit.training.<stage>` use that same parser.
"""

import argparse
import faulthandler
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .presets import preset_field
from .sequences import SEQUENCE_ORDERS


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
class EvalDataArguments(DataArguments):
    """Held-out data of a training stage (see `training.evaluation`); the Trainer's `--eval_strategy`,
    `--eval_steps`, `--per_device_eval_batch_size`, `--metric_for_best_model`, `--greater_is_better` and
    `--load_best_model_at_end` decide when it is evaluated and which checkpoint is kept."""

    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out data to evaluate on while training: any source --data takes."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of --eval_data (default: --split)."})
    eval_split_size: float = field(default=0.0, metadata={
        "help": "Hold out this share of --data (a count when >= 1) for evaluation, drawn from --seed."})
    eval_max_samples: int | None = field(default=None, metadata={
        "help": "Fine-tuning: answers generated for at most N held-out records per evaluation."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without improving --metric_for_best_model (EarlyStoppingCallback)."})


@dataclass
class SequenceArguments(EvalDataArguments):
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


# ------------------------------------------------------------------------------------------------ stages

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


@dataclass
class TokenizerTrainingArguments(EvalDataArguments):
    model: str | None = field(default=None, metadata={"help": "A LaVITTokenizerModel folder to continue training."})
    tokenizer_config: str | None = field(default=None, metadata={
        "help": f"A new tokenizer: a config JSON file or a preset name: {config_preset_names('tokenizer')} ('tiny': "
                f"64 px, 8 px patches, 64 codes; 'small': the same with 256 codes, for small data; 'paper': the "
                f"released LaVIT sizes)."})
    vision_model: str | None = field(default=None, metadata={
        "help": "A transformers vision model (folder or Hub id, e.g. a CLIP/SigLIP vision tower) to use as the "
                "frozen encoder of a new tokenizer."})
    quantizer_start_step: int = field(default=0, metadata={
        "help": "Steps trained without quantization before VQ (k-means init + EMA) is switched on."})
    crop_scale: float = field(default=0.5, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops)."})
    preset: str | None = preset_field("tokenizer")


@dataclass
class PretrainingArguments(SequenceArguments):
    model: str | None = field(default=None, metadata={"help": "A LaVIT model folder to continue training."})
    visual_tokenizer: str | None = field(default=None, metadata={"help": "A stage-1 tokenizer folder (new model)."})
    language_model: str | None = field(default=None, metadata={"help": "A causal LM folder or Hub id (new model)."})
    text_tokenizer: str | None = field(default=None, metadata={"help": "Text tokenizer (default: the LM's)."})
    text_data: str | None = field(default=None, metadata={"help": "Text-only corpus mixed into the pairs."})
    text_ratio: float = field(default=0.0, metadata={"help": "Fraction of text-only records in the mixture."})
    max_length: int = field(default=2048, metadata={"help": "Tokens per packed row, visual tokens included."})
    order: str = field(default="random", metadata={"help": f"Pair order: one of {SEQUENCE_ORDERS}; 'random' draws "
                                                          f"each pair's order anew every epoch from --seed."})
    image_to_text_ratio: float = field(default=0.5, metadata={"help": "P(image-to-text) with order=random."})
    image_token_estimate: int | None = field(default=None, metadata={
        "help": "Tokens counted per image whose count is unknown (not pre-tokenized) while packing; default: all "
                "patches (rows never exceed max_length)."})
    visual_learning_rate: float | None = field(default=1e-4, metadata={
        "help": "Learning rate of the visual modules and visual vocabulary rows (the LM uses --learning_rate)."})
    preset: str | None = preset_field("pretrain")


@dataclass
class FinetuningArguments(SequenceArguments):
    model: str = field(default=None, metadata={"help": "The LaVIT model folder (or Hub id) to fine-tune."})
    task: str = field(default="caption", metadata={"help": "'caption' (image, text), 'vqa' (image, question, "
                                                           "answer) or 'chat' (messages, images)."})
    max_length: int = field(default=512, metadata={"help": "Text tokens per example (before visual tokens)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit LM (bitsandbytes, CUDA only)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={
        "help": "Adapted modules: comma-separated names (of the language model only) or a regex over full names."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge the adapters into the final checkpoint."})
    visual_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the visual modules and rows in full fine-tuning (default: --learning_rate)."})
    preset: str | None = preset_field("finetune")


@dataclass
class DetokenizerTrainingArguments(EvalDataArguments):
    visual_tokenizer: str = field(default=None, metadata={
        "help": "The frozen visual tokenizer: a LaVITTokenizerModel folder or a LaVIT model folder."})
    detokenizer: str | None = field(default=None, metadata={"help": "A LaVITDetokenizer folder to continue training."})
    detokenizer_config: str | None = field(default=None, metadata={
        "help": "A new detokenizer: a config JSON file or a preset name in training/configs ('tiny', 'paper')."})
    diffusers_model: str | None = field(default=None, metadata={
        "help": "A diffusers folder whose unet/, vae/ and scheduler/ replace the new detokenizer's (e.g. SDXL)."})
    train_feature_decoder: bool = field(default=False, metadata={
        "help": "Also train the feature decoder (copied from the tokenizer; frozen by default)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay of the trained weights (0 turns EMA off)."})
    crop_scale: float = field(default=1.0, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops)."})
    vae_steps: int = field(default=0, metadata={
        "help": "Fit the VAE to the images for N steps before the diffusion training: for small experiments "
                "without a pretrained VAE (a random VAE decodes any latent to noise)."})


@dataclass
class PreprocessArguments(DataArguments):
    visual_tokenizer: str = field(default=None, metadata={
        "help": "A tokenizer folder, or a LaVIT model folder (its visual_tokenizer is used)."})
    output: str = field(default=None, metadata={"help": "Folder to write the pre-tokenized dataset to."})
    batch_size: int = field(default=64, metadata={"help": "Images per tokenizer batch."})
    device: str | None = field(default=None, metadata={"help": "Device of the tokenizer (default: cuda if any)."})


# ------------------------------------------------------------------------------------------------ parsing


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


class LaVITArgumentParser(HfArgumentParser):
    """`HfArgumentParser` of a stage's dataclasses, with one more input form: a single `.json`/`.yaml` argument is
    read as a config file (keys: the flags' names). Flags take both spellings (`--max_steps`, `--max-steps`)."""

    def parse_args_and_config(self, args=None) -> tuple:
        """Parses `args` (default: the command line) into the dataclasses, in the order given to the parser.
        Launchers' `--local_rank=N` is accepted (TrainingArguments has it). Every stage's command line goes through
        here, so it also turns on [`enable_stack_dumps`].

        Raises:
            SystemExit: (argparse, status 2) an unknown flag, a bad value or a missing required flag.
            ValueError: a config file key that no dataclass has.
        """
        enable_stack_dumps()
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        if len(args) == 1 and args[0].endswith(".json"):
            return self.parse_json_file(args[0])
        if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
            return self.parse_yaml_file(args[0])
        return self.parse_args_into_dataclasses(args)


def make_stage_parser(dataclass_types: tuple, subparsers: argparse._SubParsersAction | None, command: str,
                      help: str) -> LaVITArgumentParser:
    """A stage's parser: a sub-command `command` of `subparsers` (made with `parser_class=LaVITArgumentParser`, as in
    the `lavit` command line), or a parser of its own. A short usage line: `--help` then lists the stage's own options
    first and the `TrainingArguments` under their own heading."""
    trainer_options = " [TRAINER OPTIONS]" if LaVITTrainingArguments in dataclass_types else ""
    usage = f"%(prog)s [OPTIONS]{trainer_options}  |  %(prog)s config.yaml"
    settings = {"dataclass_types": dataclass_types, "usage": usage}
    if subparsers is None:
        return LaVITArgumentParser(**settings)
    return subparsers.add_parser(command, help=f"{help} (--help lists its flags)", **settings)
