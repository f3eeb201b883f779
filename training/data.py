"""Training data on `datasets`: sources, bad-record skipping, image decoding, pre-tokenization and image datasets.

Every loader returns a `datasets.Dataset` (or `IterableDataset` when streaming) with an undecoded `image` column
(a path, raw bytes or `{"bytes", "path"}`) and a `text` column. Images are decoded only where they are used (the
collator, [`image_dataset`] or [`pretokenize_images`]), so a corrupt, missing or truncated file costs one skipped
record, never the run. LaVIT sequences built from these records live in `training.sequences`.
"""

import contextlib
import csv
import difflib
import io
import itertools
import json
import logging
import os
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np
import torch
from datasets import Image as ImageFeature
from datasets import Value, interleave_datasets, load_dataset
from lavit.modeling.saving_lavit import loads_json
from lavit.processing.image_processing_lavit import to_rgb_image

from lavit.atomic import write_json_recorded

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}


# the largest share of a run's records that may be skipped: beyond it (or with no usable record) a run stops with the
# counts instead of training on what is left
MAX_SKIPPED_SHARE = 0.5


class BadRecordError(ValueError):
    """A record that cannot be used (unreadable image, empty text); callers skip it and count it."""


class TooManyBadRecordsError(ValueError):
    """A run (or a table) with no usable record, or more skipped records than `MAX_SKIPPED_SHARE` of those seen."""


@dataclass
class BadRecordCounter:
    """
    Record counts: records skipped (by reason, the first few of each logged) and records used, and the one place that
    enforces `max_skipped_share` ([`BadRecordCounter.check`]). Every stage makes one for its run: `load_records`
    checks each table it reads line by line and adds its skips; the trainer logs the total and, before `final/` is
    saved, checks what its batches met (`LaVITTrainer.check_records`); `pretokenize` checks before writing.
    """

    log_first: int = 3
    max_skipped_share: float = MAX_SKIPPED_SHARE
    counts: Counter = field(default_factory=Counter)
    used: int = 0
    examples: dict = field(default_factory=dict)

    def skip(self, reason: str, detail: str):
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail)
        if self.counts[reason] <= self.log_first:
            logger.warning(f"skipping a bad record ({reason}): {detail}")

    def add(self, reason: str, count: int):
        """Adds `count` skips of `reason` counted elsewhere (rows a built dataset dropped), without logging."""
        self.counts[reason] += count

    def set_count(self, reason: str, count: int):
        """Sets the skips of `reason` to a count made elsewhere (e.g. the training batches' so far, all processes),
        without logging."""
        self.counts[reason] = count

    def merge(self, other: "BadRecordCounter"):
        """Adds the skips of `other` (e.g. one table's), keeping the first example of each reason."""
        self.counts.update(other.counts)
        for reason, detail in other.examples.items():
            self.examples.setdefault(reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, what: str):
        """Raises [`TooManyBadRecordsError`] naming the counts when no record was used, or when the skipped records
        are more than `max_skipped_share` of those seen (used + skipped)."""
        seen = self.used + self.total
        if self.used > 0 and self.total <= self.max_skipped_share * seen:
            return
        reasons = "; ".join(f"{count} {reason}" + (f" (e.g. {self.examples[reason]})" if reason in self.examples
                                                    else "") for reason, count in self.counts.most_common())
        problem = "no usable record" if self.used == 0 else \
            f"more than {self.max_skipped_share:.0%} of the records are unusable"
        raise TooManyBadRecordsError(f"{what}: {problem}: {self.used} used, {self.total} skipped of {seen}"
                                     f"{': ' + reasons if reasons else ''}. Nothing was saved: fix the data")


# the fields that carry record counts from where records are read to the trainer: a batch (collators), a stage-1
# item (`image_dataset`) and a built row (`training.sequences.with_skip_counts`) carry `skipped_records`; a batch
# also carries `used_records`. They are not model inputs: `BatchRecordCounts.take` removes them.
SKIPPED_FIELD, USED_FIELD = "skipped_records", "used_records"
BATCH_REASON = "met in training batches"


