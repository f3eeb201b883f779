"""folders_lavit.py: what a local folder holds, read from its JSON files alone: whether it is a saved LaVITPipeline,
its config.json, and which LaVIT language model (and processor folder) it means, for folders written here as plain
JSON files (no model is built)."""

import json

import pytest
from lavit.modeling.folders_lavit import (
    LANGUAGE_MODEL_TYPE,
    PIPELINE_CLASS,
    PROCESSOR_FILES,
    is_lavit_pipeline_folder,
    language_model_folders,
    saved_config,
)


def write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def model_folder(folder, processor=True):
    write_json(folder / "config.json", {"model_type": LANGUAGE_MODEL_TYPE})
    if processor:
        write_json(folder / "preprocessor_config.json", {})
    return folder


def pipeline_folder(folder, language_model=True):
    write_json(folder / "model_index.json", {"_class_name": PIPELINE_CLASS})
    if language_model:
        model_folder(folder / "language_model", processor=False)
    write_json(folder / "processor" / "processor_config.json", {})
    return folder


@pytest.mark.parametrize("class_name, expected", [
    (PIPELINE_CLASS, True), (["lavit", PIPELINE_CLASS], True), ("StableDiffusionPipeline", False),
    (["diffusers", "StableDiffusionPipeline"], False), ([], False), (None, False),
])
def test_a_pipeline_folder_is_told_by_the_class_its_model_index_names(tmp_path, class_name, expected):
    write_json(tmp_path / "model_index.json", {"_class_name": class_name})
    assert is_lavit_pipeline_folder(tmp_path) is expected


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"\"LaVITPipeline\""])
def test_an_unreadable_model_index_is_no_pipeline_and_no_crash(tmp_path, content):
    (tmp_path / "model_index.json").write_bytes(content)
    assert is_lavit_pipeline_folder(tmp_path) is False
    assert is_lavit_pipeline_folder(tmp_path / "missing") is False


def test_saved_config_reads_a_json_object_and_none_otherwise(tmp_path):
    assert saved_config(model_folder(tmp_path / "model")) == {"model_type": LANGUAGE_MODEL_TYPE}
    assert saved_config(tmp_path / "missing") is None
    assert saved_config("org/some-hub-id") is None
    for name, content in {"array": b"[1]", "broken": b"{", "binary": b"\xff"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(content)
        assert saved_config(tmp_path / name) is None, name
    (tmp_path / "a_folder" / "config.json").mkdir(parents=True)
    assert saved_config(tmp_path / "a_folder") is None


def test_a_model_folder_means_itself_with_its_processor_beside_it(tmp_path):
    folder = model_folder(tmp_path / "model")
    assert language_model_folders(folder) == (folder, folder)
    assert language_model_folders(str(folder)) == (folder, folder)


def test_both_processor_files_count_and_the_check_can_be_skipped(tmp_path):
    folder = model_folder(tmp_path / "model", processor=False)
    with pytest.raises(ValueError, match="holds no processor") as error:
        language_model_folders(folder)
    assert all(name in str(error.value) for name in PROCESSOR_FILES)
    assert f"processor.save_pretrained({str(folder)!r})" in str(error.value)
    assert language_model_folders(folder, with_processor=False) == (folder, folder)
    write_json(folder / PROCESSOR_FILES[0], {})
    assert language_model_folders(folder) == (folder, folder)


def test_a_pipeline_and_its_language_model_folder_mean_the_same_model(tmp_path):
    pipeline = pipeline_folder(tmp_path / "pipeline")
    expected = (pipeline / "language_model", pipeline / "processor")
    assert language_model_folders(pipeline) == expected
    assert language_model_folders(pipeline / "language_model") == expected


def test_a_link_to_a_pipelines_language_model_means_that_sub_folder(tmp_path):
    pipeline = pipeline_folder(tmp_path / "pipeline")
    link = tmp_path / "my_model"
    link.symlink_to(pipeline / "language_model", target_is_directory=True)
    assert language_model_folders(link) == (pipeline / "language_model", pipeline / "processor")


def test_a_language_model_folder_outside_a_pipeline_is_a_model_folder(tmp_path):
    folder = model_folder(tmp_path / "language_model")  # named so, but no pipeline around it
    assert language_model_folders(folder) == (folder, folder)


def test_a_pipeline_without_a_language_model_is_refused_naming_the_fix(tmp_path):
    pipeline = pipeline_folder(tmp_path / "pipeline", language_model=False)
    with pytest.raises(ValueError, match="LaVITPipeline folder without a language model .* give the folder of a "
                                         "LaVIT model"):
        language_model_folders(pipeline, with_processor=False)


@pytest.mark.parametrize("config", [{"model_type": "lavit_tokenizer"}, {"model_type": "llama"}, {}, None])
def test_a_folder_of_another_model_is_none(tmp_path, config):
    if config is not None:
        write_json(tmp_path / "config.json", config)
    assert language_model_folders(tmp_path) is None
    assert language_model_folders(tmp_path / "missing") is None
