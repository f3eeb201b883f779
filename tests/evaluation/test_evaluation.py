"""`lavit.evaluation` and `lavit evaluate`: the metrics against values worked out by hand or computed independently,
the readers on small files in each official format, and resumable, sharded runs of a tiny LaVIT model."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import real_photos, tiny_clip, tiny_detokenizer_config
from PIL import Image
from scipy import linalg

from lavit.cli import main
from lavit.evaluation import (
    EvalConfig,
    EvalSample,
    caption_metrics,
    clip_score,
    evaluate,
    fid_score,
    load_samples,
    normalize_vqa_answer,
    read_predictions,
    record_results,
    score,
    vqa_accuracy,
)
from lavit.evaluation.data import load_image
from lavit.evaluation.metrics import clip_similarities, metric_module
from lavit.evaluation.runner import (
    TASK_TYPES,
    answer_postprocess,
    caption_postprocess,
    pending_batches,
    run_batches,
    shard,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ------------------------------------------------------------------------------------------------ metrics

COCO = metric_module("coco_caption")  # the helpers the evaluate module's compute uses
java_available, java_ptb_tokenize, python_ptb_tokenize = (COCO.java_available, COCO.java_ptb_tokenize,
                                                          COCO.python_ptb_tokenize)
HFImageFeatures = metric_module("fid").HFImageFeatures


def test_caption_metrics_match_hand_computed_cider_bleu_and_rouge():
    # three images with disjoint words; only the first prediction overlaps its reference (3 of 4 words, in order).
    # CIDEr-D of image 1: n-gram cosines 3/4, 2/3, 1/2, 0 (every n-gram has the same idf, equal lengths, no
    # clipping), mean x 10 = 4.7917; images 2 and 3 score 0, so CIDEr = 4.7917 / 3 -> 159.72 on the paper's scale.
    references = {"1": ["black cat sleeps quietly"], "2": ["red bus drives downtown"],
                  "3": ["green apple falls slowly"]}
    predictions = {"1": "Black cat sleeps outside.", "2": "two birds fly south", "3": "nothing matches here either"}
    result = caption_metrics(predictions, references, use_java=False)
    metrics = result["metrics"]
    assert metrics["CIDEr"] == pytest.approx(100 * 10 * (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4 / 3)
    assert metrics["BLEU-1"] == pytest.approx(100 * 3 / 12)  # 3 of 12 words match, brevity penalty 1
    assert metrics["ROUGE-L"] == pytest.approx(100 * 0.75 / 3)  # LCS 3 of 4 on image 1, 0 elsewhere
    assert result["tokenizer"] == "ptb-python"
    assert set(result["unavailable"]) == {"METEOR", "SPICE"}
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics({"4": "a dog"}, references, use_java=False)


@pytest.mark.skipif(not java_available(), reason="needs Java (pycocoevalcap's Stanford PTB tokenizer)")
def test_python_tokenizer_matches_the_java_ptb_tokenizer():
    captions = {"a": ["A man's dog, running on the beach.", "Two people (a woman and a child) sit on a bench!"],
                "b": ["The cat doesn't like the 3-year-old's toys; it hides.", "A 'red' bus -- parked near trees?",
                      'He said "hi there" to the [big] dog', "I can't see Mr. Smith's car: it's GONE..."]}
    assert python_ptb_tokenize(captions) == java_ptb_tokenize(captions)


def test_vqa_accuracy_follows_the_official_leave_one_out_rule():
    def answers(matching: int, answer: str = "yes") -> list[str]:
        return [answer] * matching + ["no"] * (10 - matching)

    # with k humans agreeing, 10 - k subsets keep all k and k subsets keep k - 1; each scores min(count / 3, 1)
    assert vqa_accuracy("yes", answers(0)) == 0.0
    assert vqa_accuracy("yes", answers(1)) == pytest.approx((9 * 1 / 3 + 1 * 0) / 10)
    assert vqa_accuracy("yes", answers(2)) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("yes", answers(3)) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("yes", answers(4)) == 1.0
    # normalisation: number words, articles, punctuation, case, missing apostrophes, numbers with commas
    assert vqa_accuracy("Two.", answers(3, "2")) == pytest.approx(0.9)
    assert vqa_accuracy("the dog", answers(10, "dog")) == 1.0
    assert normalize_vqa_answer("1,000") == "1000" and normalize_vqa_answer("2.5") == "2.5"
    assert normalize_vqa_answer("Dont know!") == "don't know"
    assert normalize_vqa_answer("black-and-white") == "black and white"
    with pytest.raises(ValueError, match="at least 2 human answers"):
        vqa_accuracy("yes", ["yes"])


def test_official_post_processing_of_captions_and_answers():
    assert caption_postprocess(" a cat on a sofa. it sleeps.") == "a cat on a sofa"
    assert answer_postprocess("two, maybe three\nquestion: more") == "two"
    assert answer_postprocess("red question: what") == "red"
    assert answer_postprocess("It is a red bus.") == "red bus"
    assert answer_postprocess("I don't know what it is") == answer_postprocess("") == "unanswerable"
    assert answer_postprocess("Nope") == "no" and answer_postprocess("tennis") == "tennis"


def saved_tiny_clip(folder):
    """`conftest.tiny_clip`, saved to `folder`."""
    model, processor = tiny_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to feature rows, with scipy (independent of torchmetrics)."""
    mean_a, mean_b = first.mean(axis=0), second.mean(axis=0)
    cov_a, cov_b = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_and_clip_score_against_independent_computations(tmp_path):
    from transformers import CLIPProcessor

    model, _ = saved_tiny_clip(tmp_path / "clip")
    processor = CLIPProcessor.from_pretrained(tmp_path / "clip")  # as saved (CLIP's tokenizer rebuilds its pipeline)
    photos = [Image.fromarray(photo) for photo in real_photos()]
    crops = [photo.crop((x, y, x + 160, y + 160)) for photo in photos for x, y in ((0, 0), (100, 60), (200, 120))]
    generated, real = crops[::2], crops[1::2]  # 8 and 7 images, features of width 16 -> 8 and 7 rows
    extractor = HFImageFeatures.from_pretrained(tmp_path / "clip")

    def features(images):
        batch = torch.stack([torch.from_numpy(np.array(image.resize((299, 299)))).permute(2, 0, 1) for image in images])
        return extractor(batch).numpy()

    fid = fid_score(generated, real, str(tmp_path / "clip"))
    assert fid == pytest.approx(frechet_distance(features(generated), features(real)), rel=1e-4, abs=1e-6)
    assert fid > 0 and fid_score(real, real, extractor) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        fid_score(real[:1], real, extractor)

    texts, images = ["an astronaut in a suit"] * 4, photos[:4]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)

    def mean_cosine():
        with torch.no_grad():
            image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text_embeds = model.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"]).pooler_output
        return float(torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1).mean())

    if mean_cosine() <= 0:  # CLIPScore clamps at 0: flip the random text projection so the check is not 0 == 0
        with torch.no_grad():
            model.text_projection.weight.neg_()
        model.save_pretrained(tmp_path / "clip")
    expected = 100 * mean_cosine()
    assert expected > 0
    assert clip_score(images, texts, str(tmp_path / "clip")) == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------ data readers


