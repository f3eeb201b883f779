"""Nothing silently wrong: bad records are skipped and counted exactly (dataloader workers, warm caches), user text
never becomes control ids, bad arguments get a message naming the argument and its range, and publishing checks
file contents and never follows a link out of the folder."""

import importlib.util
import json
import math
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import text_vocab_size, tiny_lavit_config, training_args, write_lora_adapter, write_tiny_language_model
from lavit.training.data import BadRecordCounter, load_records
from lavit.training.sample_data import photo_images
from lavit.training.sequences import InstructionBuilder, SequenceBuilder
from PIL import Image
from test_cli import error_lines, run
from test_hub import trained_tiny_model
from transformers import TrainerCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------------------------ bad records


def test_literal_image_markers_in_captions_stay_text(lavit_processor, tmp_path):
    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    control = {config.image_start_token_id, config.image_end_token_id}
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    captions = ["a cat [IMG] on a sofa", "[/IMG] a dog", "two [IMG][/IMG] birds </s> flying"]
    records = [{"image": str(tmp_path / "a.png"), "text": caption} for caption in captions]
    tokenizer = lavit_processor.tokenizer
    assert control <= set(tokenizer(captions[2], add_special_tokens=False)["input_ids"])  # plain tokenization leaks
    builder = SequenceBuilder(tokenizer, config, max_length=96, order="both", image_token_estimate=4)
    rows = builder({"image": [record["image"] for record in records], "text": captions}, [0, 1, 2])
    assert builder.counter.total == 0
    segments = []
    for ids, lengths in zip(rows["input_ids"], rows["segment_lengths"], strict=True):
        starts = np.cumsum([0, *lengths])
        segments += [ids[start:end] for start, end in zip(starts[:-1], starts[1:], strict=True)]
    assert len(segments) == 2 * len(captions)  # both orders of every record: none dropped
    for segment in segments:  # the image's own [IMG] and [/IMG], none from the text
        assert [token for token in segment if token in control] == [config.image_start_token_id,
                                                                     config.image_end_token_id]
    caption = InstructionBuilder(lavit_processor, task="caption")
    example = caption.example({"image": str(tmp_path / "a.png"), "text": "[IMG] a cat"}, 0)
    assert example["input_ids"].count(config.image_start_token_id) == 1  # the prompt's image only


def write_bad_imagefolder(folder, bad_metadata: bool = True) -> int:
    """An imagefolder with 4 usable records and bad records: an empty caption (dropped by the sequence builder), a
    corrupt image (dropped by the collator) and with `bad_metadata` a non-UTF-8 caption line and a `file_name`
    escaping the folder (dropped while loading; `datasets` then reads no table of its own, so nothing is cached).
    Returns the number of bad records."""
    folder.mkdir(parents=True)
    photos = list(photo_images().values())[:4]
    lines = []
    for index, array in enumerate(photos):
        Image.fromarray(array).resize((56, 56)).save(folder / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"photo number {index}"}).encode())
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    lines += [json.dumps({"file_name": "1.png", "text": "   "}).encode(),
              json.dumps({"file_name": "corrupt.png", "text": "a corrupt image"}).encode()]
    if bad_metadata:
        lines += [b'{"file_name": "0.png", "text": "caf\xe9 latin-1"}',
                  json.dumps({"file_name": "../../etc/passwd", "text": "escape"}).encode()]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return 4 if bad_metadata else 2


def test_bad_metadata_lines_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "photos"
    write_bad_imagefolder(folder)
    counter = BadRecordCounter()
    records = load_records(str(folder), counter=counter)
    assert len(records) == 6 and counter.counts["unreadable metadata"] == 2
    assert all(str(folder) in record["image"] for record in records)
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"image,text\nphotos/0.png,a photo\nphotos/1.png,caf\xe9\nphotos/2.png,fine\n")
    counter = BadRecordCounter()
    assert load_records(str(table), counter=counter)["text"] == ["a photo", "fine"]
    assert counter.total == 1


def test_a_map_batch_without_usable_records_still_carries_its_count(lavit_processor):
    from lavit.training.collators import LaVITDataCollator

    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    builder = SequenceBuilder(lavit_processor.tokenizer, config, max_length=64)
    rows = builder({"image": [None, None, None], "text": ["", "  ", None]}, [0, 1, 2])
    assert rows["input_ids"] == [[]] and rows["skipped_records"] == [3]
    collator = LaVITDataCollator(lavit_processor.image_processor, config.image_start_token_id)
    batch = collator([{name: values[0] for name, values in rows.items()}])
    assert int(batch["skipped_records"]) == 3 and (batch["labels"] == -100).all()


