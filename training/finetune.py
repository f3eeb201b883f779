"""Fine-tuning a LaVIT model: full or LoRA/QLoRA (PEFT) on captioning, VQA or chat-formatted instruction data.

The loss covers the answers only (captions, VQA answers, assistant turns). With LoRA the adapters train on the LM's
projections; `--merge_lora` (default) merges them with `merge_and_unload`, so the final folder is a plain LaVIT
checkpoint that loads without PEFT.

    lavit-finetune --model runs/stage2/final --data vqa.jsonl --task vqa --lora --output_dir runs/vqa
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lavit.modeling import LaVITForCausalLM
from lavit.processing import LaVITProcessor
from transformers import set_seed
from transformers.trainer_utils import has_length

from .arguments import LaVITTrainingArguments, SequenceArguments, limit_records, parse_arguments
from .data import BadRecordCounter, InstructionBuilder, count_stored_skips, load_records
from .lora import language_model_targets
from .presets import ShortRunWarningCallback, apply_preset, apply_preset_steps, preset_field, report_preset
from .stage2_pretrain import data_collator
from .trainer import train_and_save, whole_weights

# kept in full precision under QLoRA: the frozen tokenizer's quantizer must see exact features
QLORA_SKIPPED_MODULES = ["visual_tokenizer", "visual_merger", "visual_projection", "lm_head"]


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


def load_model_for_finetuning(script_args: FinetuningArguments, training_args) -> LaVITForCausalLM:
    if not script_args.model:
        raise ValueError("give --model, the LaVIT folder to fine-tune")
    if script_args.task not in ("caption", "vqa", "chat"):
        raise ValueError(f"--task must be 'caption', 'vqa' or 'chat', got {script_args.task!r}")
    if not script_args.qlora:
        model = LaVITForCausalLM.from_pretrained(script_args.model)
    else:
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("--qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes)")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=QLORA_SKIPPED_MODULES,
        )
        model = LaVITForCausalLM.from_pretrained(script_args.model, quantization_config=quantization)
        model = prepare_model_for_kbit_training(model, training_args.gradient_checkpointing)
    if script_args.lora or script_args.qlora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
            target_modules=language_model_targets(script_args.lora_target_modules), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    return model


def finetune(script_args: FinetuningArguments, training_args: LaVITTrainingArguments) -> Path:
    """Runs fine-tuning and returns the final folder (merged when LoRA was used with `merge_lora`)."""
    set_seed(training_args.seed)
    preset, applied = apply_preset("finetune", script_args.preset, script_args, training_args)
    with whole_weights(training_args):
        model = load_model_for_finetuning(script_args, training_args)
    script_args.set_attention(model)
    processor = LaVITProcessor.from_pretrained(script_args.model)
    counter = BadRecordCounter()
    records = load_records(script_args.data, script_args.split, script_args.streaming,
                           script_args.image_column, script_args.text_column, require_text=False, counter=counter)
    builder = InstructionBuilder(processor, script_args.task, script_args.max_length)
    dataset = builder.build(limit_records(records, script_args.max_samples))
    num_examples = len(dataset) if has_length(dataset) else None
    applied.update(apply_preset_steps(preset, training_args, num_examples))
    report_preset(preset, applied, num_examples, training_args)
    collator = data_collator(processor, model.config, script_args.packed, script_args.row_length(model))
    count_stored_skips(dataset, counter, collator)
    adapters = script_args.lora or script_args.qlora
    # a 4-bit base cannot take merged adapters: QLoRA runs save the adapters next to the base model's name
    merge = adapters and script_args.merge_lora and not script_args.qlora
    warning = ShortRunWarningCallback(num_examples, preset=script_args.preset)
    return train_and_save(model, processor, training_args, dataset, collator, counter, script_args.resume,
                          None if adapters else script_args.visual_learning_rate, callbacks=[warning],
                          merge_adapters=merge)

def main(argv=None):
    script_args, training_args = parse_arguments((FinetuningArguments, LaVITTrainingArguments), argv)
    print(f"fine-tuned model saved to {finetune(script_args, training_args)}")


if __name__ == "__main__":
    main()