def save_photos(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, photo in zip(names, real_photos(), strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).resize((64, 64)).save(folder / name)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_readers_of_every_official_format(tmp_path):
    images = tmp_path / "images"
    save_photos(images, ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg", "n1.jpg", "val2014/k.jpg"])
    coco = write_json(tmp_path / "coco.json", {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 73, "file_name": "n1.jpg"}],
        "annotations": [{"image_id": 42, "caption": "a woman in a space suit"},
                        {"image_id": 42, "caption": "an astronaut smiles"}, {"image_id": 73, "caption": "a cat"}]})
    samples = load_samples("coco", annotations=coco, images=images)
    assert [(s.id, s.references) for s in samples] == [("42", ["a woman in a space suit", "an astronaut smiles"]),
                                                        ("73", ["a cat"])]
    assert samples[0].image == str(images / "COCO_val2014_000000000042.jpg")

    karpathy = write_json(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "k.jpg", "split": "test", "cocoid": 7, "sentences": [{"raw": "A cat."}]},
        {"filepath": "val2014", "filename": "k.jpg", "split": "train", "cocoid": 8, "sentences": [{"raw": "x"}]}]})
    samples = load_samples("karpathy", annotations=karpathy, images=images, split="test")
    assert [(s.id, s.image, s.references) for s in samples] == [("7", str(images / "val2014/k.jpg"), ["A cat."])]
    with pytest.raises(ValueError, match="no images in split 'val'"):
        load_samples("karpathy", annotations=karpathy, split="val")
    listed = write_json(tmp_path / "coco_karpathy_test.json", [{"image": "val2014/k.jpg", "caption": ["a", "b"]}])
    assert load_samples("karpathy", annotations=listed, images=images)[0].references == ["a", "b"]

    questions = write_json(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 420, "image_id": 42, "question": "What is she wearing?"},
        {"question_id": 730, "image_id": 73, "question": "Is it outside?"}]})
    answers = write_json(tmp_path / "annotations.json", {"annotations": [
        {"question_id": 420, "answers": [{"answer": "suit", "answer_id": i} for i in range(1, 11)]},
        {"question_id": 730, "answers": [{"answer": "no", "answer_id": i} for i in range(1, 11)]}]})
    samples = load_samples("vqav2", annotations=answers, questions=questions, images=images)
    assert [s.id for s in samples] == ["420", "730"] and samples[0].references == ["suit"] * 10
    assert samples[1].image == str(images / "COCO_val2014_000000000073.jpg")

    gqa = write_json(tmp_path / "testdev_balanced_questions.json",
                     {"201": {"imageId": "n1", "question": "What animal is it?", "answer": "cat"}})
    assert [(s.id, s.image, s.question, s.references) for s in load_samples("gqa", questions=gqa, images=images)] \
        == [("201", str(images / "n1.jpg"), "What animal is it?", ["cat"])]

    vizwiz = write_json(tmp_path / "val.json", [{"image": "n1.jpg", "question": "What is this?",
                                                 "answers": [{"answer": "cat"}, {"answer": "unanswerable"}]}])
    assert [(s.id, s.references) for s in load_samples("vizwiz", annotations=vizwiz, images=images)] == \
        [("n1", ["cat", "unanswerable"])]

    broken = write_json(tmp_path / "broken.json", {"questions": [{"question_id": 1, "image_id": 2}],
                                                   "data_subtype": "val2014"})
    with pytest.raises(ValueError, match=r"questions\[0\] lacks the field\(s\) \['question'\]"):
        load_samples("vqav2", questions=broken)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_samples("coco", annotations=tmp_path / "missing.json")


