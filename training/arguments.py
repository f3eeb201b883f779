"""The arguments of every stage and the parser behind their command lines.

Every stage takes its own arguments dataclass (`TokenizerTrainingArguments`, `PretrainingArguments`,
`FinetuningArguments`, `DetokenizerTrainingArguments`, `PretokenizeArguments`) plus, when it trains, a
[`LaVITTrainingArguments`] (the usual `TrainingArguments`, with the defaults LaVIT training wants). A stage's
`make_parser` returns a [`LaVITArgumentParser`] of those dataclasses, which reads the command line or one JSON/YAML
file; `lavit <stage>` and `python -m lavit.training.<stage>` use that same parser.
"""

import argparse
import copy
import dataclasses
import faulthandler
import signal
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lavit.modeling.kernels_lavit import speed_defaults
from lavit.modeling.saving_lavit import loads_json
from lavit.modeling.validation_lavit import (
    EPSILON,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    SHARE_OR_COUNT,
    Choice,
    Range,
    check_arguments,
    floating_dtype,
)
from transformers import HfArgumentParser, TrainingArguments

from lavit.atomic import require_lavit_folder
from lavit.command_inputs import NOT_LAVIT, require_model_inputs
from lavit.file_kinds import require_safetensors_inputs
from lavit.flags import StrictFlags
from lavit.paths import ADAPTERS, CHECKPOINT, INPUT, MODEL_KINDS, OUTPUT, PATH_ROLE, PATH_TYPES, check_paths, path_field

from . import STAGES
from .checkpoints import resume_problem
from .config_files import config_arguments, is_config_file
from .presets import preset_field

# the pair orders of a stage-2 image-text sequence (`--order`; built by `training.sequences`)
SEQUENCE_ORDERS = ("random", "both", "image_to_text", "text_to_image")
# the weights the LM stages can train: float32 (AMP with --bf16) or pure bf16 (`SequenceArguments.dtype`)
WEIGHT_DTYPES = ("float32", "bfloat16")
# a field's declared range: `field(metadata={"range": Range(...)})`; the parser makes it the flag's `type=` and checks
# the parsed dataclasses with it (config files too)
RANGE = "range"
LEARNING_RATE = Range(0, 10)
STEPS = Range(1, 2**31 - 1, integer=True)
BATCH_SIZE = Range(1, 2**20, integer=True)
# the ranges of the Trainer's own numeric options (transformers.TrainingArguments), declared here as lavit passes them
TRAINER_RANGES = {
    "per_device_train_batch_size": BATCH_SIZE, "per_device_eval_batch_size": BATCH_SIZE,
    "num_train_epochs": Range(0, 1e6, low_open=True), "learning_rate": LEARNING_RATE,
    "max_steps": Range(1, 2**31 - 1, integer=True, also=(-1,), note="-1: train for --num_train_epochs"),
    "warmup_steps": Range(0, note="a number < 1: a fraction of training"), "weight_decay": NON_NEGATIVE_FLOAT,
    "adam_beta1": Range(0, 1, high_open=True), "adam_beta2": Range(0, 1, high_open=True), "adam_epsilon": EPSILON,
    "gradient_accumulation_steps": BATCH_SIZE, "max_grad_norm": NON_NEGATIVE_FLOAT,
    "label_smoothing_factor": Range(0, 1, high_open=True), "neftune_noise_alpha": POSITIVE_FLOAT,
    "torch_empty_cache_steps": STEPS, "logging_steps": POSITIVE_FLOAT, "eval_steps": POSITIVE_FLOAT,
    "eval_delay": NON_NEGATIVE_FLOAT, "eval_accumulation_steps": STEPS, "save_steps": POSITIVE_FLOAT,
    "save_total_limit": POSITIVE_INT, "seed": SEED, "data_seed": SEED,
    "dataloader_num_workers": Range(0, 1024, integer=True),
    "dataloader_prefetch_factor": Range(1, 1024, integer=True), "ddp_bucket_cap_mb": Range(1, 2**20, integer=True),
    "ddp_timeout": Range(1, 10**9, integer=True, note="seconds"), "local_rank": Range(-1, integer=True),
}