class SkippedRecords(TrainerCallback):
    """Records the `skipped_records` of every training log (after the stage's own callbacks)."""

    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "skipped_records" in logs:
            self.values.append(logs["skipped_records"])


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
@pytest.mark.parametrize("bad_metadata", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_records_are_exact_with_workers_and_a_warm_cache(tmp_path, workers, bad_metadata):
    from lavit.training.stage2_pretrain import PretrainingArguments, pretrain

    from lavit import LaVITTokenizerModel

    folder = tmp_path / "photos"
    bad = write_bad_imagefolder(folder, bad_metadata)
    LaVITTokenizerModel(trained_tiny_model().config).save_pretrained(tmp_path / "tokenizer")
    lm = write_tiny_language_model(tmp_path / "lm")
    counts = []
    for run_index in range(2):  # the second run reads the datasets cache the first one wrote
        recorder = SkippedRecords()
        script = PretrainingArguments(data=str(folder), visual_tokenizer=str(tmp_path / "tokenizer"),
                                      language_model=str(lm), max_length=64, order="image_to_text", resume="no",
                                      visual_learning_rate=None, packed=False)
        pretrain(script, training_args(tmp_path / f"run{run_index}", num_train_epochs=1, logging_steps=1,
                                       per_device_train_batch_size=1, dataloader_num_workers=workers),
                 callbacks=[recorder])
        counts.append(recorder.values[-1])
    assert counts == [bad, bad]


# ------------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("guidance_scale", -3, "guidance_scale must be a finite number >= 1"),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number >= 1"),
    ("guidance_scale", "4", "guidance_scale must be"),
    ("top_p", 1.5, r"top_p must be a finite number in \(0, 1\]"),
    ("top_p", float("inf"), "top_p must be"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 2.5, "top_k must be"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("temperature", math.inf, "temperature must be"),
    ("do_sample", "yes", r"do_sample must be one of \[True, False\]"),
])
def test_image_sampling_arguments_are_checked_by_name(lavit_model, lavit_processor, argument, value, message):
    prompt = lavit_processor(text="a red bus")
    with pytest.raises(ValueError, match=message):
        lavit_model.generate_image_tokens(**prompt, max_new_tokens=2, **{argument: value})


def test_bad_tensors_and_statistics_are_refused(lavit_model, lavit_processor):
    from lavit import LaVITImageProcessor

    for std in ([0.2, 0.0, 0.3], [0.2, 0.3], "abc", [0.2, float("nan"), 0.3]):
        with pytest.raises(ValueError, match="image_std must be 3 finite numbers > 0"):
            LaVITImageProcessor(image_std=std)
    ids = lavit_processor(text="a red bus")["input_ids"]
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, sequence\) tensor.*\(1, 1, "):
        lavit_model(input_ids=ids[None])
    config = lavit_model.config
    unclosed = torch.cat([ids[:, :2], torch.tensor([[config.image_start_token_id]]), ids[:, 2:]], dim=1)
    with pytest.raises(ValueError, match="is never closed"):
        lavit_model(input_ids=unclosed)
    with pytest.raises(ValueError, match="is never closed"):
        lavit_model.generate_image_tokens(input_ids=unclosed, max_new_tokens=2)
    # an image being generated (open [IMG] followed by visual ids only) is still fine
    growing = torch.cat([ids, torch.tensor([[config.image_start_token_id, config.visual_token_offset + 3]])], dim=1)
    assert lavit_model(input_ids=growing).logits.shape[:2] == growing.shape


def test_cli_arguments_get_one_line_naming_the_problem(capsys, tmp_path, lavit_folder, photo_file):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "caption", photo_file, "--model", lavit_folder, "--num-beams", 0)
    assert exit_info.value.code == 2
    assert "argument --num-beams: must be an integer >= 1, got '0'" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = run(capsys, "export", tmp_path / "hub", "--model", lavit_folder, "--metadata",
                       tmp_path / "list.json")
    assert code == 1 and "must hold a JSON object" in err and len(error_lines(err)) == 1
    trained_tiny_model().save_pretrained(tmp_path / "tokenizer")
    for command in (["caption", photo_file], ["train", "--data", photo_file, "--output_dir", tmp_path / "run"]):
        code, _, err = run(capsys, *command, "--model", tmp_path / "tokenizer")
        assert code == 1 and "holds a LaVIT visual tokenizer, but this command needs a LaVIT model folder" in err
    release = tmp_path / "release"
    (release / "language_model").mkdir(parents=True)
    (release / "visual_tokenizer").mkdir()
    (release / "visual_weight.bin").write_bytes(pickle.dumps({"weights": print}))  # a global: not tensors only
    from lavit.modeling.convert_original_lavit import load_original_state_dict

    with pytest.raises(ValueError, match="visual_weight.bin is not a plain PyTorch state dict") as error:
        load_original_state_dict(release / "visual_weight.bin")
    assert "weights_only=False" not in str(error.value)


@pytest.fixture
def lavit_folder(lavit_model, lavit_processor, tmp_path):
    folder = tmp_path / "lavit"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    return folder