def test_datasets_reader_maps_columns(tmp_path):
    import datasets

    photos = [Image.fromarray(photo).resize((32, 32)) for photo in real_photos()[:2]]
    table = datasets.Dataset.from_dict({
        "qid": [5, 6], "img": photos, "q": ["what is it?", "what color?"],
        "answers": [[{"answer": "cat"}, {"answer": "dog"}], [{"answer": "red"}, {"answer": "red"}]],
    }).cast_column("img", datasets.Image())
    datasets.DatasetDict({"validation": table}).save_to_disk(tmp_path / "vqa")
    samples = load_samples("datasets", dataset=tmp_path / "vqa", split="validation",
                           columns="id=qid,image=img,question=q")
    assert [(s.id, s.question, s.references) for s in samples] == [("5", "what is it?", ["cat", "dog"]),
                                                                   ("6", "what color?", ["red", "red"])]
    assert load_image(samples[0].image).size == (32, 32)  # decoded when needed
    with pytest.raises(ValueError, match=r"column\(s\) \['nope'\] not in the dataset"):
        load_samples("datasets", dataset=tmp_path / "vqa", split="validation", columns="image=nope")
    with pytest.raises(ValueError, match="unknown column role"):
        load_samples("datasets", dataset=tmp_path / "vqa", split="validation", columns="picture=img")


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture
def caption_samples(tmp_path):
    names = [f"photo{index}.png" for index in range(5)]
    save_photos(tmp_path / "images", names)
    return [EvalSample(str(index), str(tmp_path / "images" / name),
                       references=["an astronaut in a suit", "a photo of a cat"])
            for index, name in enumerate(names)]