def declared_range(data_field: dataclasses.Field):
    """The `Range`/`Choice` of a stage argument: its field's `range` metadata, or the Trainer option's."""
    return data_field.metadata.get(RANGE, TRAINER_RANGES.get(data_field.name))


def check_argument_ranges(arguments) -> None:
    """Raises `ValueError` naming the first field of the dataclass `arguments` outside its declared range."""
    check_arguments({data_field.name: spec for data_field in dataclasses.fields(arguments)
                     if (spec := declared_range(data_field)) is not None}, vars(arguments))


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

    # declared again only to give it its role: the guard of `lavit.paths` checks it against the stage's inputs
    output_dir: str | None = path_field(OUTPUT, default=None, help=(
        "Folder of the run: checkpoints, logs.jsonl and the final model (`final/`)."))

    def __post_init__(self):
        check_argument_ranges(self)  # before transformers' own checks, which name fewer ranges
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):  # a file (else JSON text)
            self.deepspeed = str(Path(self.deepspeed).expanduser())  # one spelling for every reader
            read_deepspeed_config(self.deepspeed)
        super().__post_init__()
        # the run ends by replacing `output_dir/final`: a folder there that lavit did not make is refused now, not
        # after the training
        require_lavit_folder(Path(self.output_dir) / "final", "replace")
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # pinned memory needs an accelerator (torch warns on every epoch)


@dataclass
class DataArguments:
    data: str = path_field(INPUT, help="Image-text data: an imagefolder with metadata.jsonl, a JSON/JSONL/CSV/Parquet "
                                       "file, WebDataset .tar shards (a file or a folder), or a load_dataset name.")
    split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of downloading it first "
                                                             "(needs --max_steps)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (found automatically)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N records.",
                                                            RANGE: POSITIVE_INT})
    resume: str = path_field(CHECKPOINT, default="auto", help="'auto': continue from the latest complete checkpoint "
                                                              "in output_dir (made by this same run); 'no': start "
                                                              "fresh; 'weights_only': also a checkpoint without "
                                                              "optimizer state (save_only_model); or a checkpoint "
                                                              "path.")

    def __post_init__(self):
        check_argument_ranges(self)  # every stage's arguments, from flags, config files or Python
        problem = resume_problem(self.resume)
        if problem:
            raise ValueError(problem)
        if isinstance(self.resume, str) and Path(self.resume).expanduser().is_dir():  # one spelling for every reader
            self.resume = str(Path(self.resume).expanduser())


@dataclass
class EvalDataArguments(DataArguments):
    """Held-out data of a training stage (see `training.evaluation`); the Trainer's `--eval_strategy`,
    `--eval_steps`, `--per_device_eval_batch_size`, `--metric_for_best_model`, `--greater_is_better` and
    `--load_best_model_at_end` decide when it is evaluated and which checkpoint is kept."""

    eval_data: str | None = path_field(INPUT, default=None, help=(
        "Held-out data to evaluate on while training: any source --data takes."))
    eval_split: str | None = field(default=None, metadata={"help": "Split of --eval_data (default: --split)."})
    eval_split_size: float = field(default=0.0, metadata={
        "help": "Hold out this share of --data (a count when >= 1) for evaluation, drawn from --seed.",
        RANGE: SHARE_OR_COUNT})
    eval_max_samples: int | None = field(default=None, metadata={
        "help": "Fine-tuning: answers generated for at most N held-out records per evaluation.", RANGE: POSITIVE_INT})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without improving --metric_for_best_model (EarlyStoppingCallback).",
        RANGE: POSITIVE_INT})