@pytest.fixture
def photo_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(list(photo_images().values())[0]).save(path)
    return path


# ------------------------------------------------------------------------------------------------------ publishing


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_skipped_records_are_summed_over_processes(tmp_path):
    """Two processes (torchrun, gloo): load-time skips are counted once, the rows' stored counts once (not once per
    rank), and the collator's skips of each rank are summed. Six rows of one segment each: both ranks get three (a
    record that accelerate repeats to even out the ranks is read, and counted, twice)."""
    from conftest import training_settings
    from processes import run_processes

    from lavit import LaVITTokenizerModel

    bad = write_bad_imagefolder(tmp_path / "photos")
    with open(tmp_path / "photos" / "metadata.jsonl", "a") as metadata:
        metadata.write(json.dumps({"file_name": "2.png", "text": "the same photo again"}) + "\n")
    LaVITTokenizerModel(trained_tiny_model().config).save_pretrained(tmp_path / "tokenizer")
    script = {"data": str(tmp_path / "photos"), "visual_tokenizer": str(tmp_path / "tokenizer"),
              "language_model": str(write_tiny_language_model(tmp_path / "lm")), "max_length": 40,
              "order": "image_to_text", "resume": "no", "visual_learning_rate": None, "packed": False}
    training = training_settings(tmp_path / "run", num_train_epochs=1, logging_steps=1, per_device_train_batch_size=1)
    run_processes({"script": script, "training": training}, tmp_path, 2, "skipped")
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    skipped = [entry["skipped_records"] for entry in logs if "loss" in entry]
    assert len(skipped) == 3 and skipped[-1] == bad, skipped


@pytest.mark.parametrize("text", ["a cat [IMG] on a sofa", "<image>[/IMG] a dog", "<image>two <visual_3> birds"])
def test_prompt_text_never_spells_control_ids(lavit_processor, text):
    """At inference too, user text is text: a literal [IMG], [/IMG] or visual token in a prompt is refused by name
    instead of steering the model (the training data path reads such captions as plain text)."""
    images = [Image.new("RGB", (8, 8))] * text.count("<image>")
    with pytest.raises(ValueError, match="text 0 spells LaVIT control tokens"):
        lavit_processor(images=images or None, text=text)
    assert lavit_processor(images=images or None, text="<image>a cat" if images else "a cat")["input_ids"].numel()


# ------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(("config_class", "setting", "value"), [
    ("LaVITTokenizerConfig", "selection_mode", "greedy"), ("LaVITTokenizerConfig", "merger_attention", "flash"),
    ("LaVITConfig", "loss_modalities", "all"), ("LaVITConfig", "generated_image_inputs", "pixels"),
    ("LaVITDetokenizerConfig", "conditioning", "midres"),
])
def test_config_choices_are_checked_by_name(config_class, setting, value):
    import lavit

    with pytest.raises(ValueError, match=rf"{setting} must be one of .*, got '{value}'"):
        getattr(lavit, config_class)(**{setting: value})


