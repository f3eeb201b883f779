"""`lavit.evaluation.runner` at unit level: the generation settings a config resolves to, the predictions file
(reading, cutting a crashed tail, retrying failures), what a prediction is keyed by, sharding, post-processing
rules, scoring what is on disk into `results.json`, and the model-card rows; nothing here runs a model."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lavit.evaluation.data import EvalSample
from lavit.evaluation.metrics import metric_module
from lavit.evaluation.runner import (
    CAPTION_GENERATION,
    RESULTS_FILE,
    EvalConfig,
    PredictionWriter,
    answer_postprocess,
    caption_postprocess,
    card_rows,
    file_sha256,
    has_predictions,
    pending_batches,
    predict_isolated,
    read_predictions,
    record_results,
    sample_digest,
    score,
    shard,
)

# scoring goes through the packaged `evaluate` module; loading it once here keeps the import of evaluate and
# datasets out of the tests' own time
metric_module("vqa_accuracy")


def write_lines(path, *lines: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


# ------------------------------------------------------------------------------------------------ config


def test_overrides_replace_the_official_settings_and_a_lower_maximum_lowers_the_minimum():
    settings = EvalConfig("caption", generation={"max_new_tokens": 4}).generation_settings()
    assert settings["max_new_tokens"] == settings["min_new_tokens"] == 4 and settings["num_beams"] == 2
    assert EvalConfig("caption", generation={"num_beams": 1}).generation_settings()["min_new_tokens"] == 8
    assert CAPTION_GENERATION["min_new_tokens"] == 8  # resolving never changes the shared defaults
    assert EvalConfig("vqa", generation={"max_new_tokens": 1}).generation_settings()["min_new_tokens"] == 1
    image_settings = EvalConfig("text-to-image").generation_settings()
    assert "min_new_tokens" not in image_settings and image_settings["num_inference_steps"] == 50


@pytest.mark.parametrize(("fields", "named"), [({"task": "captioning"}, "task"), ({"batch_size": 0}, "batch_size"),
                                               ({"vqa_metric": "bleu"}, "vqa_metric"),
                                               ({"num_candidates": 0, "clip_model": "clip"}, "num_candidates")])
def test_a_bad_config_field_is_refused_by_name(fields, named):
    with pytest.raises(ValueError, match=named):
        EvalConfig(**{"task": "caption", **fields})


# ------------------------------------------------------------------------------------------------ predictions file


def test_a_prediction_wins_over_a_failure_whichever_file_holds_it(tmp_path):
    prediction, failed = '{"id": 7, "prediction": "a cat"}\n', '{"id": "7", "error": "ValueError: bad"}\n'
    for first, second in ((prediction, failed), (failed, prediction)):
        folder = tmp_path / str(len(first))
        write_lines(folder / "predictions-00000.jsonl", first)
        write_lines(folder / "predictions-00001.jsonl", second)
        assert read_predictions(folder) == {"7": {"id": 7, "prediction": "a cat"}}  # ids are keyed as text


def test_a_cut_last_line_is_ignored_but_a_broken_line_elsewhere_is_named(tmp_path):
    path = write_lines(tmp_path / "predictions-00000.jsonl", '{"id": "1", "prediction": "a"}\n', "\n",
                       '{"id": "2", "predic')
    assert list(read_predictions(tmp_path)) == ["1"]
    write_lines(path, '{"id": "1", "prediction": "a"}\n', '{"id": "2", "predic\n', '{"id": "3", "prediction": "c"}\n')
    with pytest.raises(ValueError, match=r"predictions-00000\.jsonl:2 is not a JSON line"):
        read_predictions(tmp_path)


def test_the_writer_cuts_the_tail_a_crash_left_before_appending(tmp_path):
    path = write_lines(tmp_path / "predictions-00000.jsonl", '{"id": "1", "prediction": "a"}\n', '{"id": "2", "pr')
    with PredictionWriter(path) as writer:
        writer.write({"id": "3", "prediction": "ü"})
    assert path.read_text(encoding="utf-8").splitlines() == ['{"id": "1", "prediction": "a"}',
                                                             '{"id": "3", "prediction": "ü"}']
    assert has_predictions(tmp_path)
    write_lines(tmp_path / "empty" / "predictions-00000.jsonl", "")
    assert not has_predictions(tmp_path / "empty")


def test_failed_samples_are_pending_again_and_batches_keep_data_order(tmp_path):
    samples = [EvalSample(str(index), question=f"q{index}") for index in range(6)]
    with PredictionWriter(tmp_path / "predictions-00000.jsonl") as writer:
        writer.write({"id": "1", "prediction": "yes", "input": sample_digest(samples[1])})
        writer.write({"id": "4", "error": "FileNotFoundError: image not found"})
    batches = pending_batches(samples, tmp_path, batch_size=2)
    assert [[sample.id for sample in batch] for batch in batches] == [["0", "2"], ["3", "4"], ["5"]]


def test_shards_take_every_batch_once_round_robin_with_its_index():
    batches = [[index] for index in range(5)]
    shards = [shard(batches, process, 2) for process in range(2)]
    assert [index for index, _ in shards[0]] == [0, 2, 4] and [index for index, _ in shards[1]] == [1, 3]
    assert sorted(batch[0] for pairs in shards for _, batch in pairs) == list(range(5))
    assert shard(batches, 0, 1) == list(enumerate(batches))


# ------------------------------------------------------------------------------------------------ sample identity


def test_a_sample_is_keyed_by_its_image_content_question_and_prompt(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "b.png")
    base = sample_digest(EvalSample("1", str(tmp_path / "a.png"), question="what colour?"))
    assert sample_digest(EvalSample("1", str(tmp_path / "copy.png"), question="what colour?")) == base
    for other in (EvalSample("1", str(tmp_path / "b.png"), question="what colour?"),
                  EvalSample("2", str(tmp_path / "a.png"), question="what colour?"),
                  EvalSample("1", str(tmp_path / "a.png"), question="what shape?"),
                  EvalSample("1", str(tmp_path / "a.png"), question="what colour?", text="a prompt")):
        assert sample_digest(other) != base
    pixels = np.zeros((4, 4, 3), np.uint8)
    in_memory = sample_digest(EvalSample("1", Image.fromarray(pixels)))
    assert sample_digest(EvalSample("1", Image.fromarray(pixels.copy()))) == in_memory
    pixels[0, 0, 0] = 1
    assert sample_digest(EvalSample("1", Image.fromarray(pixels))) != in_memory


def test_file_sha256_is_the_digest_of_the_bytes_or_none_without_a_file(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"lavit")
    assert file_sha256(tmp_path / "file.bin") == hashlib.sha256(b"lavit").hexdigest()
    assert file_sha256(str(tmp_path / "file.bin")) == hashlib.sha256(b"lavit").hexdigest()
    assert file_sha256(tmp_path / "missing.bin") is None and file_sha256(tmp_path) is None
    assert file_sha256(Image.new("RGB", (1, 1))) is None
    # a missing image still keys its sample, by its path
    assert (sample_digest(EvalSample("1", str(tmp_path / "x.png")))
            != sample_digest(EvalSample("1", str(tmp_path / "y.png"))))


def test_samples_that_fail_their_checks_never_reach_the_model(tmp_path):
    config = EvalConfig("vqa")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    batch = [EvalSample("missing", str(tmp_path / "none.png"), question="q"),
             EvalSample("no-question", str(tmp_path / "photo.png"), question=" "),
             EvalSample("bad-record", str(tmp_path / "photo.png"), question="q", problem="the answers are not text")]
    records = predict_isolated(None, None, batch, config, 0, tmp_path)  # no model: it must not be called
    assert [record["id"] for record in records] == ["missing", "no-question", "bad-record"]
    assert records[0]["error"].startswith("FileNotFoundError: image not found")
    assert "question must be non-empty text" in records[1]["error"]
    assert records[2]["error"] == "ValueError: the answers are not text"


# ------------------------------------------------------------------------------------------------ post-processing


def test_answer_rules_strip_stacked_prefixes_but_only_whole_words():
    assert answer_postprocess("It is the red bus") == "red bus"
    assert answer_postprocess("they are very big.") == "big"
    assert answer_postprocess("anteater") == "anteater" and answer_postprocess("tomato") == "tomato"
    assert answer_postprocess("I do not know.") == "unanswerable" and answer_postprocess("the") == "the"
    assert answer_postprocess("blue Long answer: the sky is blue") == "blue"
    assert answer_postprocess(" yes\nno, it is not") == "yes"  # only the first line counts
    assert caption_postprocess("  a dog runs  ") == "a dog runs" and caption_postprocess(".") == ""


# ------------------------------------------------------------------------------------------------ scoring


def vqa_samples():
    return [EvalSample(key, f"{key}.png", question="how many?", references=answers)
            for key, answers in (("a", ["2"] * 10), ("b", ["yes"] * 2 + ["no"] * 8), ("c", ["red"] * 10))]


def test_score_counts_the_samples_that_ran_and_lists_the_failed_in_data_order(tmp_path):
    write_lines(tmp_path / "predictions-00000.jsonl", '{"id": "c", "error": "OSError: truncated"}\n',
                '{"id": "a", "prediction": "two"}\n', '{"id": "b", "prediction": "yes"}\n')
    config = EvalConfig("vqa", name="VQAv2 val", dataset_type="HuggingFaceM4/VQAv2", split="validation")
    results = score(vqa_samples(), config, tmp_path)
    # "two" = "2" by all 10 humans: 1; "yes" said by 2 of 10: (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    assert results["metrics"] == {"vqa_accuracy": pytest.approx(100 * (1 + 0.6) / 2)}
    assert results["count"] == 2 and results["failed"] == [{"id": "c", "error": "OSError: truncated"}]
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == json.loads(json.dumps(results))
    [row] = results["evaluation"]
    assert row["value"] == 80.0 and row["data"] == "VQAv2 val (2 samples, zero-shot)"
    assert row["task_type"] == "visual-question-answering" and row["dataset_split"] == "validation"


def test_score_refuses_samples_without_predictions_and_reports_when_nothing_can_be_scored(tmp_path):
    write_lines(tmp_path / "predictions-00000.jsonl", '{"id": "a", "error": "ValueError: x"}\n')
    with pytest.raises(ValueError, match=r"2 sample\(s\) have no prediction.*\['b', 'c'\]"):
        score(vqa_samples(), EvalConfig("vqa"), tmp_path)
    results = score(vqa_samples()[:1], EvalConfig("vqa"), tmp_path)
    assert results["metrics"] == {} and results["unavailable"] == {"all": "every sample failed"}
    write_lines(tmp_path / "predictions-00000.jsonl", '{"id": "a", "prediction": "two"}\n')
    unlabelled = [EvalSample("a", "a.png", question="how many?")]
    results = score(unlabelled, EvalConfig("vqa"), tmp_path)
    assert results["count"] == 1 and "no references" in results["unavailable"]["all"]
    assert results["evaluation"] == []


def test_card_rows_round_to_two_places_and_name_the_metric_type():
    config = EvalConfig("text-to-image", name="MS-COCO text-to-image", dataset_type="coco", split="validation")
    rows = card_rows({"FID": 7.2349, "CLIP score": 31.005}, config, 30000)
    assert [(row["metric"], row["value"], row["metric_type"]) for row in rows] == [
        ("FID", 7.23, "fid"), ("CLIP score", 31.0, "clip_score")]
    assert {row["task_type"] for row in rows} == {"text-to-image"}
    assert rows[0]["data"] == "MS-COCO text-to-image (30000 samples, zero-shot)"


def test_recording_results_replaces_only_rows_of_the_same_metric_and_benchmark(tmp_path):
    old = [{"metric": "CIDEr", "value": 1.0, "dataset_name": "COCO"},
           {"metric": "BLEU-4", "value": 2.0, "dataset_name": "COCO"},
           {"metric": "CIDEr", "value": 3.0, "dataset_name": "NoCaps"}]
    (tmp_path / "lavit_run.json").write_text(json.dumps({"stage": 2, "evaluation": old}))
    path = record_results(tmp_path, {"evaluation": [{"metric": "CIDEr", "value": 9.0, "dataset_name": "COCO"}]})
    metadata = json.loads(path.read_text())
    assert metadata["stage"] == 2
    assert metadata["evaluation"] == [old[1], old[2], {"metric": "CIDEr", "value": 9.0, "dataset_name": "COCO"}]
    assert record_results(tmp_path / "new", {"evaluation": old[:1]}) == tmp_path / "new" / "lavit_run.json"