@dataclass
class SequenceArguments(EvalDataArguments):
    """Batch layout, attention kernel and weight precision of the LM stages (stage 2 and fine-tuning)."""

    packed: bool = field(default=True, metadata={"help": "Packed rows (segments restart their positions) instead "
                                                         "of one padded row per segment."})
    packed_row_length: int | None = field(default=None, metadata={
        "help": "Packed mode: the most tokens per row; 0 puts all segments of a batch in one row. Default: one row "
                "for flex_attention/flash attention (they skip masked blocks), else --max_length (SDPA and eager "
                "compute every pair of a row).", RANGE: NON_NEGATIVE_INT})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the LM: 'sdpa', 'flex_attention', 'flash_attention_2', 'eager'. Default: "
                "flex_attention for packed rows on CUDA, else the model's own (sdpa)."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights of the trained model: 'float32' (with --bf16 the Trainer computes in bf16 over float32 "
                "weights, AMP) or 'bfloat16' (pure bf16 weights, gradients and AdamW states: about 10 instead of 16 "
                "bytes per parameter; AdamW then sums its updates with Kahan compensation, torch-optimi, so small "
                "updates are not rounded away).", RANGE: Choice(WEIGHT_DTYPES)})
    crop_scale: float = field(default=1.0, metadata={
        "help": "Random crops of each training image keep between this fraction and all of its area (1 disables "
                "crops; pre-tokenized images are never cropped); held-out images stay whole.", RANGE: OPEN_FRACTION})
    horizontal_flip: bool = field(default=False, metadata={
        "help": "Mirror each training image left-right half of the time (not pre-tokenized ones)."})

    def collator_augmentation(self) -> dict:
        """The training images' augmentation, as [`lm_collator`]'s keyword arguments."""
        return {"crop_scale": self.crop_scale, "horizontal_flip": self.horizontal_flip}

    def set_attention(self, model, device=None):
        """Switches the LM to `attn_implementation`, or for packed rows to the device's default (FlexAttention on
        CUDA, `lavit.modeling.kernels_lavit.speed_defaults`); the visual tokenizer keeps its own attention."""
        kernel = self.attn_implementation
        if kernel is None and self.packed:
            kernel = speed_defaults(device).packed_attn_implementation
            if kernel == "flex_attention" and not getattr(model.get_decoder(), "_supports_flex_attn", False):
                kernel = None  # a language model without FlexAttention keeps its own kernel
        if kernel:
            model.get_decoder().set_attn_implementation(kernel)

    def set_dtype(self, model):
        """The trained model's weights in `dtype` (pure bf16 training; see [`kahan_adamw`] for its optimizer), whatever
        dtype its folder was saved in: a bf16 folder trains in float32 under the default `--dtype float32`."""
        if getattr(self, "qlora", False):
            if self.dtype != "float32":
                raise ValueError("--dtype bfloat16 does not apply to --qlora (its LM is 4-bit and computes in bf16 "
                                 "already): drop --dtype")
            return  # the 4-bit weights stay as they are; the adapters are made in float32
        model.to(floating_dtype(self.dtype, "--dtype"))

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
    return loads_json(path.read_text())


@dataclass
class TokenizerTrainingArguments(EvalDataArguments):
    model: str | None = path_field(INPUT, ("lavit_tokenizer",), adapters=False, default=None,
                                   help="A LaVITTokenizerModel folder to continue training.")
    tokenizer_config: str | None = path_field(INPUT, default=None, help=(
        f"A new tokenizer: a config JSON file or a preset name: {config_preset_names('tokenizer')} ('tiny': "
                f"64 px, 8 px patches, 64 codes; 'small': the same with 256 codes, for small data; 'paper': the "
                f"released LaVIT sizes)."))
    vision_model: str | None = path_field(INPUT, (NOT_LAVIT,), adapters=False, default=None, help=(
        "A transformers vision model (folder or Hub id, e.g. a CLIP/SigLIP vision tower) to use as the "
        "frozen encoder of a new tokenizer."))
    quantizer_start_step: int = field(default=0, metadata={
        "help": "Steps trained without quantization before VQ (k-means init + EMA) is switched on.",
        RANGE: NON_NEGATIVE_INT})
    crop_scale: float = field(default=0.5, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops).",
        RANGE: OPEN_FRACTION})
    preset: str | None = preset_field("tokenizer")