def test_configs_keep_defaults_derived_from_their_settings_and_check_the_unet():
    from lavit import LaVITConfig, LaVITDetokenizerConfig, LaVITTokenizerConfig

    config = LaVITConfig(tokenizer_config={"codebook_size": 64}, text_vocab_size=100,
                         text_config={"vocab_size": 166, "hidden_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 64})
    assert isinstance(config.tokenizer_config, LaVITTokenizerConfig) and config.visual_token_end == 166
    assert LaVITConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match=r"text_config.vocab_size is 165, expected at least .* = 166"):
        LaVITConfig(tokenizer_config={"codebook_size": 64}, text_vocab_size=100, text_config={"vocab_size": 165})
    lowres = LaVITDetokenizerConfig(conditioning="lowres")
    assert (lowres.prompt_projection_sizes, lowres.image_size, lowres.unet_config["cross_attention_dim"]) == (
        [768], 512, 768)
    lowres.unet_config["cross_attention_dim"] = 1024
    with pytest.raises(ValueError, match=r"prompt_projection_sizes \[768\] sum to 768, but the UNet's "
                                         r"cross_attention_dim is 1024"):
        lowres.check_unet_fits()


# ------------------------------------------------------------------------------------------------------ data paths


def write_source(kind: str, folder, arrays) -> str:
    """Writes `arrays` as a data source of `kind` (a key of `SOURCE_LOADERS`) under `folder`; returns its name there.
    Tables name their images relative to themselves; a bad line is added where the format reads lines."""
    import io
    import tarfile

    import datasets

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(images / f"{index}.png")
    rows = [{"image": f"images/{index}.png", "text": f"photo {index}"} for index in range(len(arrays))]
    if kind == "imagefolder":
        lines = [json.dumps({"file_name": f"{index}.png", "text": f"photo {index}"}) for index in range(len(arrays))]
        (images / "metadata.jsonl").write_bytes("\n".join(lines).encode() + b"\n{not json\n")
        return "images"
    if kind in ("webdataset", ".tar"):
        shards = folder / "shards"
        shards.mkdir()
        with tarfile.open(shards / "shard-000.tar", "w") as shard:
            for index in range(len(arrays)):
                for suffix, payload in (("png", (images / f"{index}.png").read_bytes()), ("txt", b"a photo")):
                    info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                    info.size = len(payload)
                    shard.addfile(info, io.BytesIO(payload))
        return "shards" if kind == "webdataset" else "shards/shard-000.tar"
    if kind == "saved":
        datasets.Dataset.from_list([{"image": (images / f"{index}.png").read_bytes(), "text": "a photo"}
                                    for index in range(len(arrays))]).save_to_disk(str(folder / "saved"))
        return "saved"
    name = f"pairs{kind}"
    if kind in (".json", ".jsonl"):
        text = json.dumps(rows) if kind == ".json" else "\n".join(map(json.dumps, rows)) + "\n{not json\n"
        (folder / name).write_text(text)
    elif kind == ".csv":
        (folder / name).write_text("image,text\n" + "".join(f"{row['image']},{row['text']}\n" for row in rows)
                                   + "x,y,z\n")
    else:
        import pandas

        pandas.DataFrame(rows).to_parquet(folder / name)
    return name


@pytest.mark.parametrize("kind", sorted(__import__("lavit.training.data", fromlist=["x"]).SOURCE_LOADERS))
def test_every_data_format_reads_the_same_through_every_path_spelling(tmp_path, monkeypatch, kind):
    """The bug: a relative imagefolder with one bad metadata line lost every image (its folder was joined twice), so
    fine-tuning trained on nothing. Every kind of local source (enumerated from the loader's own registry) gives the
    same readable records named absolutely, relatively from another working directory, with `..`, and through a
    symbolic link."""
    from lavit.training.data import decode_image

    arrays = [array[:64, :64] for array in list(photo_images().values())[:3]]
    data = tmp_path / "data"
    name = write_source(kind, data, arrays)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    spellings = {"absolute": (tmp_path, str(data / name)), "relative": (tmp_path, f"data/{name}"),
                 "dotdot": (tmp_path / "elsewhere", f"../data/{name}"), "symlink": (tmp_path, f"link/{name}"),
                 "dot": (data, f"./{name}")}
    for spelling, (cwd, source) in spellings.items():
        monkeypatch.chdir(cwd)
        records = load_records(source, require_text=False)
        assert len(records) == len(arrays), (kind, spelling)
        sizes = {decode_image(record["image"]).size for record in records}
        assert sizes == {(64, 64)}, (kind, spelling)


def test_a_local_path_typo_is_reported_at_once_and_hub_names_still_go_to_the_hub(tmp_path, monkeypatch):
    from lavit.training.data import local_source

    (tmp_path / "photos" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for typo in ("photos/trian", "./photos/trian", "pairs.jsonl", "~/no-such-folder-h24d", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"data path '{typo}' does not exist"):
            load_records(typo)
    with pytest.raises(FileNotFoundError, match="did you mean 'photos/train'"):
        load_records("photos/trian")
    assert local_source("someone/captions") is None and local_source("mnist") is None  # Hub ids
    assert local_source("photos/train") == (tmp_path / "photos" / "train").resolve()


def test_imagefolder_metadata_keyed_filename_names_file_name(tmp_path):
    from lavit.training.data import TooManyBadRecordsError

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"filename": "a.png", "text": "x"}) + "\n")
    with pytest.raises(TooManyBadRecordsError, match="no usable record.*rename 'filename' to 'file_name'"):
        load_records(str(tmp_path))


