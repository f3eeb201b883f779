"""Offline pre-tokenization: stores every image's keep mask and code ids next to the record.

Stage 2 then builds expanded sequences (`[IMG]` + the stored visual ids + `[/IMG]`) with exact lengths, packs rows
without guessing image sizes, counts targets exactly for gradient accumulation and skips the frozen visual tokenizer's
selector and quantizer (the LM-side merger still reads the encoder features). Runs batched through `datasets.map`,
on a GPU when there is one; unusable images are dropped and counted. The output is written with `save_to_disk` to a
temporary folder and swapped into place (`lavit.atomic.replace_folder`).

    lavit pretokenize --data pairs.jsonl --visual_tokenizer runs/tokenizer/final --output data/pairs_tokenized
    python -m lavit.training.pretokenize pretokenize.yaml          # the same flags as keys of a YAML/JSON file

One process on one device: no launcher (accelerate, torchrun, deepspeed) is needed.
"""

from pathlib import Path

import torch
from lavit.processing import LaVITImageProcessor

from lavit.atomic import fresh_staging_folder, replace_folder, require_replaceable
from lavit.command_inputs import load_visual_tokenizer_of
from lavit.paths import check_paths

from .arguments import PretokenizeArguments, stage_parser
from .data import BadRecordCounter, limit_records, load_records, pretokenize_images, transforms_in_temporary_files


@transforms_in_temporary_files()
def pretokenize(script_args: PretokenizeArguments) -> Path:
    """Pre-tokenizes `--data` with the frozen visual tokenizer and returns the output folder (`--output`)."""
    if not script_args.visual_tokenizer or not script_args.output:
        raise ValueError("give --visual_tokenizer and --output")
    check_paths(script_args)  # the output is not, does not hold and does not lie inside the data or the tokenizer
    require_replaceable(script_args.output)  # refused now, not after the whole dataset is tokenized

    # 1. The frozen visual tokenizer (alone, or the one inside a LaVIT folder), on a GPU when there is one.
    #    Pre-tokenizing is inference: no gradients, no Trainer, the whole batch on one device.
    device = script_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    visual_tokenizer = load_visual_tokenizer_of(script_args.visual_tokenizer, "--visual_tokenizer").to(device).eval()
    image_processor = LaVITImageProcessor.from_tokenizer_config(visual_tokenizer.config)

    # 2. Keep masks and code ids of every readable image, in batches; unreadable images are dropped and counted.
    #    Never streamed: the output is a whole dataset written with `save_to_disk`.
    counter = BadRecordCounter()
    records = load_records(script_args.data, script_args.split, False, script_args.image_column,
                           script_args.text_column, require_text=False, counter=counter)
    records = limit_records(records, script_args.max_samples)
    tokenized = pretokenize_images(records, visual_tokenizer, image_processor, script_args.batch_size, counter)
    # skips are counted from the data, not the map's calls: a cached or multi-process map leaves them uncounted;
    # nothing is written when too few records are usable
    counter.set_count("unreadable image", len(records) - len(tokenized))
    counter.used = len(tokenized)
    counter.check("pretokenize")

    # 3. Written beside the output and swapped in: a killed run never leaves half a dataset under `--output`.
    output = Path(script_args.output)
    staging = fresh_staging_folder(output)
    tokenized.save_to_disk(str(staging))
    replace_folder(staging, output)

    # 4. The summary.
    counts = [len(ids) for ids in tokenized["code_ids"]]
    skipped = counter.total
    print(f"{len(counts)} records tokenized, {skipped} skipped; tokens per image: mean "
          f"{sum(counts) / max(len(counts), 1):.1f}, min {min(counts, default=0)}, max {max(counts, default=0)}")
    return output


def main(script_args: PretokenizeArguments):
    # the folder to give stage 2 as --data
    print(f"pre-tokenized dataset saved to {pretokenize(script_args)}")


def make_parser(subparsers=None):
    # the same parser for `lavit pretokenize` (a sub-command of `subparsers`) and for this script run alone
    return stage_parser("pretokenize", subparsers)


def cli(args=None):
    """`lavit-pretokenize ARGS` and `python -m lavit.training.pretokenize ARGS`."""
    main(*make_parser().parse_args_and_config(args))


# `python -m ...` and console scripts; launchers (torchrun, accelerate, deepspeed) run this module on every rank
if __name__ == "__main__":
    cli()