@dataclass
class PretrainingArguments(SequenceArguments):
    model: str | None = path_field(INPUT, ("lavit",), adapters=False, default=None,
                                   help="A LaVIT model folder to continue training.")
    visual_tokenizer: str | None = path_field(INPUT, ("lavit_tokenizer", "lavit"), default=None, help=(
        "A stage-1 tokenizer folder, or a LaVIT model folder whose visual tokenizer is used (new model)."))
    language_model: str | None = path_field(INPUT, (NOT_LAVIT,), adapters=False, default=None,
                                            help="A causal LM folder or Hub id (new model).")
    text_tokenizer: str | None = path_field(INPUT, default=None, help="Text tokenizer (default: the LM's).")
    text_data: str | None = path_field(INPUT, default=None, help="Text-only corpus mixed into the pairs.")
    text_ratio: float = field(default=0.0, metadata={"help": "Fraction of text-only records in the mixture.",
                                                     RANGE: Range(0, 1, high_open=True)})
    max_length: int = field(default=2048, metadata={"help": "Tokens per packed row, visual tokens included.",
                                                    RANGE: POSITIVE_INT})
    order: str = field(default="random", metadata={"help": f"Pair order: one of {SEQUENCE_ORDERS}; 'random' draws "
                                                          f"each pair's order anew every epoch from --seed.",
                                                   RANGE: Choice(SEQUENCE_ORDERS)})
    image_to_text_ratio: float = field(default=0.5, metadata={"help": "P(image-to-text) with order=random.",
                                                              RANGE: PROBABILITY})
    image_token_estimate: int | None = field(default=None, metadata={
        "help": "Tokens counted per image whose count is unknown (not pre-tokenized) while packing; default: all "
                "patches (rows never exceed max_length).", RANGE: POSITIVE_INT})
    visual_learning_rate: float | None = field(default=1e-4, metadata={
        "help": "Learning rate of the visual modules and visual vocabulary rows (the LM uses --learning_rate).",
        RANGE: LEARNING_RATE})
    preset: str | None = preset_field("pretrain")


@dataclass
class FinetuningArguments(SequenceArguments):
    model: str = path_field(INPUT, ("lavit",), adapters=False, default=None,
                            help="The LaVIT model folder (or Hub id) to fine-tune.")
    task: str = field(default="caption", metadata={"help": "'caption' (image, text), 'vqa' (image, question, "
                                                           "answer) or 'chat' (messages, images).",
                                                   RANGE: Choice(("caption", "vqa", "chat"))})
    max_length: int = field(default=512, metadata={"help": "Text tokens per example (before visual tokens).",
                                                   RANGE: POSITIVE_INT})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit LM (bitsandbytes, CUDA only)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank.", RANGE: POSITIVE_INT})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator.", RANGE: POSITIVE_INT})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout.", RANGE: Range(0, 1, high_open=True)})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={
        "help": "Adapted modules: comma-separated names (of the language model only) or a regex over full names."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge the adapters into the final checkpoint."})
    visual_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the visual modules and rows in full fine-tuning (default: --learning_rate).",
        RANGE: LEARNING_RATE})
    preset: str | None = preset_field("finetune")


@dataclass
class DetokenizerTrainingArguments(EvalDataArguments):
    visual_tokenizer: str = path_field(INPUT, ("lavit_tokenizer", "lavit"), default=None, help=(
        "The frozen visual tokenizer: a LaVITTokenizerModel folder or a LaVIT model folder."))
    detokenizer: str | None = path_field(INPUT, default=None, help=(
        "The decoder to continue training: a LaVITPipeline folder (what this stage writes) or a LaVITDetokenizer "
        "folder (lavit <= 0.x)."))
    model: str | None = path_field(INPUT, ("lavit",), adapters=False, default=None, help=(
        "A LaVIT model folder (language model + processor) that becomes the language_model of the saved pipeline "
        "(default: --visual_tokenizer when it is a LaVIT model folder; without either, the pipeline holds the "
        "decoder alone)."))
    detokenizer_config: str | None = path_field(INPUT, default=None, help=(
        "A new detokenizer: a config JSON file or a preset name in training/configs ('tiny', 'paper')."))
    diffusers_model: str | None = path_field(INPUT, default=None, help=(
        "A diffusers folder whose unet/, vae/ and scheduler/ replace the new detokenizer's (e.g. SDXL)."))
    train_feature_decoder: bool = field(default=False, metadata={
        "help": "Also train the feature decoder (copied from the visual tokenizer; frozen by default)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay of the trained weights (0 turns EMA off).",
                                                       RANGE: Range(0, 1, high_open=True)})
    crop_scale: float = field(default=1.0, metadata={
        "help": "Random crops keep between this fraction and all of the image area (1 disables crops).",
        RANGE: OPEN_FRACTION})
    vae_steps: int = field(default=0, metadata={
        "help": "Fit the VAE to the images for N steps before the diffusion training: for small experiments "
                "without a pretrained VAE (a random VAE decodes any latent to noise).", RANGE: NON_NEGATIVE_INT})