def stage_argv(command: str, tmp_path, lavit_folder) -> list[str]:
    """The arguments that make `lavit COMMAND` read `tmp_path/mostly_bad` (one stage of `TRAINING_COMMANDS` each)."""
    from conftest import training_settings

    inputs = {"train-tokenizer": ["--tokenizer_config", "tiny"],
              "train": ["--visual_tokenizer", tmp_path / "tokenizer", "--language_model", tmp_path / "lm",
                        "--max_length", "64"],
              "finetune": ["--model", lavit_folder, "--task", "caption", "--max_length", "64"],
              "train-detokenizer": ["--visual_tokenizer", tmp_path / "tokenizer", "--detokenizer_config", "tiny"],
              "pretokenize": ["--visual_tokenizer", tmp_path / "tokenizer", "--output", tmp_path / "run" / "final"]}
    settings = training_settings(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, logging_steps=1)
    training = [] if command == "pretokenize" else [
        f"--{name}={value}" for name, value in settings.items() if name not in ("disable_tqdm", "report_to")]
    return [command, "--data", str(tmp_path / "mostly_bad"), *map(str, inputs[command]), *training,
            *([] if command == "pretokenize" else ["--resume", "no", "--report_to", "none"])]


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(__import__("lavit.cli", fromlist=["x"]).TRAINING_COMMANDS))
def test_every_stage_stops_with_the_counts_when_most_records_are_bad(command, tmp_path, capsys, lavit_folder):
    """Three of four images are corrupt: every stage (enumerated from the CLI's own list) stops before saving, with a
    line giving the counts, instead of writing a model trained on what is left."""
    from conftest import write_stage_components

    write_stage_components(tmp_path)
    folder = tmp_path / "mostly_bad"
    folder.mkdir()
    Image.fromarray(list(photo_images().values())[0]).save(folder / "good.png")
    for index in range(3):
        (folder / f"bad{index}.png").write_bytes(b"\x89PNG broken")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": "a photo"}) + "\n"
                                                   for name in ("good.png", "bad0.png", "bad1.png", "bad2.png")))
    code, _, err = run(capsys, *stage_argv(command, tmp_path, lavit_folder))
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert "TooManyBadRecordsError" in lines[0] and "unusable" in lines[0] and "skipped of" in lines[0], lines
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------------------------ many inputs


def many_input_arguments() -> list[tuple[str, str]]:
    """(command, argument) for every argument of a `lavit` command that takes several inputs (nargs `+` or `*`),
    found from the parser. The training stages take their inputs as records of `--data` (tested per stage above)."""
    import argparse

    from lavit.cli import TRAINING_COMMANDS, build_parser

    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return [(name, action.dest) for name, parser in commands.choices.items() if name not in TRAINING_COMMANDS
            for action in parser._actions if action.nargs in ("+", "*")]


def good_bad_good(command: str, tmp_path, folder, photo) -> tuple[list, str, list]:
    """The arguments that give `command` a good, a bad and a good input, the bad input, and the files the good ones
    write."""
    bad_image = tmp_path / "notanimage.png"
    bad_image.write_text("not an image")
    images = [photo, bad_image, photo]
    model = ["--model", folder]
    cases = {
        "tokenize": (["tokenize", *images, *model], []),
        "caption": (["caption", *images, *model, "--max-new-tokens", 2], []),
        "vqa": (["vqa", *images, "--question", "what is it?", *model, "--max-new-tokens", 2], []),
        "generate": (["generate", "a red bus", "a [IMG] bus", "a blue bus", "-o", tmp_path / "gen.png", *model,
                      "--steps", 2, "--height", 16, "--width", 16], ["gen-0.png", "gen-2.png"]),
        "reconstruct": (["reconstruct", *images, "-o", tmp_path / "rec.png", *model, "--steps", 2],
                        ["rec-0.png", "rec-2.png"]),
    }
    if command == "new-language-model":
        for name in ("a.txt", "b.txt"):
            (tmp_path / name).write_text("a photo of a cat\na red bus on a street\n" * 20)
        return (["new-language-model", tmp_path / "lm", "--texts", tmp_path / "a.txt", tmp_path / "missing.txt",
                 tmp_path / "b.txt", "--vocab-size", 300], str(tmp_path / "missing.txt"), ["lm/config.json"])
    assert command in cases, f"lavit {command} takes several inputs: add a good+bad+good case here"
    argv, files = cases[command]
    return argv, str(argv[2]), files


@pytest.fixture
def decoding_folder(lavit_model, lavit_processor, tmp_path):
    """A saved tiny LaVIT folder with a pixel decoder, in the released layout (the model's folder with the decoder in
    `detokenizer/`), which `LaVITPipeline` and the commands still load."""
    from conftest import tiny_detokenizer_config

    from lavit import LaVITDetokenizer

    torch.manual_seed(0)
    lavit_model.save_pretrained(tmp_path / "decoding")
    lavit_processor.save_pretrained(tmp_path / "decoding")
    LaVITDetokenizer(tiny_detokenizer_config()).eval().save_pretrained(tmp_path / "decoding" / "detokenizer")
    return tmp_path / "decoding"


@pytest.mark.parametrize(("command", "argument"), many_input_arguments())
def test_every_many_input_command_does_the_good_inputs_and_names_the_bad_one(command, argument, tmp_path, capsys,
                                                                             decoding_folder, photo_file):
    """`lavit caption good.png notanimage.png good2.png` printed one error and no caption. Every command that takes
    several inputs (from the parser) does both good ones, reports the bad one with its reason, exits 1; with `--json`
    the document has one entry per input, the bad one with an `error` field."""
    from lavit.cli import build_parser

    argv, bad, files = good_bad_good(command, tmp_path, decoding_folder, photo_file)
    code, out, err = run(capsys, *argv)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 2, err[-3000:]
    assert lines[0].startswith(f"lavit {command}: error: {bad}: ") and len(lines[0]) > len(bad) + 40, lines
    assert "1 of 3 inputs failed" in lines[1]
    for name in files:
        assert (tmp_path / name).is_file(), name
    if not files:
        assert [line.split(": ")[0] for line in out.splitlines() if line.startswith(str(photo_file))] == [
            str(photo_file)] * 2, out
    if "--json" in build_parser()._subparsers._group_actions[0].choices[command]._option_string_actions:
        code, out, _ = run(capsys, *argv, "--json")
        document = json.loads(out)
        assert code == 1 and len(document) == 3 and [("error" in entry) for entry in document] == [False, True, False]