SHORT_CAPTIONS = {"max_new_tokens": 5, "min_new_tokens": 2}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_caption_run_is_resumable_and_sharding_gives_one_process_results(tmp_path, lavit_model, lavit_processor,
                                                                         caption_samples):
    config = EvalConfig("caption", generation=SHORT_CAPTIONS, batch_size=2, use_java=False, name="photos")
    full = evaluate(lavit_model, lavit_processor, caption_samples, config, tmp_path / "full", show_progress=False)
    records = read_predictions(tmp_path / "full")
    assert sorted(records) == [s.id for s in caption_samples]
    assert full["count"] == 5 and "CIDEr" in full["metrics"] and full["metrics"]["CIDEr"] >= 0
    assert json.loads((tmp_path / "full" / "results.json").read_text()) == full
    assert full["generation"]["num_beams"] == 2 and full["generation"]["max_new_tokens"] == 5

    # two processes: batch k on process k mod 2, each with its own predictions file; merged, the same predictions
    batches = pending_batches(caption_samples, tmp_path / "sharded", config.batch_size)
    for process in range(2):
        run_batches(lavit_model, lavit_processor, shard(batches, process, 2), config, tmp_path / "sharded", process,
                    show_progress=False)
    assert [len(lines(tmp_path / "sharded" / f"predictions-{p:05d}.jsonl")) for p in range(2)] == [3, 2]
    assert read_predictions(tmp_path / "sharded") == records
    assert score(caption_samples, config, tmp_path / "sharded")["metrics"] == full["metrics"]

    # a crash during the third prediction: two complete lines and half of the third remain; the rerun predicts the
    # three others once each and gives the same predictions
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    text = (tmp_path / "full" / "predictions-00000.jsonl").read_text().splitlines(keepends=True)
    (resumed / "predictions-00000.jsonl").write_text("".join(text[:2]) + text[2][:20])
    shutil.copy(tmp_path / "full" / "lavit_resume.json", resumed)  # what made them: this model and these settings
    assert len(pending_batches(caption_samples, resumed, 2)) == 2  # ids 2, 3 | 4
    again = evaluate(lavit_model, lavit_processor, caption_samples, config, resumed, show_progress=False)
    written = lines(resumed / "predictions-00000.jsonl")
    assert [record["id"] for record in written] == ["0", "1", "2", "3", "4"]
    assert {record["id"]: record for record in written} == records
    assert again["metrics"] == full["metrics"]
    # nothing left to do: a third run predicts nothing and scores the same
    evaluate(lavit_model, lavit_processor, caption_samples, config, resumed, show_progress=False)
    assert len(lines(resumed / "predictions-00000.jsonl")) == 5


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_accelerate_launch_with_two_processes_gives_the_one_process_results(tmp_path, lavit_model, lavit_processor):
    folder = tmp_path / "model"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    save_photos(tmp_path / "images", [f"p{index}.jpg" for index in range(5)])
    write_json(tmp_path / "test.json", [{"image": f"p{index}.jpg", "caption": ["a photo of a cat"]}
                                        for index in range(5)])
    arguments = ["evaluate", "coco-karpathy", "--model", str(folder), "--annotations", str(tmp_path / "test.json"),
                 "--images", str(tmp_path / "images"), "--batch-size", "2", "--no-java", "--max-new-tokens", "4"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --multi_gpu is accelerate's data-parallel launcher; without CUDA the processes join over gloo on the CPU
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                             "--num_processes", "2", "--main_process_port", str(29500 + os.getpid() % 500),
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lavit.cli", *arguments,
                             "--output", str(tmp_path / "two")], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [len(lines(tmp_path / "two" / f"predictions-{p:05d}.jsonl")) for p in range(2)] == [3, 2]
    assert main([*arguments, "--output", str(tmp_path / "one")]) == 0
    assert read_predictions(tmp_path / "two") == read_predictions(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "results.json").read_text()) == \
        json.loads((tmp_path / "one" / "results.json").read_text())