def record_fields(skipped: int, used: int) -> dict:
    """The record counts a collator adds to its batch (0-d tensors, so they travel with it through dataloader
    workers): `skipped` bad records met while the batch was read, `used` records in it."""
    return {SKIPPED_FIELD: torch.tensor(skipped), USED_FIELD: torch.tensor(used)}


def stored_skips(item: dict) -> int:
    """The bad records an item or a built row carries (`skipped_records`; 0 when it carries none)."""
    return int(item.get(SKIPPED_FIELD) or 0)


@dataclass
class BatchRecordCounts:
    """
    The bad and used records of one process's batches, taken out of every batch before the model sees it
    ([`BatchRecordCounts.take`]), summed over processes ([`BatchRecordCounts.totals`]), kept in checkpoints
    (`FILE`) and checked with the run's share ([`BatchRecordCounts.check`]). The trainer owns one for training and
    one per evaluation.
    """

    skipped: int = 0
    used: int = 0
    FILE: ClassVar[str] = "skipped_records.json"

    def take(self, batch) -> None:
        """Removes the record fields from `batch` (when it is a dict) and adds them here."""
        if isinstance(batch, dict):
            self.skipped += int(batch.pop(SKIPPED_FIELD).sum()) if SKIPPED_FIELD in batch else 0
            self.used += int(batch.pop(USED_FIELD).sum()) if USED_FIELD in batch else 0

    def totals(self, accelerator) -> tuple[int, int]:
        """(bad, used) records of all processes' batches (a collective call: every process must make it)."""
        counts = torch.tensor([self.skipped, self.used], device=accelerator.device)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        return int(counts[0]), int(counts[1])

    @classmethod
    def load(cls, checkpoint) -> "BatchRecordCounts":
        """The counts a checkpoint folder kept (none: zeros): the batches a resumed run skips over were counted by
        the run that wrote it."""
        path = Path(checkpoint) / cls.FILE
        if not path.is_file():
            return cls()
        counts = loads_json(path.read_text())
        return cls(counts[SKIPPED_FIELD], counts.get(USED_FIELD, 0))

    @classmethod
    def save(cls, checkpoint, totals: tuple[int, int]) -> None:
        """Writes `totals` (from [`BatchRecordCounts.totals`]) into a checkpoint folder, atomically."""
        write_json_recorded(Path(checkpoint) / cls.FILE, {SKIPPED_FIELD: totals[0], USED_FIELD: totals[1]})

    @staticmethod
    def check(totals: tuple[int, int], max_skipped_share: float, what: str) -> None:
        """[`BadRecordCounter.check`] of the batches' `totals`: no usable record, or too large a share skipped."""
        BadRecordCounter(max_skipped_share=max_skipped_share, used=totals[1],
                         counts=Counter({BATCH_REASON: totals[0]})).check(what)


# ---------------------------------------------------------------------------------------------------------- sources


def load_records(
    source: str,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    require_text: bool = True,
    counter: BadRecordCounter | None = None,
    **load_kwargs,
) -> datasets.Dataset | datasets.IterableDataset:
    """
    Image-text records from any source, as columns `image` (undecoded) and `text`.

    `source` is a local `imagefolder` (images + `metadata.jsonl` with `file_name` and `text`), a JSON/JSONL/CSV/Parquet
    file whose image column holds paths (relative to the file) or bytes, a `.tar` WebDataset shard or a folder of
    them, a folder written by `save_to_disk` (e.g. `lavit pretokenize`), or anything `datasets.load_dataset` accepts (a
    Hub name). The kind of a local source is [`source_kind`], its loader `SOURCE_LOADERS[kind]`. A local path means the
    same relative (to the working directory), absolute, with `..` or through a symlink: it is resolved once, here; a
    value that looks like a local path but does not exist is reported as such (never tried on the Hub). Column names
    are found automatically (`image`/`jpg`/`png`..., `text`/`caption`/`txt`) or given explicitly. `require_text=False`
    accepts image-only data (stage 1), e.g. a plain folder of images.

    A JSON Lines/CSV table (or an imagefolder's `metadata.jsonl`/`metadata.csv`) is checked line by line first: a
    line that is not UTF-8 or not a JSON object, or an imagefolder `file_name` that leaves the folder, is skipped and
    counted in `counter` instead of failing the whole load; a table with nothing usable, or more bad lines than
    `MAX_SKIPPED_SHARE`, raises [`TooManyBadRecordsError`].
    """
    path = local_source(source)
    if path is None:  # a `datasets` Hub name
        records = load_dataset(source, split=split, streaming=streaming, **load_kwargs)
        return _standardize_columns(records, source, image_column, text_column, require_text, base_dir=Path.cwd())
    counter = counter if counter is not None else BadRecordCounter()
    usable = _usable_table_records(path, counter)
    if usable is not None:
        records = datasets.Dataset.from_list(usable)
        records = records.to_iterable_dataset() if streaming else records
    else:
        records = SOURCE_LOADERS[source_kind(path)](path, split=split, streaming=streaming, **load_kwargs)
        if source_kind(path) == "saved":
            return records
    base_dir = path if path.is_dir() else path.parent
    return _standardize_columns(records, source, image_column, text_column, require_text, base_dir=base_dir)


