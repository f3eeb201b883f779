"""Issue 24 (S1, U4): every join of annotation records (captions to images, answers to questions, references to
samples) counts what does not match and refuses, rather than scoring a silently smaller set; ids are integers or
strings, `3.0` is `3`, and anything else is named with its file and field.

The joins are found from the readers' source: every reader that builds a lookup table of one list to join another
must call `check_matched`."""

import ast
import inspect
import json
import logging

import pytest

import lavit.evaluation.data as data
from lavit.cli import main
from lavit.evaluation.data import UnmatchedRecordsError, check_samples, load_samples


def coco(images, captions) -> dict:
    return {"images": [{"id": key, "file_name": f"{index}.jpg"} for index, key in enumerate(images)],
            "annotations": [{"image_id": key, "caption": f"caption {index}"} for index, key in enumerate(captions)]}


def vqa(questions, answers) -> tuple[dict, dict]:
    return ({"data_subtype": "val2014", "questions": [{"question_id": key, "image_id": 1, "question": "q?"}
                                                      for key in questions]},
            {"annotations": [{"question_id": key, "answers": [{"answer": "yes"}]} for key in answers]})


def load(tmp_path, format, left, right, **kwargs):
    """`format`'s loader on files whose two joined lists hold the ids `left` (images, questions) and `right`
    (captions, answers)."""
    if format == "coco":
        (tmp_path / "coco.json").write_text(json.dumps(coco(left, right)))
        return load_samples("coco", annotations=tmp_path / "coco.json", images=tmp_path, **kwargs)
    questions, answers = vqa(left, right)
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    return load_samples("vqav2", questions=tmp_path / "questions.json", annotations=tmp_path / "answers.json",
                        images=tmp_path, **kwargs)


JOINS = {"coco": "read_coco_captions", "vqav2": "read_vqav2"}


def test_every_reader_that_joins_two_lists_checks_the_join():
    joining = set()
    for name, function in inspect.getmembers(data, inspect.isfunction):
        if not name.startswith("read_"):
            continue
        tree = ast.parse(inspect.getsource(function))
        builds_lookup = any(isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Dict)
                            for node in ast.walk(tree))
        checks = any(isinstance(node, ast.Call) and getattr(node.func, "id", "") == "check_matched"
                     for node in ast.walk(tree))
        assert checks or not builds_lookup, f"{name} joins two lists without check_matched"
        if builds_lookup:
            joining.add(name)
    assert joining == set(JOINS.values())


@pytest.mark.parametrize("format", JOINS)
@pytest.mark.parametrize("left, right, unmatched", [
    ([1, 2], [1, 2, 3], "matches no"),  # a caption of no image / an annotation of no question
    ([1, 2, 3], [1, 2], "without"),  # an image without captions / a question without an annotation
])
def test_unmatched_records_stop_the_load_with_their_count(tmp_path, caplog, format, left, right, unmatched):
    if format == "vqav2":
        unmatched = "of no question" if unmatched == "matches no" else "without an annotation"
    with pytest.raises(UnmatchedRecordsError, match=rf"1 [^;]*{unmatched}.*\['3'\].*--allow-unmatched"):
        load(tmp_path, format, left, right)
    with caplog.at_level(logging.WARNING):
        samples = load(tmp_path, format, left, right, allow_unmatched=True)
    assert [sample.id for sample in samples] == ["1", "2"] and "dropped 1" in caplog.text
    assert [sample.id for sample in load(tmp_path, format, [1, 2], [2, 1])] == ["1", "2"]


@pytest.mark.parametrize("format", JOINS)
def test_ids_are_integers_or_strings_and_a_whole_float_is_the_integer(tmp_path, format):
    samples = load(tmp_path, format, [3, 4], [3.0, "4"])
    assert [(sample.id, len(sample.references)) for sample in samples] == [("3", 1), ("4", 1)]
    for bad in (3.5, 2.0**53 + 2, True, None, [3], {"id": 3}):  # 2**53 + 2: a float that may be another integer
        with pytest.raises(ValueError, match=r"(image_id|question_id): an id must be an integer or a string, got"):
            load(tmp_path, format, [3], [bad])
        with pytest.raises(ValueError, match=r"\.(id|question_id): an id must be"):
            load(tmp_path, format, [bad], [3])


def test_evaluate_refuses_a_caption_of_no_image_with_one_line(tmp_path, capsys):
    (tmp_path / "coco.json").write_text(json.dumps(coco([1, 2], [1, 2, 9])))
    (tmp_path / "images").mkdir()
    code = main(["evaluate", "nocaps", "--annotations", str(tmp_path / "coco.json"),
                 "--images", str(tmp_path / "images"), "--model", str(tmp_path / "no-model"),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "1 caption(s) whose image_id matches no image" in err[0], err
    assert not (tmp_path / "out").exists()


def test_scores_are_never_computed_on_the_samples_that_have_references_only():
    with_and_without = [data.EvalSample("1", __file__, references=["a"]), data.EvalSample("2", __file__)]
    with pytest.raises(UnmatchedRecordsError, match="1 of 2 samples have no references"):
        check_samples(with_and_without, "caption")
    check_samples([data.EvalSample("1", __file__), data.EvalSample("2", __file__)], "caption")  # a test split
