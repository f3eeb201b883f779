"""Offline pre-tokenization: stores every image's keep mask and code ids next to the record.

Stage 2 then builds expanded sequences (`[IMG]` + the stored visual ids + `[/IMG]`) with exact lengths, packs rows
without guessing image sizes, counts targets exactly for gradient accumulation and skips the frozen tokenizer's
selector and quantizer (the LM-side merger still reads the encoder features). Runs batched through `datasets.map`,
on a GPU when there is one; unusable images are dropped and counted. The output is written with `save_to_disk` to a
temporary folder and swapped into place (`lavit.atomic.replace_folder`).

    lavit-preprocess --data pairs.jsonl --visual_tokenizer runs/tokenizer/final --output data/pairs_tokenized
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from lavit.modeling import LaVITConfig, LaVITForCausalLM, LaVITTokenizerModel
from lavit.processing import LaVITImageProcessor
from transformers import PretrainedConfig

from lavit.atomic import fresh_staging_folder, replace_folder

from .arguments import DataArguments, limit_records, parse_arguments
from .data import BadRecordCounter, load_records, preprocess_images


@dataclass
class PreprocessArguments(DataArguments):
    visual_tokenizer: str = field(default=None, metadata={
        "help": "A tokenizer folder, or a LaVIT model folder (its visual_tokenizer is used)."})
    output: str = field(default=None, metadata={"help": "Folder to write the pre-tokenized dataset to."})
    batch_size: int = field(default=64, metadata={"help": "Images per tokenizer batch."})
    device: str | None = field(default=None, metadata={"help": "Device of the tokenizer (default: cuda if any)."})


def load_visual_tokenizer(path: str) -> LaVITTokenizerModel:
    """A tokenizer folder, or the frozen tokenizer inside a LaVIT model folder."""
    model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
    if model_type == LaVITConfig.model_type:
        return LaVITForCausalLM.from_pretrained(path, load_detokenizer=False).model.visual_tokenizer
    return LaVITTokenizerModel.from_pretrained(path)


def preprocess(script_args: PreprocessArguments) -> Path:
    if not script_args.visual_tokenizer or not script_args.output:
        raise ValueError("give --visual_tokenizer and --output")
    device = script_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_visual_tokenizer(script_args.visual_tokenizer).to(device).eval()
    image_processor = LaVITImageProcessor.from_tokenizer_config(tokenizer.config)
    counter = BadRecordCounter()
    records = load_records(script_args.data, script_args.split, False, script_args.image_column,
                           script_args.text_column, require_text=False, counter=counter)
    records = limit_records(records, script_args.max_samples)
    tokenized = preprocess_images(records, tokenizer, image_processor, script_args.batch_size, counter)
    output = Path(script_args.output)
    staging = fresh_staging_folder(output)
    tokenized.save_to_disk(str(staging))
    replace_folder(staging, output)
    counts = [len(ids) for ids in tokenized["code_ids"]]
    # counted from the data, not the counter: a cached or multi-process map leaves the counter empty
    skipped = len(records) - len(tokenized) + counter.counts["unreadable metadata"]
    print(f"{len(counts)} records tokenized, {skipped} skipped; tokens per image: mean "
          f"{sum(counts) / max(len(counts), 1):.1f}, min {min(counts, default=0)}, max {max(counts, default=0)}")
    return output


def main(argv=None):
    (script_args,) = parse_arguments((PreprocessArguments,), argv)
    print(f"pre-tokenized dataset saved to {preprocess(script_args)}")


if __name__ == "__main__":
    main()