def local_source(source: str) -> Path | None:
    """The resolved local path of a data source (absolute, `..` and symlinks resolved), or `None` for a `datasets`
    Hub name. A value that looks like a path (it starts with `.`, `/` or `~`, names a data file, or its parent
    folder exists here) but does not exist raises `FileNotFoundError` at once, naming the closest existing name."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    looks_local = source.startswith((".", "/", "~", "\\")) or path.suffix in TABLE_BUILDERS \
        or source.count("/") > 1 or (len(path.parts) > 1 and path.parent.is_dir())
    if not looks_local:
        return None
    parent = next((folder for folder in path.parents if folder.is_dir()), Path("."))
    close = difflib.get_close_matches(path.name, [child.name for child in parent.iterdir()], n=1) \
        if parent == path.parent else []
    hint = f"; did you mean {str(path.parent / close[0])!r}?" if close else f" ({parent.resolve()} exists)"
    raise FileNotFoundError(f"data path {source!r} does not exist{hint}")


def source_kind(path: Path) -> str:
    """The kind of a local data source (a key of `SOURCE_LOADERS`): `saved` (a `save_to_disk` folder),
    `webdataset` (a folder of `.tar` shards), `imagefolder` (any other folder), or a data file's suffix."""
    if path.is_dir():
        if (path / "state.json").exists():
            return "saved"
        return "webdataset" if any(path.glob("*.tar")) else "imagefolder"
    if path.suffix not in TABLE_BUILDERS:
        raise ValueError(f"data file {str(path)!r}: unknown format {path.suffix!r}; give one of "
                         f"{', '.join(TABLE_BUILDERS)}, an image folder or a datasets Hub name")
    return path.suffix


def _load_saved(path: Path, split: str, streaming: bool, **load_kwargs):
    records = datasets.load_from_disk(str(path))
    return records.to_iterable_dataset() if streaming else records


def _load_shards(path: Path, split: str, streaming: bool, **load_kwargs):
    shards = sorted(path.glob("*.tar"))
    for shard in shards:  # `datasets` fails on a shard without members with an Arrow error
        with tarfile.open(shard) as archive:
            if archive.next() is None:
                raise ValueError(f"{shard} holds no file: remove it, or write its records into it")
    return load_dataset("webdataset", data_files=[str(shard) for shard in shards], split=split, streaming=streaming,
                        **load_kwargs)


def _holds_records(metadata: Path) -> bool:
    """Whether a metadata file has a record line: any non-blank line of JSON Lines, a line after a CSV's header."""
    needed = 2 if metadata.suffix == ".csv" else 1
    with open(metadata, "rb") as lines:
        return len(list(itertools.islice(filter(bytes.strip, lines), needed))) == needed


def _load_imagefolder(path: Path, split: str, streaming: bool, **load_kwargs):
    for metadata in path.glob("metadata.*"):  # `datasets` fails on one without records with an IndexError
        if metadata.suffix in (".jsonl", ".csv") and metadata.is_file() and not _holds_records(metadata):
            raise ValueError(f"{metadata} holds no record: write one line per image ({{\"file_name\": ..., "
                             f"\"text\": ...}}) or remove it")
    return load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming, **load_kwargs)