def test_vizwiz_two_stage_vqa_run_on_a_datasets_dataset(tmp_path, lavit_model, lavit_processor):
    import datasets

    photos = [Image.fromarray(photo).resize((64, 64)) for photo in real_photos()[:3]]
    table = datasets.Dataset.from_dict({"image": photos, "question": ["what is in the picture?"] * 3,
                                        "answers": [["cat"] * 3 + ["unanswerable"] * 7] * 3})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "vizwiz-data")
    samples = load_samples("datasets", dataset=tmp_path / "vizwiz-data")
    config = EvalConfig("vqa", generation={"max_new_tokens": 3, "min_new_tokens": 1, "num_beams": 2}, batch_size=3,
                        vizwiz_two_stage=True, name="vizwiz")
    results = evaluate(lavit_model, lavit_processor, samples, config, tmp_path / "vizwiz", show_progress=False)
    records = read_predictions(tmp_path / "vizwiz")
    for record in records.values():
        refused = "no" in record["answerable_reply"].lower()
        assert record["prediction"] == ("unanswerable" if refused else answer_postprocess(record["raw"]))
    expected = np.mean([vqa_accuracy(records[s.id]["prediction"], s.references) for s in samples])
    assert results["metrics"]["vqa_accuracy"] == pytest.approx(100 * expected)
    assert results["generation"]["length_penalty"] == 0.0 and results["generation"]["num_beams"] == 2


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_text_to_image_run_scores_fid_and_clip(tmp_path, lavit_model, lavit_processor, caption_samples):
    from lavit import LaVITDetokenizer, LaVITPipeline

    torch.manual_seed(0)
    pipe = LaVITPipeline.from_detokenizer(lavit_model, lavit_processor, LaVITDetokenizer(tiny_detokenizer_config()))
    pipe.set_progress_bar_config(disable=True)
    saved_tiny_clip(tmp_path / "clip")
    samples = [EvalSample(s.id, s.image, text=text) for s, text in
               zip(caption_samples[:4], ["a cat", "a red bus", "two dogs", "a rocket"], strict=True)]
    config = EvalConfig("text-to-image", generation={"num_inference_steps": 2, "max_new_tokens": 6}, batch_size=2,
                        num_candidates=2, fid_features=str(tmp_path / "clip"), clip_model=str(tmp_path / "clip"),
                        name="t2i")
    results = evaluate(pipe, lavit_processor, samples, config, tmp_path / "t2i", show_progress=False)
    records = read_predictions(tmp_path / "t2i")
    kept = [Image.open(tmp_path / "t2i" / records[s.id]["image"]) for s in samples]
    assert [image.size for image in kept] == [(32, 32)] * 4
    # best of 2 by CLIP similarity to the caption, as the official protocol (best of 4)
    for image, sample in zip(kept, samples, strict=True):
        similarities = records[sample.id]["candidate_similarities"]
        assert len(similarities) == 2
        assert clip_similarities([image], [sample.text], str(tmp_path / "clip"))[0] == pytest.approx(max(similarities),
                                                                                                    abs=1e-5)
    with pytest.raises(ValueError, match="num_candidates must be 1, or more with a clip_model"):
        EvalConfig("text-to-image", num_candidates=4)
    assert set(results["metrics"]) == {"FID", "CLIP score"} and results["metrics"]["FID"] > 0
    assert results["generation"]["guidance_scale"] == 1.5 and results["generation"]["top_k"] == 300
    # the same seed and batches give the same images
    rerun = tmp_path / "rerun"
    evaluate(pipe, lavit_processor, samples, config, rerun, show_progress=False)
    for sample in samples:
        first = np.array(Image.open(tmp_path / "t2i" / records[sample.id]["image"]))
        assert np.array_equal(first, np.array(Image.open(rerun / records[sample.id]["image"])))


def test_cli_evaluate_records_scores_that_export_puts_in_the_model_index(tmp_path, lavit_model, lavit_processor,
                                                                         capsys):
    from lavit.hub_cards import export_model

    folder = tmp_path / "model"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    save_photos(tmp_path / "images", ["val2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg"])
    write_json(tmp_path / "test.json", [{"image": f"val2014/{name}.jpg", "caption": ["a photo of a cat", "a bus"]}
                                        for name in "abc"])
    argv = ["evaluate", "coco-karpathy", "--model", folder, "--annotations", tmp_path / "test.json", "--images",
            tmp_path / "images", "--output", tmp_path / "out", "--no-java", "--max-new-tokens", "4", "--record"]
    assert main([str(arg) for arg in argv]) == 0
    out = capsys.readouterr().out
    assert "CIDEr: " in out and "METEOR: not computed" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["benchmark"] == "COCO Karpathy test" and results["count"] == 3
    rows = json.loads((folder / "lavit_run.json").read_text())["evaluation"]
    assert {row["metric"] for row in rows} == set(results["metrics"])
    record_results(folder, results)  # recording again replaces the rows
    assert len(json.loads((folder / "lavit_run.json").read_text())["evaluation"]) == len(rows)

    card = (export_model(folder, tmp_path / "hub") / "README.md").read_text()
    cider = round(results["metrics"]["CIDEr"], 2)
    assert "model-index:" in card and "type: image-to-text" in card and "name: COCO Karpathy test" in card
    assert f"| CIDEr | {cider} | COCO Karpathy test (3 samples, zero-shot) |" in card

    assert main(["evaluate", "caption", "--model", str(folder), "--output", str(tmp_path / "x")]) == 1
    assert "needs --format" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "images" / "val2014")
    assert main([str(arg) for arg in argv]) == 1
    assert "image(s) not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad samples