# ------------------------------------------------------------------------------------------------------ messages


def edited_copy(folder, target, edit) -> str:
    """A copy of the model `folder` at `target` whose config.json went through `edit(config)`."""
    import shutil

    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def unclear_message_cases(tmp_path, folder, photo) -> dict:
    """The probe's unclear messages: name -> (argv, what the one error line must say)."""
    import shutil

    shutil.copytree(folder, tmp_path / "partial")
    (tmp_path / "partial" / "detokenizer" / "config.json").unlink()
    (tmp_path / "runs" / "caption").mkdir(parents=True)
    shutil.copytree(folder, tmp_path / "runs" / "caption" / "final")
    (tmp_path / "photos" / "train").mkdir(parents=True)
    caption = ["caption", photo, "--model"]
    wider = edited_copy(folder, tmp_path / "wider", lambda config: config["text_config"].update(
        intermediate_size=config["text_config"]["intermediate_size"] + 8))
    return {
        "non-UTF-8 prompt": ([*caption, folder, "--prompt", b"a \xff bus".decode("utf-8", "surrogateescape")],
                             r"text 0 is not valid text: .* undecodable byte\(s\) at character 9; give UTF-8 text"),
        "config field of the wrong type": (
            [*caption, edited_copy(folder, tmp_path / "abc", lambda config: config.update(text_vocab_size="abc"))],
            r"text_vocab_size must be an int, got 'abc': fix it in config.json"),
        "derived value in a config": (
            [*caption, edited_copy(folder, tmp_path / "patch", lambda config: config["tokenizer_config"].update(
                patch_size=14))], r"tokenizer_config.patch_size is derived from other settings, not a setting"),
        "weights that do not fit the config": (
            [*caption, wider], r"weights do not fit the model its config.json describes: model\.language_model\..* is "
                               r"\[\d+, \d+\] in model.safetensors but \[\d+, \d+\] from config.json"),
        "missing detokenizer/config.json": (["generate", "a bus", "-o", tmp_path / "x.png", "--model",
                                             tmp_path / "partial"],
                                            r"detokenizer has no config.json: the pixel decoder folder is incomplete"),
        "a run folder as --model": ([*caption, tmp_path / "runs" / "caption"],
                                    r"is a training run's folder, not a model folder: use --model .*caption/final"),
        "a model path typo": ([*caption, tmp_path / "runs" / "captoin"], r"model folder not found: .*captoin"),
        "neither a folder nor a Hub id": ([*caption[:-1], "--model=-p"],
                                          r"--model -p: no such local folder, and not a Hub model id either"),
        "a data path typo": (["finetune", "--model", folder, "--data", "photos/trian", "--max_length", "64",
                              "--output_dir", tmp_path / "run"],  # 64: the tiny model's context is 512
                             r"data path 'photos/trian' does not exist; did you mean 'photos/train'\?"),
    }


@pytest.mark.parametrize("case", ["non-UTF-8 prompt", "config field of the wrong type", "derived value in a config",
                                  "weights that do not fit the config", "missing detokenizer/config.json",
                                  "a run folder as --model", "a model path typo", "neither a folder nor a Hub id",
                                  "a data path typo"])