def _table_loader(builder: str):
    def load(path: Path, split: str, streaming: bool, **load_kwargs):
        return load_dataset(builder, data_files=str(path), split=split, streaming=streaming, **load_kwargs)

    return load


# every kind of local source and its loader (tests enumerate it: a new kind is tested for every path spelling)
SOURCE_LOADERS = {"saved": _load_saved, "webdataset": _load_shards, "imagefolder": _load_imagefolder,
                  **{suffix: _table_loader(builder) for suffix, builder in TABLE_BUILDERS.items()}}


def _standardize_columns(records, source, image_column, text_column, require_text, base_dir: Path):
    columns = record_columns(records)
    image_column = image_column or _first_present(
        columns, ("image", "images", "img", "image_path", "file_name", "path") + IMAGE_EXTENSIONS)
    text_column = text_column or _first_present(columns, ("text", "caption", "txt", "captions", "sentence"))
    if image_column is None or image_column not in columns:
        raise ValueError(f"{source}: no image column found among {columns}; pass image_column=")
    if require_text and (text_column is None or text_column not in columns):
        raise ValueError(f"{source}: no text column found among {columns}; pass text_column=")
    if text_column not in columns:
        text_column = None
    features = records.features or {}  # a streamed CSV or JSON list has none until read
    if isinstance(features.get(image_column), ImageFeature):
        records = records.cast_column(image_column, ImageFeature(decode=False))
    renames = {image_column: "image", **({text_column: "text"} if text_column else {})}
    records = records.rename_columns({old: new for old, new in renames.items() if old != new})
    if _holds_paths((records.features or {}).get("image")):
        # relative paths in a table are relative to the table's folder
        root = str(base_dir.resolve())
        records = records.map(lambda batch: {"image": [_resolve_path(value, root) for value in batch["image"]]},
                              batched=True)
    return records


def _usable_table_records(path: Path, counter: BadRecordCounter) -> list[dict] | None:
    """The usable records of a JSON Lines/CSV table or imagefolder metadata, when some records are bad (counted);
    `None` when the source has no such table or every record is usable (`datasets` then reads it as usual). Raises
    [`TooManyBadRecordsError`] when a table has no usable record or too many bad ones."""
    folder = path if path.is_dir() else None
    tables = [path / name for name in ("metadata.jsonl", "metadata.csv") if (path / name).is_file()] if folder \
        else [path] if path.suffix in (".jsonl", ".json", ".csv") and path.is_file() else []
    records, checked = [], BadRecordCounter(log_first=counter.log_first)
    for table in tables:
        readable = []
        for line_number, record, problem in _table_lines(table):
            if problem is None and folder is not None:
                problem = _escaping_file_name(record, folder)
            if problem is not None:
                checked.skip("unreadable metadata", f"{table} line {line_number}: {problem}")
                continue
            readable.append((line_number, record))
        mistyped = _mistyped_fields([record for _, record in readable])
        for index, (line_number, record) in enumerate(readable):
            if index in mistyped:
                checked.skip("a field of the wrong type", f"{table} line {line_number}: {mistyped[index]}")
                continue
            if folder is not None:  # an imagefolder record: its image, found like `datasets` finds it
                record = {"image": str(folder / record.pop("file_name")), **record}
            records.append(record)
    checked.used = len(records)
    if checked.total:
        checked.check(f"data {str(path)!r}")
    counter.merge(checked)
    return records if checked.total else None


# the columns holding a record's text or its image path(s), as `_standardize_columns` finds them: text, or a list of
# texts (several captions, several images)
TEXT_COLUMNS = ("text", "caption", "txt", "captions", "sentence")
PATH_COLUMNS = ("image", "images", "img", "image_path", "file_name", "path")