def samples_with_bad_ones(task: str, folder) -> tuple[list[EvalSample], dict[str, str]]:
    """Two good samples of `task` around every kind of bad one: a file that is not an image, a missing file, a
    truncated PNG, a bad record, and a text the model cannot take (past its context; caption has no per-sample
    text). Returns the samples and, per bad id, what its reason must say."""
    save_photos(folder, ["good0.png", "good1.png", "whole.png"])
    (folder / "notimage.png").write_text("this is text, not a picture")
    whole = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    role = {"caption": {}, "vqa": {"question": "what is it?"}, "text-to-image": {"text": "a cat"}}[task]
    references = {"references": ["a photo of a cat", "a cat"]} if task == "caption" else \
        {"references": ["cat"] * 10} if task == "vqa" else {}

    def sample(key, image, **overrides):
        return EvalSample(key, str(folder / image), **{**role, **references, **overrides})

    samples = [sample("good0", "good0.png"), sample("notimage", "notimage.png"), sample("missing", "missing.png"),
               sample("truncated", "truncated.png"), sample("record", "good0.png", references=[],
                                                            problem="test.json[4]: the caption must be a string")]
    expected = {"notimage": r"cannot read image file .*notimage.png", "missing": r"image not found: .*missing.png",
                "truncated": r"cannot read image file .*truncated.png.*truncated",
                "record": r"test.json\[4\]: the caption must be a string"}
    long_text = " ".join(["a red bus on a street"] * 200)  # past the tiny model's context of 512
    if task in ("vqa", "text-to-image"):
        samples.append(sample("too-long", "good1.png", **{next(iter(role)): long_text}))
        expected["too-long"] = r"more than the model's context length"
    samples.append(sample("good1", "good1.png"))
    return samples, expected


@pytest.mark.parametrize("task", list(TASK_TYPES))
def test_every_task_scores_the_good_samples_and_names_each_bad_one(task, tmp_path, lavit_model, lavit_processor):
    """`lavit evaluate` stopped at its first bad sample. For every task evaluate runs (from `TASK_TYPES`), each bad
    sample fails alone with its id and reason (its batch runs again without it), the good ones are scored, and
    the output records the failures: a rerun tries only them again, and one that was fixed is then scored."""
    model = lavit_model
    config = EvalConfig(task, generation={"max_new_tokens": 3, "min_new_tokens": 1, "num_beams": 1}, batch_size=4,
                        use_java=False, name="bad")
    if task == "text-to-image":
        from lavit import LaVITDetokenizer, LaVITPipeline

        torch.manual_seed(0)
        model = LaVITPipeline.from_detokenizer(lavit_model, lavit_processor,
                                               LaVITDetokenizer(tiny_detokenizer_config()))
        model.set_progress_bar_config(disable=True)
        saved_tiny_clip(tmp_path / "clip")
        config = EvalConfig(task, generation={"num_inference_steps": 1, "max_new_tokens": 3}, batch_size=4,
                            fid_features=str(tmp_path / "clip"), name="bad")
    samples, expected = samples_with_bad_ones(task, tmp_path / "images")
    output = tmp_path / "out"
    results = evaluate(model, lavit_processor, samples, config, output, show_progress=False)
    assert [entry["id"] for entry in results["failed"]] == [s.id for s in samples if s.id in expected]
    for entry in results["failed"]:
        assert re.search(expected[entry["id"]], entry["error"]), entry
    assert results["count"] == 2 and results["metrics"], results  # the two good samples, scored
    assert json.loads((output / "results.json").read_text()) == results
    records = read_predictions(output)
    assert all(("error" in records[s.id]) == (s.id in expected) for s in samples)
    written = len(lines(output / "predictions-00000.jsonl"))
    assert written == len(samples)

    # a rerun tries only the failed samples again, and reports them again
    again = evaluate(model, lavit_processor, samples, config, output, show_progress=False)
    assert again["failed"] == results["failed"] and again["metrics"] == results["metrics"]
    assert len(lines(output / "predictions-00000.jsonl")) == written + len(expected)
    # a fixed file is scored by the next run; the rest stay as they were
    shutil.copy(tmp_path / "images" / "good1.png", tmp_path / "images" / "notimage.png")
    fixed = evaluate(model, lavit_processor, samples, config, output, show_progress=False)
    assert [entry["id"] for entry in fixed["failed"]] == [e["id"] for e in results["failed"] if e["id"] != "notimage"]
    assert fixed["count"] == 3 and "error" not in read_predictions(output)["notimage"]


