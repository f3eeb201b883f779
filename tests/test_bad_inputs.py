"""Nothing silently wrong: bad records are skipped and counted exactly (dataloader workers, warm caches), user text
never becomes control ids, bad arguments get a message naming the argument and its range, and publishing checks
file contents and never follows a link out of the folder."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import text_vocab_size, tiny_lavit_config, training_args, write_tiny_language_model
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


def test_pickles_are_found_by_content_and_links_out_are_refused(lavit_folder, tmp_path):
    import bz2
    import gzip
    import lzma
    import zlib

    from lavit.hub_cards import check_export_folder, export_model, push_to_hub

    hub = export_model(lavit_folder, tmp_path / "hub")
    payload = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)
    pickles = {"a.ckpt": pickle.dumps({"a": 1}, protocol=2), "b.pickle": payload, "c.PT": payload,
               "d.txt": pickle.dumps({"a": [1, 2]}, protocol=0), "e.joblib": zlib.compress(payload),
               "f.joblib": gzip.compress(payload), "g.joblib": bz2.compress(payload),
               "h.joblib": lzma.compress(payload)}
    for name, data in pickles.items():
        (hub / name).write_bytes(data)
    torch.save({"w": torch.zeros(2)}, hub / "i.safetensors")  # a torch zip under a safe name
    np.save(hub / "j.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(hub / "plain.npy", np.zeros(3))  # numbers only: fine
    (tmp_path / "secret.txt").write_text("not for the Hub")
    (hub / "notes.txt").symlink_to(tmp_path / "secret.txt")
    (hub / "inside.md").symlink_to(hub / "README.md")  # a link within the folder: fine
    with pytest.raises(ValueError) as error:
        check_export_folder(hub)
    problems = str(error.value)
    for name in [*pickles, "i.safetensors", "j.npy"]:
        assert f"{name} is a pickle" in problems, name
    assert "notes.txt links outside the folder" in problems
    assert "plain.npy" not in problems and "inside.md" not in problems and "README.md" not in problems
    with pytest.raises(ValueError, match="links outside the folder"):  # checked before any Hub call
        push_to_hub(hub, "someone/lavit-test")


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