@dataclass
class PretokenizeArguments(DataArguments):
    visual_tokenizer: str = path_field(INPUT, ("lavit_tokenizer", "lavit"), default=None, help=(
        "A tokenizer folder, or a LaVIT model folder (its visual_tokenizer is used)."))
    output: str = path_field(OUTPUT, default=None, help="Folder to write the pre-tokenized dataset to.")
    batch_size: int = field(default=64, metadata={"help": "Images per visual tokenizer batch.", RANGE: BATCH_SIZE})
    device: str | None = field(default=None, metadata={
        "help": "Device of the visual tokenizer (default: cuda if any)."})


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


class LaVITArgumentParser(StrictFlags, HfArgumentParser):
    """`HfArgumentParser` of a stage's dataclasses, with one more input form: a single `.json`/`.yaml` argument is
    read as a config file (keys: the flags' names). Flags take both spellings (`--max_steps`, `--max-steps`)."""

    def parse_args_and_config(self, args=None) -> tuple:
        """Parses `args` (default: the command line) into the dataclasses, in the order given to the parser.
        Launchers' `--local_rank=N` is accepted (TrainingArguments has it). Every stage's command line goes through
        here, so it also turns on [`enable_stack_dumps`].

        Raises:
            SystemExit: (argparse, status 2) an unknown flag, a bad value (also one a dataclass's own check refuses:
                TrainingArguments' `--fsdp off`, a `--resume` that means nothing) or a missing required flag (in a
                config file too: its keys are flags, and the message names the file).
            ConfigFileError: (a ValueError) a config file that cannot be read, or a list or mapping for a flag of one
                plain value.
        """
        enable_stack_dumps()
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        direct, self.config_file = {}, None
        if is_config_file(args):  # its flag tokens, read below as flags are (`training.config_files`)
            self.config_file = args[0]
            args, direct = config_arguments(self, args[0])
        # a flag no dataclass has is an argparse error, with the command's usage (as in every `lavit` command)
        namespace, unknown = self.parse_known_args(args)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        for name, value in direct.items():  # a config file's mapping or list that no flag token carries
            setattr(namespace, name, value)
        try:  # each dataclass from its fields, as parse_args_into_dataclasses
            parsed = self.parse_dict(vars(namespace))
        except ValueError as error:  # a dataclass's own check of its values (TrainingArguments' `--fsdp off`)
            self.error(" ".join(str(error).split()))
        given = self.given_flags(args) | frozenset(direct)
        for arguments in parsed:  # what the run set itself, whatever the value: a preset leaves it alone
            if not isinstance(arguments, TrainingArguments):
                arguments.given_flags = given
            elif arguments.resume_from_checkpoint is not None:  # the Trainer's flag, which the stages never read
                self.error(f"--resume_from_checkpoint {arguments.resume_from_checkpoint!r}: lavit's stages resume with "
                           f"--resume (auto: the newest complete checkpoint of --output_dir; no; weights_only; or a "
                           f"checkpoint folder): give --resume PATH")
        check_paths(*parsed)  # no output folder is, holds or lies inside an input (`lavit.paths`)
        require_safetensors_inputs(*parsed)  # no model folder with pickled weights is loaded (`lavit.file_kinds`)
        require_model_inputs(*parsed)  # every model folder of the kind its flag reads, before anything is built
        return parsed

    def given_flags(self, args: list[str]) -> frozenset[str]:
        """The fields the flag tokens `args` set (either spelling, `--no_X`), by field name."""
        given = set()
        for token in args:
            if not token.startswith("--"):
                continue
            flag = token.split("=", 1)[0]
            if flag in self._option_string_actions:  # whole names only (`StrictFlags`: no abbreviations)
                given.add(self._option_string_actions[flag].dest)
        return frozenset(given)

    def error(self, message):
        """argparse's error (usage, status 2), naming the config file the arguments came from."""
        super().error(f"{self.config_file}: {message}" if getattr(self, "config_file", None) else message)

    @staticmethod
    def _parse_dataclass_field(parser, data_field: dataclasses.Field):
        """HfArgumentParser's flag for `data_field`, with the field's declaration as the flag's `type=`: a path role
        (`lavit.paths.path_field`) becomes the role's type (`InputPath`, ...), so `lavit.paths.path_role` reads every
        parser's arguments alike; a declared range (`validation_lavit.Range`) checks the value."""
        role = data_field.metadata.get(PATH_ROLE)
        spec = declared_range(data_field)
        HfArgumentParser._parse_dataclass_field(parser, _without_declarations(data_field))
        if role is not None:
            parser._option_string_actions[f"--{data_field.name}"].type = PATH_TYPES[role]
        elif spec is not None:
            parser._option_string_actions[f"--{data_field.name}"].type = spec