def _json_kind(value) -> str:
    """The kind of a JSON value as Arrow types a column: text, number, bool, null, object, or `list of KIND`."""
    if isinstance(value, list):
        kinds = {_json_kind(item) for item in value if item is not None}
        return f"list of {kinds.pop() if len(kinds) == 1 else 'mixed' if kinds else 'null'}"
    return {str: "text", bool: "bool", type(None): "null", dict: "object"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _mistyped_fields(records: list[dict]) -> dict[int, str]:
    """{index: problem} of the records with a field whose type cannot share its column with the others': each column
    holds the kind most of its records have (a text or image-path column: text, or lists of texts; integers and
    floats are both numbers; nulls fit any column). `datasets` would stop the whole load with an Arrow error
    instead."""
    kinds: dict[str, Counter] = {}
    for record in records:
        for key, value in record.items():
            kinds.setdefault(key, Counter())[_json_kind(value)] += 1
    expected = {}
    for key, counts in kinds.items():
        allowed = [kind for kind, _ in counts.most_common() if kind != "null" and (
            key not in TEXT_COLUMNS + PATH_COLUMNS or kind in ("text", "list of text"))]
        expected[key] = tuple(allowed[:1]) or (("text",) if key in TEXT_COLUMNS + PATH_COLUMNS else ())
    problems = {}
    for index, record in enumerate(records):
        for key, value in record.items():
            kind = _json_kind(value)
            if kind != "null" and expected[key] and kind not in expected[key]:
                problems[index] = (f"field {key!r} is {kind} ({json.dumps(value)[:40]}), expected "
                                   f"{' or '.join(expected[key])}")
                break
    return problems


def _table_lines(table: Path):
    """(line number, record, problem) for each line of a JSON Lines or CSV file, or each item of a JSON file's list
    (numbered from 1); `problem` names a bad line."""
    if table.suffix == ".json":
        yield from _json_items(table)
        return
    lines = table.read_bytes().splitlines()
    header = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM (Windows editors) is no record's
        except UnicodeDecodeError as error:
            yield number, None, f"not UTF-8 ({error.reason} at byte {error.start})"
            continue
        if table.suffix == ".csv":
            row = next(csv.reader(io.StringIO(text)), [])
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                yield number, None, f"{len(row)} fields, the header has {len(header)}"
                continue
            yield number, dict(zip(header, row, strict=True)), None
            continue
        try:
            record = loads_json(text)
        except json.JSONDecodeError as error:
            yield number, None, f"not JSON ({error.msg})"
            continue
        yield (number, record, None) if isinstance(record, dict) else (number, None, "not a JSON object")


def _json_items(table: Path):
    """(item number, record, problem) of a JSON file holding a list of records; nothing for any other JSON (a
    `datasets` `field=` layout is left to `datasets`)."""
    try:
        data = loads_json(table.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # `datasets` reports the file's own problem
    if isinstance(data, list):
        for number, record in enumerate(data, start=1):
            yield (number, record, None) if isinstance(record, dict) else (number, None, "not a JSON object")


def _escaping_file_name(record: dict, folder: Path) -> str | None:
    """Why an imagefolder record's `file_name` is unusable (missing, absolute, or leaving the folder), else None."""
    name = record.get("file_name")
    if not isinstance(name, str) or not name:
        near = difflib.get_close_matches("file_name", [str(key) for key in record], n=1, cutoff=0.6)
        fix = f"rename {near[0]!r} to 'file_name'" if near else f"its fields: {', '.join(map(str, record)) or 'none'}"
        return f"no 'file_name' field naming its image ({fix})"
    root = folder.resolve()
    if os.path.isabs(name) or not (root / name).resolve().is_relative_to(root):
        return f"file_name {name!r} is outside the folder {folder}"
    return None


def _holds_paths(feature) -> bool:
    """A string column, or a list of strings (several images per record, e.g. chat data)."""
    inner = getattr(feature, "feature", feature)
    return isinstance(inner, Value) and inner.dtype in ("string", "large_string")


def _first_present(columns, candidates):
    return next((name for name in candidates if name in columns), None)


def _resolve_path(value, root: str):
    if isinstance(value, list):
        return [_resolve_path(item, root) for item in value]
    if isinstance(value, str) and value and not os.path.isabs(value) and "://" not in value:
        return os.path.join(root, value)
    return value


def load_text_records(source: str, split: str = "train", streaming: bool = False, text_column: str = "text",
                      **load_kwargs):
    """Text-only records (`text` column) from a `.txt`/JSON/CSV/Parquet file or any `load_dataset` source."""
    path = local_source(source) if Path(source).suffix != ".txt" else Path(source)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"text file {source!r} does not exist")
    builder = None if path is None else "text" if path.suffix == ".txt" else TABLE_BUILDERS.get(path.suffix)
    if builder is not None:
        records = load_dataset(builder, data_files=str(path), split=split, streaming=streaming, **load_kwargs)
    else:
        records = load_dataset(source, split=split, streaming=streaming, **load_kwargs)
    if text_column != "text":
        records = records.rename_column(text_column, "text")
    return records.select_columns(["text"])


def limit_records(records, max_samples: int | None):
    """The first `max_samples` records (streaming too)."""
    if max_samples is None:
        return records
    if isinstance(records, datasets.Dataset):
        max_samples = min(max_samples, len(records))
    return records.take(max_samples)


def training_records(script_args, counter: BadRecordCounter, require_text: bool = True):
    """A stage's `--data` (`--split`, `--streaming`, its columns), at most `--max_samples` records; the bad records
    are skipped and counted in `counter`. The stages read their data through [`training.evaluation.stage_records`],
    which adds the held-out part."""
    records = load_records(script_args.data, script_args.split, script_args.streaming, script_args.image_column,
                           script_args.text_column, require_text=require_text, counter=counter)
    return limit_records(records, script_args.max_samples)


def mix_text_records(pairs, texts, text_ratio: float, seed: int = 0):
    """Interleaves text-only records into image-text records: a fraction `text_ratio` of the mixture is text-only
    (the official authors used about 2 text : 1 image-text)."""
    if not 0 <= text_ratio < 1:
        raise ValueError(f"text_ratio must be in [0, 1), got {text_ratio}")
    if texts is None or text_ratio == 0:
        return pairs
    # text records get every other column of the pairs (image, stored tokens) as empty values
    missing = [name for name in record_columns(pairs) if name != "text"]
    texts = texts.map(lambda batch: {name: [None] * len(batch["text"]) for name in missing}, batched=True)
    if pairs.features is not None:  # a stream read past a bad metadata line has none until read
        texts = texts.cast(pairs.features)
    return interleave_datasets([pairs, texts], probabilities=[1 - text_ratio, text_ratio], seed=seed,
                               stopping_strategy="first_exhausted")


# ---------------------------------------------------------------------------------------------------------- images


def decode_image(value, name: str = "image"):
    """An undecoded record image (path, bytes or `{"bytes", "path"}` dict) -> RGB PIL image; `BadRecordError`
    when it is missing, unreadable, truncated or empty."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, str) and not value):
        raise BadRecordError(f"{name}: no image")
    try:
        return to_rgb_image(value, name=name)
    except ValueError as error:  # its message already names the image
        raise BadRecordError(str(error)) from error


@contextlib.contextmanager
def transforms_in_temporary_files():
    """Inside, the `datasets` transforms lavit applies (`map`, `train_test_split`, ...) write their results into
    temporary files that `datasets` deletes when the process ends, and never reuse a cache: by default they write
    `cache-*.arrow` files beside their input, which for a `save_to_disk` folder is the user's own folder (its file
    list is part of a run's fingerprint, so a resume was refused after it). The function of every stage script that
    reads its data runs inside (a decorator)."""
    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


def pretokenize_images(records, visual_tokenizer, image_processor, batch_size: int = 64, counter=None,
                      num_proc: int | None = None):
    """
    Offline pre-tokenization: adds `keep_mask` (N booleans) and `code_ids` (the image's visual ids) to every record
    with the frozen visual tokenizer, in batches (on the visual tokenizer's device, e.g. a GPU). Records with unusable
    images are dropped and counted. Stage 2 then reads the stored tokens instead of recomputing the frozen parts.
    """
    counter = counter if counter is not None else BadRecordCounter()
    visual_tokenizer.eval()

    def tokenize_batch(batch):
        images, kept_rows = [], []
        for row, value in enumerate(batch["image"]):
            try:
                images.append(decode_image(value, name=f"record image {row}"))
                kept_rows.append(row)
            except BadRecordError as error:
                counter.skip("unreadable image", str(error))
        output = {key: [batch[key][row] for row in kept_rows] for key in batch}
        output["keep_mask"], output["code_ids"] = [], []
        if images:
            pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(visual_tokenizer.device, visual_tokenizer.dtype)
            tokens = visual_tokenizer.tokenize(pixel_values)
            output["keep_mask"] = tokens.keep_mask.cpu().tolist()
            output["code_ids"] = [ids.cpu().tolist() for ids in tokens.per_image()]
        return output

    map_kwargs = {}
    if not isinstance(records, datasets.IterableDataset):
        # a fresh fingerprint: `datasets` would hash `tokenize_batch`, whose closure holds the visual tokenizer, by
        # copying every weight to CPU memory (0.6 s and 400 MB per 100M parameters), for a cache it never reuses here
        map_kwargs["new_fingerprint"] = uuid.uuid4().hex
        map_kwargs.update({"num_proc": num_proc} if num_proc else {})
    with transforms_in_temporary_files():
        return records.map(tokenize_batch, batched=True, batch_size=batch_size, **map_kwargs)


# ---------------------------------------------------------------------------------------------------- image datasets


def image_dataset(records, counter: BadRecordCounter | None = None, crop_scale: tuple[float, float] | None = None,
                  seed: int = 0) -> torch.utils.data.Dataset:
    """
    Stage-1 view of records: items are `{"image": RGB PIL image, "skipped_records": int}`. A bad record is counted and
    replaced by the next readable one (so every batch is full and the same on every run); `skipped_records` carries
    the count with the item, so it reaches the trainer from dataloader workers too. With `crop_scale`, each image is a
    random crop drawn from a generator seeded by `(seed, epoch, index)` (see [`crop_generator`]): the crops of a
    resumed run are those of the uninterrupted one, whatever the RNG state or the number of workers.
    """
    counter = counter or BadRecordCounter()
    if isinstance(records, datasets.IterableDataset):
        return _StreamedImageRecords(records, counter, crop_scale, seed)
    return _ImageRecords(records, counter, crop_scale, seed)


def crop_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's random crop: a function of the run's seed, the epoch and the item's index only.
    NumPy's `SeedSequence` hashes the three numbers (a torch generator seeded with nearby integers gives correlated
    first draws: the same image got nearly the same crop in consecutive epochs)."""
    return np.random.default_rng([seed, epoch, index])


def random_crop(image, crop_scale: tuple[float, float], generator: np.random.Generator):
    """A crop covering a uniform fraction in `crop_scale` of the image area, drawn from `generator`."""
    low, high = crop_scale
    area_fraction = low + (high - low) * float(generator.random())
    side = area_fraction**0.5
    width, height = max(1, round(image.width * side)), max(1, round(image.height * side))
    left = int(generator.integers(0, image.width - width + 1))
    top = int(generator.integers(0, image.height - height + 1))
    return image.crop((left, top, left + width, top + height))


def augment_image(image, crop_scale: tuple[float, float] | None, horizontal_flip: bool,
                  generator: np.random.Generator):
    """A random crop of `image` (its share of the area uniform in `crop_scale`; `None`: the whole image), mirrored
    left-right half of the time when `horizontal_flip`, drawn from `generator`."""
    if crop_scale is not None:
        image = random_crop(image, crop_scale, generator)
    if horizontal_flip and generator.random() < 0.5:
        image = image.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
    return image


class _EpochSeededImages:
    """What both image views share: the epoch (set by the Trainer through `set_epoch`) and the seeded crop."""

    def __init__(self, records, counter: BadRecordCounter, crop_scale, seed: int):
        self.records, self.counter, self.crop_scale, self.seed, self.epoch = records, counter, crop_scale, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def item(self, image, index: int, skipped: int, used: int = 1) -> dict:
        """`skipped`: the bad records the item stands for; `used`: 0 when the image stands in for a bad record
        (the share of bad records is then counted on the records, not on the items)."""
        if self.crop_scale is not None:
            image = random_crop(image, self.crop_scale, crop_generator(self.seed, self.epoch, index))
        return {"image": image, SKIPPED_FIELD: skipped, USED_FIELD: used}


class _ImageRecords(_EpochSeededImages, torch.utils.data.Dataset):
    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        for offset in range(len(self.records)):
            candidate = (index + offset) % len(self.records)
            try:
                image = decode_image(self.records[candidate]["image"], name=f"record {candidate}")
            except BadRecordError as error:
                self.counter.skip("unreadable image", str(error))
                continue
            # the item counts its own record only: the bad records it stepped over count when their own index is read
            # (once per pass; counting `offset` counted a run of n bad records n(n+1)/2 times)
            return self.item(image, index, skipped=int(offset > 0), used=int(offset == 0))
        raise ValueError("no record of the dataset holds a readable image")


class _StreamedImageRecords(_EpochSeededImages, torch.utils.data.IterableDataset):
    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def __iter__(self):
        # each readable image carries the bad records just before it; it is held back until the next one, so that the
        # bad records after the last readable image of the stream count with that image (they had no item to ride on)
        held, skipped = None, 0
        for index, record in enumerate(whole_stream(self.records)):
            try:
                image = decode_image(record["image"], name=f"record {index}")
            except BadRecordError as error:
                self.counter.skip("unreadable image", str(error))
                skipped += 1
                continue
            if held is not None:
                yield self.item(*held)
            held, skipped = (image, index, skipped), 0
        if held is None and skipped:
            raise ValueError(f"none of the {skipped} records of the stream holds a readable image")
        if held is not None:
            image, index, before = held
            yield self.item(image, index, before + skipped)


# ------------------------------------------------------------------------------------------------ augmentation seeds

AUGMENTATION_SEED = "augmentation_seed"  # the item field the LM collator draws an item's crops and mirrors from


class EpochSeeds(torch.utils.data.Dataset):
    """
    A training set whose items carry `augmentation_seed`: `[seed, epoch, index]`, so the collator's random crops
    and mirrors of an item are a function of the run's seed, the epoch and the item only (not of the process RNG a
    dataloader worker is seeded with): the same with any number of workers, either start method, and on resume.
    `set_epoch` (the Trainer's `DataEpochCallback`) reaches the wrapped set too.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def seeded(self, item: dict, index: int) -> dict:
        return {**item, AUGMENTATION_SEED: [self.seed, self.epoch, index]}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.seeded(self.dataset[index], index)


class StreamedEpochSeeds(EpochSeeds, torch.utils.data.IterableDataset):
    """[`EpochSeeds`] over a stream: items numbered in stream order (every worker reads the whole stream)."""

    def __iter__(self):
        for index, item in enumerate(whole_stream(self.dataset)):
            yield self.seeded(item, index)


def epoch_seeded(dataset, seed: int):
    """`dataset` as [`EpochSeeds`] (a stream as [`StreamedEpochSeeds`])."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return StreamedEpochSeeds(dataset, seed)
    return EpochSeeds(dataset, seed)


# ------------------------------------------------------------------------------------------------ streams and workers


def record_columns(records) -> list[str]:
    """The columns of `records`; a stream whose features `datasets` does not know yet (an imagefolder with metadata)
    is asked for its first record, so a transform can replace every column."""
    if records.column_names is not None:
        return list(records.column_names)
    first = next(iter(records.take(1)), None)
    return list(first) if first is not None else []


def whole_stream(records):
    """Every record of a stream in order, also inside a DataLoader worker: `datasets` hands each worker a share of a
    streamed dataset's shards (batches would then depend on the number of workers); `iter` reads all of them."""
    if not isinstance(records, datasets.IterableDataset):
        yield from records
        return
    for batch in records.iter(batch_size=1):
        yield {key: values[0] for key, values in batch.items()}


class WorkerBatches(torch.utils.data.IterableDataset):
    """
    A streamed training set split between DataLoader workers by whole batches: worker w of n keeps batches w, w + n,
    w + 2n, ... of the stream (`batch_size` items each: the batch of all processes, which accelerate's
    `IterableDatasetShard` then splits between them). The DataLoader takes one batch from each worker in turn, so
    it yields the batches of the run without workers, whatever the number of workers and their start method (fork,
    spawn). Every worker reads the whole stream; each decodes and collates only its own batches. `set_epoch` reaches
    the stream.
    """

    def __init__(self, dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def set_epoch(self, epoch: int):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        items = whole_stream(self.dataset)
        if worker is None:
            yield from items
            return
        for index, item in enumerate(items):
            if (index // self.batch_size) % worker.num_workers == worker.id:
                yield item
