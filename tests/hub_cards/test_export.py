"""`lavit.hub_cards.export` at unit level: the run metadata it reads, the `model-index` rows it builds, the model card
rendered from a model and its metadata (and the defaults without any), the problems a Hub folder is checked for
(missing files, weights and shards, per part of a pipeline folder), and the refusals of `export_model` and
`push_to_hub` that come before any model is loaded, anything is written or the Hub is called (a whole export is
tests/test_file_kinds.py's)."""
import json

import pytest
from lavit.hub_cards.export import (
    DEFAULT_INTENDED_USES,
    DEFAULT_LIMITATIONS,
    METADATA_FILE,
    NOT_RECORDED,
    PIPELINE_FOLDERS,
    REQUIRED_FILES,
    check_export_folder,
    eval_results,
    export_model,
    missing_files,
    model_card,
    push_to_hub,
    read_metadata,
)

from lavit.atomic import NotLavitFolderError
from lavit.paths import PathConflictError

RECORDED_ROW = {"metric": "CIDEr", "value": 0.5, "data": "20 photos", "task_type": "image-to-text",
                "dataset_type": "coco", "dataset_name": "COCO captions", "metric_type": "cider"}


def test_metadata_is_empty_without_the_file_and_its_json_otherwise(tmp_path):
    assert read_metadata(tmp_path) == {}
    (tmp_path / METADATA_FILE).write_text(json.dumps({"model_name": "Tiny", "datasets": ["photos"]}))
    assert read_metadata(tmp_path) == {"model_name": "Tiny", "datasets": ["photos"]}


def test_metadata_that_is_not_json_is_refused_naming_the_file(tmp_path):
    (tmp_path / METADATA_FILE).write_text("{'model_name': 'Tiny'}")
    with pytest.raises(ValueError, match=rf"{METADATA_FILE} is not valid JSON"):
        read_metadata(tmp_path)


def test_only_rows_naming_their_task_and_dataset_become_model_index_results():
    plain = {"metric": "caption accuracy", "value": "0.50", "data": "held-out photos"}
    assert eval_results([plain]) is None and eval_results([]) is None
    unnamed_metric = {key: value for key, value in RECORDED_ROW.items() if key != "metric_type"}
    [result] = eval_results([plain, RECORDED_ROW, unnamed_metric])
    assert (result.task_type, result.dataset_type, result.dataset_name) == ("image-to-text", "coco", "COCO captions")
    assert (result.metric_type, result.metric_name, result.metric_value) == ("cider", "CIDEr", 0.5)
    assert result.dataset_split is None  # optional
    assert eval_results([{**RECORDED_ROW, "dataset_split": "val"}])[0].dataset_split == "val"


def test_a_card_without_metadata_says_what_was_not_recorded_and_gives_the_defaults(lavit_model):
    card = str(model_card(lavit_model, {}))
    text_vocab_size = lavit_model.config.text_vocab_size
    for text in ("# LaVIT\n", DEFAULT_INTENDED_USES, DEFAULT_LIMITATIONS, "license: apache-2.0",
                 'from_pretrained("path/to/this/folder", trust_remote_code=True)', f"`[IMG]` = {text_vocab_size}",
                 f"({lavit_model.config.tokenizer_config.codebook_size} codes)"):
        assert text in card, text
    assert card.count(NOT_RECORDED) >= 3  # training data, training stages, token statistics
    assert "DiffusionPipeline" not in card and "model-index" not in card  # no pixel decoder, no recorded rows
    count = sum(parameter.numel() for parameter in lavit_model.model.language_model.parameters())
    assert count < 1e8 and f"| language model | llama, {count / 1e6:.2f}M parameters |" in card  # in millions


def test_a_card_renders_the_runs_metadata_and_its_recorded_rows_as_model_index(lavit_model):
    metadata = {"model_name": "Tiny LaVIT", "summary": "A test model.", "license": "mit", "datasets": ["photos"],
                "training_data": "three photos", "token_statistics": "12.0 tokens per image",
                "training_stages": [{"name": "stage 1", "description": "ten steps"}],
                "evaluation": [RECORDED_ROW], "limitations": "Only a test."}
    card = model_card(lavit_model, metadata, repo_id="someone/tiny")
    text = str(card)
    for expected in ("# Tiny LaVIT", "A test model.", "license: mit", "- photos", "three photos",
                     "12.0 tokens per image", "- **stage 1**: ten steps", "| CIDEr | 0.5 | 20 photos |",
                     "Only a test.", '"someone/tiny"', "model-index"):
        assert expected in text, expected
    assert NOT_RECORDED not in text and DEFAULT_LIMITATIONS not in text
    assert card.data.eval_results[0].dataset_name == "COCO captions"


def write_index(folder, shards: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {f"weight{index}": shard for index, shard in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_missing_files_names_missing_files_weights_and_shards_with_their_part(tmp_path):
    write_index(tmp_path / "unet", ["part-1.safetensors", "part-2.safetensors"])
    (tmp_path / "unet" / "part-1.safetensors").write_bytes(b"")
    assert missing_files(tmp_path, ("config.json",), "unet") == ["missing unet/config.json",
                                                                 "missing shard unet/part-2.safetensors"]
    (tmp_path / "vae").mkdir()
    assert missing_files(tmp_path, (), "vae") == [
        "missing weights (vae/model.safetensors or vae/model.safetensors.index.json)"]
    assert missing_files(tmp_path, (), "vae", weights=False) == []


def test_an_empty_folder_is_refused_naming_every_missing_file(tmp_path):
    with pytest.raises(ValueError, match="is not a complete LaVIT Hub folder") as error:
        check_export_folder(tmp_path)
    message = str(error.value)
    assert all(f"missing {name}" in message for name in REQUIRED_FILES)
    assert "missing weights (model.safetensors" in message


def test_a_pipeline_folder_is_checked_part_by_part(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline_lavit", "LaVITPipeline"]}))
    with pytest.raises(ValueError) as error:
        check_export_folder(tmp_path)
    message = str(error.value)
    for name, required in PIPELINE_FOLDERS.items():
        assert all(f"missing {name}/{file}" in message for file in required), name
    assert "missing weights (unet/" in message and "missing weights (scheduler/" not in message
    assert "missing weights (processor/" not in message
    assert "missing config.json" not in message.replace("/config.json", "")  # a pipeline has none at its root


def test_push_checks_the_folder_before_calling_the_hub(tmp_path):
    with pytest.raises(ValueError, match="missing config.json"):
        push_to_hub(tmp_path, "someone/lavit-test")


@pytest.fixture
def config_only(tmp_path):
    """A folder that looks like a model folder: the refusals come before its model is loaded."""
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    return source


def test_export_refuses_a_source_without_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model folder \\(no config.json\\)"):
        export_model(tmp_path, tmp_path / "hub")


def test_export_refuses_a_destination_inside_its_source(config_only):
    with pytest.raises(PathConflictError, match="the export folder .* lies inside the input source"):
        export_model(config_only, config_only / "hub")


def test_export_refuses_to_replace_a_folder_lavit_did_not_make(config_only, tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "notes.txt").write_text("mine")
    with pytest.raises(NotLavitFolderError, match="not made by lavit"):
        export_model(config_only, tmp_path / "hub")
    assert [path.name for path in (tmp_path / "hub").iterdir()] == ["notes.txt"]
    assert not (tmp_path / "hub.tmp").exists()