def _without_declarations(data_field: dataclasses.Field) -> dataclasses.Field:
    """A copy of `data_field` whose metadata lacks lavit's declarations (path role, model kinds, range):
    HfArgumentParser passes the metadata on to `add_argument`, which knows none of them."""
    declarations = (PATH_ROLE, MODEL_KINDS, ADAPTERS, RANGE)
    if not any(key in data_field.metadata for key in declarations):
        return data_field
    copied = copy.copy(data_field)
    copied.metadata = types.MappingProxyType({key: value for key, value in data_field.metadata.items()
                                              if key not in declarations})
    return copied


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed config file `--deepspeed` names, checked where transformers' own errors name neither the flag nor
    the file (an empty file: "Expecting value: line 1 column 1"; a list: an AttributeError)."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--deepspeed {path} is a folder: give a DeepSpeed config file (JSON)")
    if not file.is_file():
        raise ValueError(f"--deepspeed {path}: no such file: give a DeepSpeed config file (JSON)")
    try:
        config = loads_json(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--deepspeed {path} is not a JSON file: {error}") from None
    if not isinstance(config, dict) or not config:
        raise ValueError(f"--deepspeed {path} holds {type(config).__name__} {str(config)[:40]!r}, not a DeepSpeed "
                         f"config (a JSON object of its settings)")
    return config


# each stage's argument dataclasses: with `lavit.training.STAGES`, the one table behind the stage scripts'
# `make_parser` and `lavit COMMAND --help`, which so imports no stage script (nor peft, datasets or the models)
STAGE_DATACLASSES = {
    "train-tokenizer": (TokenizerTrainingArguments, LaVITTrainingArguments),
    "pretokenize": (PretokenizeArguments,),
    "train": (PretrainingArguments, LaVITTrainingArguments),
    "finetune": (FinetuningArguments, LaVITTrainingArguments),
    "train-detokenizer": (DetokenizerTrainingArguments, LaVITTrainingArguments),
}
# command -> (its argument dataclasses, its line in the command listing: `lavit.training.STAGES`, the one owner)
STAGE_ARGUMENTS = {command: (STAGE_DATACLASSES[command], summary) for command, (_, summary) in STAGES.items()}


def stage_parser(command: str, subparsers: argparse._SubParsersAction | None = None) -> LaVITArgumentParser:
    """The parser of the stage `command`, from [`STAGE_ARGUMENTS`] (see [`make_stage_parser`])."""
    dataclass_types, help = STAGE_ARGUMENTS[command]
    return make_stage_parser(dataclass_types, subparsers, command, help)


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