def test_each_unclear_message_of_the_probe_now_names_the_problem(case, tmp_path, capsys, decoding_folder, photo_file,
                                                                 monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    argv, expected = unclear_message_cases(tmp_path, decoding_folder, photo_file)[case]
    code, _, err = run(capsys, *argv)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert re.search(expected, lines[0]), lines[0]


def test_one_line_keeps_the_reason_on_later_lines():
    from lavit.command_inputs import one_line

    error = ValueError("Error(s) in loading state_dict for X:\n\tsize mismatch for w: [2, 3] vs [2, 4]\n\n")
    assert one_line(error) == "ValueError: Error(s) in loading state_dict for X: size mismatch for w: [2, 3] vs [2, 4]"
    assert one_line(RuntimeError("\x1b[1mbold\x1b[0m " + "x" * 2000)).endswith("...")
    assert len(one_line(RuntimeError("x" * 2000))) < 900


@pytest.mark.parametrize(("value", "message"), [
    (5, "text must be a string or a non-empty list of strings, got int 5"),
    ([["a"]], "got list"),
    ("caf\udce9", "text 0 is not valid text"),
])
def test_text_inputs_are_checked_by_the_processor(lavit_processor, value, message):
    with pytest.raises(ValueError, match=message):
        lavit_processor(text=value)


def test_annotations_name_their_file_and_field(tmp_path):
    from lavit.evaluation.data import read_karpathy

    (tmp_path / "latin1.json").write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1.json is not UTF-8 text \(byte 0xe9 at offset 35\)"):
        read_karpathy(tmp_path / "latin1.json")
    (tmp_path / "number.json").write_text(json.dumps([{"image": "a.png", "caption": 5}]))
    # a bad record fails its own sample (reported by `lavit evaluate` with this reason), not the whole file
    (sample,) = read_karpathy(tmp_path / "number.json")
    assert re.search(r"number.json\[0\]: the caption must be a string or a list of strings, got 5", sample.problem)


@pytest.mark.slow
def test_an_adapter_folder_loads_in_every_model_command(tmp_path, capsys, decoding_folder, photo_file):
    """The TRL + LoRA recipe (README) saves a PEFT adapter folder (adapter_config.json, no config.json): `lavit
    caption` and `vqa` load it as its base model with the adapters merged (`evaluate`, `generate`, `reconstruct` and
    `export` use the same loader) and caption what the merged model captions; `tokenize` takes it too."""
    from lavit import LaVITForCausalLM, LaVITProcessor

    # adapters that change the answers
    model = write_lora_adapter(decoding_folder, tmp_path / "adapter", rank=4, seed=1)
    LaVITProcessor.from_pretrained(decoding_folder).save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    LaVITProcessor.from_pretrained(decoding_folder).save_pretrained(tmp_path / "merged")
    captions = {}
    for name in ("adapter", "merged", "base"):
        folder = decoding_folder if name == "base" else tmp_path / name
        code, out, err = run(capsys, "caption", photo_file, "--model", folder, "--max-new-tokens", 4, "--json")
        assert code == 0, err[-2000:]
        captions[name] = json.loads(out)[0]["caption"]
    assert captions["adapter"] == captions["merged"] != captions["base"], captions
    for argv in (["vqa", photo_file, "--question", "what?"], ["tokenize", photo_file]):
        code, _, err = run(capsys, *argv, "--model", tmp_path / "adapter", "--max-new-tokens" if argv[0] == "vqa"
                           else "--seed", 2 if argv[0] == "vqa" else 0)
        assert code == 0, err[-2000:]
    code, _, err = run(capsys, "export", tmp_path / "hub", "--model", tmp_path / "adapter")
    assert code == 0, err[-2000:]
    exported = LaVITForCausalLM.from_pretrained(tmp_path / "hub").state_dict()
    assert all(torch.equal(exported[name], tensor) for name, tensor in merged.state_dict().items())



def test_an_adapters_base_means_one_folder_from_wherever_it_is_loaded(tmp_path, monkeypatch, capsys, decoding_folder,
                                                                       photo_file):
    """PEFT records the base model as it was given: an adapter trained from `--model runs/final` names a relative
    path, which from another folder meant another model (any folder holding one at `runs/final`). lavit's fine-tuning
    records the base's absolute path; a relative one is looked for from the current folder and from the adapter's
    folder's ancestors: found from one, it is that one; found from both as two folders, it is refused naming both."""
    from types import SimpleNamespace

    from lavit.training.models import load_model_for_finetuning

    from lavit.command_inputs import CommandError, resolve_model_folder

    shutil.copytree(decoding_folder, tmp_path / "runs" / "final")
    monkeypatch.chdir(tmp_path)
    script_args = SimpleNamespace(model="runs/final", task="caption", qlora=False, lora=True, lora_r=4, lora_alpha=8,
                                  lora_dropout=0.0, lora_target_modules="q_proj,v_proj")
    model = load_model_for_finetuning(script_args, SimpleNamespace(gradient_checkpointing=False))
    model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "runs" / "final").resolve())
    adapter_config["base_model_name_or_path"] = "runs/final"  # what PEFT alone records
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    code, _, err = run(capsys, "caption", photo_file, "--model", "adapter", "--max-new-tokens", 2)
    assert code == 0, err[-2000:]
    base = (tmp_path / "runs" / "final").resolve()
    for folder in ("elsewhere", "other"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not found from here: the one from the adapter's folder
    assert resolve_model_folder(str(tmp_path / "adapter"))[1]["base_model_name_or_path"] == str(base)
    shutil.copytree(decoding_folder, tmp_path / "other" / "runs" / "final")  # another model at the same path
    monkeypatch.chdir(tmp_path / "other")
    code, _, err = run(capsys, "caption", photo_file, "--model", tmp_path / "adapter", "--max-new-tokens", 2)
    (line,) = error_lines(err)
    assert code == 1 and str(tmp_path / "adapter" / "adapter_config.json") in line, err[-2000:]
    assert all(where in line for where in (str(base), str((tmp_path / "other" / "runs" / "final").resolve()),
                                           "'runs/final'", "absolute path")), line
    adapter_config["base_model_name_or_path"] = "runs/nowhere"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(CommandError, match=r"'runs/nowhere', a relative path found neither from the current folder"):
        resolve_model_folder(str(tmp_path / "adapter"))

def test_the_skipped_share_is_enforced_in_one_place():
    from lavit.training.data import BadRecordCounter, TooManyBadRecordsError

    counter = BadRecordCounter(used=2)
    counter.skip("unreadable image", "record 3: truncated")
    counter.skip("unreadable image", "record 4: truncated")
    counter.check("data")  # exactly half: kept
    counter.skip("empty text", "record 5")
    with pytest.raises(TooManyBadRecordsError, match=r"data: more than 50% of the records are unusable: 2 used, 3 "
                                                     r"skipped of 5: 2 unreadable image \(e.g. record 3: truncated\)"):
        counter.check("data")
    with pytest.raises(TooManyBadRecordsError, match="no usable record: 0 used, 0 skipped of 0"):
        BadRecordCounter().check("training")


def test_every_image_reader_refuses_a_truncated_file_whatever_pil_is_told(tmp_path, monkeypatch):
    """Libraries set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` on import (lmms-eval does); lavit's readers still
    refuse a cut-off file instead of reading it with a grey end, and leave the flag as they found it."""
    import base64
    import io

    import datasets
    from lavit.processing.image_processing_lavit import to_rgb_image
    from lavit.training.data import BadRecordError, decode_image
    from PIL import ImageFile

    from lavit.evaluation.data import load_image, read_hf_dataset
    from lavit.serving.media import read_image_url
    from lavit.serving.schemas import OpenAIError

    buffer = io.BytesIO()
    Image.fromarray(next(iter(photo_images().values()))).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = tmp_path / "truncated.png"
    path.write_bytes(truncated)
    datasets.Dataset.from_dict({"id": ["a"], "image": [str(path)], "text": ["a photo"]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "dataset"))
    [sample] = read_hf_dataset(str(tmp_path / "dataset"), split="train")
    readers = {
        "to_rgb_image(path)": (lambda: to_rgb_image(path), ValueError),
        "to_rgb_image(bytes)": (lambda: to_rgb_image(truncated), ValueError),
        "training decode_image": (lambda: decode_image({"bytes": truncated, "path": None}), BadRecordError),
        "evaluation load_image(path)": (lambda: load_image(str(path)), ValueError),
        "evaluation load_image(dataset row)": (lambda: load_image(sample.image), ValueError),
        "serve data URL": (lambda: read_image_url("data:image/png;base64," + base64.b64encode(truncated).decode(),
                                                  "messages", 10**8, None), OpenAIError),
    }
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name, (read, error) in readers.items():
        with pytest.raises(error):
            read()
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True, name


@pytest.mark.parametrize("dtype", ["", "float8_e4m3fn", "bf16"])
def test_every_reader_of_a_dtype_refuses_an_empty_or_unusable_one_naming_it(dtype, lavit_folder, pipeline_folder,
                                                                              tmp_path):
    """Every way a dtype is given in Python goes through `floating_dtype`: an empty one is a mistake, never "the
    default" (the server, the lmms-eval model and the pipeline loaded float32 for ""), and float8 is refused by name
    rather than failing deep inside torch."""
    from lavit.hub_cards.convert import convert_release_folder

    from lavit import LaVITPipeline
    from lavit.serving.engine import LaVITEngine

    release = tmp_path / "release"
    (release / "language_model").mkdir(parents=True)
    (release / "visual_tokenizer").mkdir()
    readers = {"LaVITEngine": lambda: LaVITEngine(str(lavit_folder), device="cpu", dtype=dtype),
               "LaVITPipeline": lambda: LaVITPipeline.from_pretrained(pipeline_folder, torch_dtype=dtype),
               "convert_release_folder": lambda: convert_release_folder(release, dtype=dtype)}
    if importlib.util.find_spec("lmms_eval") is not None:  # installed by `make test-peers`
        from lavit.evaluation.lmms_eval_model import LaVITLmms

        readers["LaVITLmms"] = lambda: LaVITLmms(str(lavit_folder), device="cpu", dtype=dtype)
    for name, read in readers.items():
        with pytest.raises(ValueError, match=f"must be float32, bfloat16, float16 or float64.*got '{dtype}'"):
            read()
            pytest.fail(f"{name} took dtype {dtype!r}")
    with pytest.raises(ValueError, match=r"^dtype \(or 'auto'\) must be"):  # the argument the caller gave is named
        LaVITPipeline.from_pretrained(pipeline_folder, dtype=dtype)