def test_cli_evaluate_reports_each_bad_sample_and_exits_1(tmp_path, lavit_folder, capsys):
    """The command's side: one line per bad sample naming its id and reason, the scores of the others, exit 1, no
    `--record` of a partial score; with `--json` the results document lists the failures."""
    save_photos(tmp_path / "images", ["a.png", "b.png"])
    (tmp_path / "images" / "bad.png").write_text("not a picture")
    write_json(tmp_path / "test.json", [{"image": "a.png", "caption": "a cat"}, {"image": "bad.png", "caption": "x"},
                                        {"image": "c.png", "caption": 5}, {"image": "b.png", "caption": "a bus"}])
    argv = ["evaluate", "coco-karpathy", "--model", lavit_folder, "--annotations", tmp_path / "test.json",
            "--images", tmp_path / "images", "--no-java", "--max-new-tokens", "2", "--num-beams", "1"]
    assert main([str(arg) for arg in [*argv, "--output", tmp_path / "out", "--record"]]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lavit evaluate: error:")]
    assert errors[0].startswith("lavit evaluate: error: sample bad: ValueError: ") and "bad.png" in errors[0]
    assert errors[1].startswith("lavit evaluate: error: sample c: ") and "test.json[2]: the caption must be" in \
        errors[1]
    assert "2 of 4 samples failed" in errors[2] and "--record skipped" in errors[2] and len(errors) == 3
    assert "CIDEr: " in captured.out and not (lavit_folder / "lavit_run.json").exists()
    assert main([str(arg) for arg in [*argv, "--output", tmp_path / "out", "--json"]]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["count"] == 2 and [entry["id"] for entry in document["failed"]] == ["bad", "c"]


def test_duplicate_ids_name_their_file_and_the_ids(tmp_path):
    write_json(tmp_path / "dup.json", [{"image": "a.png", "caption": "x", "image_id": 7},
                                       {"image": "b.png", "caption": "y", "image_id": 8},
                                       {"image": "c.png", "caption": "z", "image_id": 7}])
    with pytest.raises(ValueError, match=r"dup.json: 1 id\(s\) appear more than once, e.g. \['7'\]"):
        load_samples("karpathy", annotations=tmp_path / "dup.json")


def test_a_sampling_tokenizer_evaluates_every_sample_the_same_in_any_batch_and_run(tmp_path, lavit_model,
                                                                                   lavit_processor, caption_samples,
                                                                                   monkeypatch):
    """A visual tokenizer whose `selection_mode` is "sample" draws each image's visual tokens from the run's seed
    alone, not from the process's random state or its batch-mates: predictions repeat, and a resumed run (other
    batches) equals an uninterrupted one."""
    monkeypatch.setattr(lavit_model.visual_tokenizer.config, "selection_mode", "sample")
    drawn = []
    generate = lavit_model.generate

    def recording_generate(**inputs):
        drawn.extend(inputs["image_keep_mask"].tolist())
        return generate(**inputs)

    monkeypatch.setattr(lavit_model, "generate", recording_generate)
    runs = {}
    for name, batch_size, global_seed in (("batches of 3", 3, 1), ("alone", 1, 2), ("again", 3, 3)):
        torch.manual_seed(global_seed)  # the process's random state differs run to run
        drawn.clear()
        config = EvalConfig("caption", generation=SHORT_CAPTIONS, batch_size=batch_size, use_java=False, seed=0)
        evaluate(lavit_model, lavit_processor, caption_samples, config, tmp_path / name, show_progress=False)
        runs[name] = (list(drawn), read_predictions(tmp_path / name))
    assert runs["batches of 3"] == runs["alone"] == runs["again"]
    masks = runs["alone"][0]
    assert 0 < sum(map(sum, masks)) < sum(map(len, masks))  # a real draw: some patches kept, some not


def test_a_reference_that_is_not_text_fails_its_sample(tmp_path):
    """A GQA/VQA answer given as a list (or a number) would be scored as its str(), 0 against any prediction."""
    from lavit.evaluation.data import check_sample

    save_photos(tmp_path, ["photo.png"])
    for references in ([["six six"]], [6], ["six", None]):
        with pytest.raises(ValueError, match="must be text"):
            check_sample(EvalSample("q1", str(tmp_path / "photo.png"), question="how many?",
                                    references=references), "vqa")


def swap_keeping_size_and_times(path, value: int):
    """Another uncompressed image of the same size written over `path`, its modification time set back (`touch -r`,
    `rsync -t`, a restored backup)."""
    times = os.stat(path)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(path).st_size == times.st_size and os.stat(path).st_mtime_ns == times.st_mtime_ns


def test_an_image_swapped_in_with_its_size_and_times_set_back_is_not_taken_for_the_old_one(tmp_path):
    """A resumed evaluation kept the prediction of an image replaced by another of the same size whose modification
    time was set back: the sample's identity is the image's bytes. Its bytes alone: the same image reached through a
    symlink or a moved data folder resumes (it was refused as another image while the resolved path counted)."""
    from lavit.evaluation import EvalSample
    from lavit.evaluation.runner import PredictionWriter, pending_batches, sample_digest
    from lavit.resumable import ResumeMismatchError

    path = tmp_path / "data" / "photo.bmp"  # uncompressed: another image of the same size has the same file size
    path.parent.mkdir()
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(path)
    sample = EvalSample("1", str(path), references=["a photo"])
    writer = PredictionWriter(tmp_path / "out" / "predictions-0.jsonl")
    writer.write({"id": "1", "prediction": "a grey square", "input": sample_digest(sample)})
    writer.close()
    assert pending_batches([sample], tmp_path / "out", 1) == []
    shutil.move(tmp_path / "data", tmp_path / "moved")
    (tmp_path / "link").symlink_to(tmp_path / "moved")
    for reached in (tmp_path / "moved" / "photo.bmp", tmp_path / "link" / "photo.bmp"):
        assert pending_batches([EvalSample("1", str(reached), references=["a photo"])], tmp_path / "out", 1) == []
    swap_keeping_size_and_times(tmp_path / "moved" / "photo.bmp", 200)
    with pytest.raises(ResumeMismatchError, match="other data under the same id"):
        pending_batches([EvalSample("1", str(tmp_path / "moved" / "photo.bmp"))], tmp_path / "out", 1)


@pytest.mark.parametrize("stored", ["paths", "bytes"])
def test_a_dataset_image_swapped_in_with_its_times_set_back_is_not_taken_for_the_old_one(tmp_path, stored):
    """`--format datasets` identified a row's image by the dataset's fingerprint, which `datasets` derives from file
    modification times: an image swapped in a data folder with its time set back kept its stale prediction. A row's
    image is identified by its content (the stored bytes, or its file's bytes when the row holds a path), column and
    index; a moved data folder resumes."""
    import datasets

    from lavit.evaluation.runner import PredictionWriter, pending_batches, sample_digest
    from lavit.resumable import ResumeMismatchError

    data = tmp_path / "data"
    data.mkdir()
    for index in range(2):
        Image.fromarray(np.full((8, 8, 3), 10 + index, np.uint8)).save(data / f"{index}.bmp")
    if stored == "paths":  # an image folder (`load_dataset`): the rows hold the files' paths
        (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{index}.bmp", "question": "what?"})
                                                     + "\n" for index in range(2)))
    else:  # a `save_to_disk` folder: the rows hold the images' bytes
        datasets.Dataset.from_dict({"image": [str(data / f"{index}.bmp") for index in range(2)],
                                    "question": ["what?"] * 2}).cast_column("image", datasets.Image()
                                                                            ).save_to_disk(tmp_path / "table")
    folder = data if stored == "paths" else tmp_path / "table"

    def samples():
        return load_samples("datasets", dataset=folder, split="train", columns="image=image" if stored == "bytes"
                            else None)

    writer = PredictionWriter(tmp_path / "out" / "predictions-0.jsonl")
    for sample in samples():
        writer.write({"id": sample.id, "prediction": "a square", "input": sample_digest(sample)})
    writer.close()
    assert pending_batches(samples(), tmp_path / "out", 1) == []
    if stored == "bytes":
        shutil.move(folder, tmp_path / "moved")
        folder = tmp_path / "moved"
        assert pending_batches(samples(), tmp_path / "out", 1) == []
        return  # bytes stored in the table: a swapped source file is not part of the dataset
    swap_keeping_size_and_times(data / "1.bmp", 200)
    with pytest.raises(ResumeMismatchError, match=r"other data under the same id .* e.g. \['1'\]"):
        pending_batches(samples(), tmp_path / "out", 1)
