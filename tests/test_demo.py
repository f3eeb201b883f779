"""`lavit.demo`'s own parts, without training: its step tables and band, the training arguments of a stage, the
evaluation on held-out images, the metrics table, model card and closing printout, and its refusal
of a user's folder where the Hub folder goes (before any work)."""

import pytest
from conftest import real_photos
from PIL import Image

from lavit.atomic import NotLavitFolderError
from lavit.demo import (
    FULL,
    MEASURED_BAND,
    QUICK,
    card_metadata,
    evaluate,
    evaluation_rows,
    first_words,
    print_summary,
    run_demo,
    stage_arguments,
    whole_digits,
)

DIGITS = 1797  # scikit-learn's load_digits


def results(vqa_accuracy=0.4, count=20) -> dict:
    return {"caption_accuracy": 0.25, "vqa_accuracy": vqa_accuracy, "tokens_mean": 21.04, "tokens_min": 12,
            "tokens_max": 30, "count": count, "examples": [("five", "the digit five", "five")]}


def test_the_quick_run_has_every_stage_of_the_full_run_with_fewer_steps():
    assert QUICK.keys() == FULL.keys()
    assert all(0 < QUICK[key] <= FULL[key] for key in FULL)


def test_the_held_out_digits_never_overlap_the_training_digits():
    # training digits are the first `train_digits`, held-out ones the last `eval` (`write_demo_data`)
    for steps in (QUICK, FULL):
        assert steps["train_digits"] <= DIGITS - steps["eval"]


def test_the_measured_band_names_metrics_of_the_table_with_low_at_most_high():
    metrics = {row["metric"] for row in evaluation_rows(results(), 0.3, results())}
    bands = {key: value for key, value in MEASURED_BAND.items() if key != "seeds"}
    assert bands and set(bands) <= metrics
    assert all(0 <= low <= high <= 1 for low, high in bands.values())


def test_stage_arguments_run_the_given_steps_from_the_seed_with_the_overrides(tmp_path):
    arguments = stage_arguments(tmp_path / "run", 50, seed=3, per_device_train_batch_size=16, learning_rate=1e-3)
    assert (arguments.max_steps, arguments.seed, arguments.logging_steps) == (50, 3, 5)
    assert (arguments.per_device_train_batch_size, arguments.learning_rate) == (16, 1e-3)
    assert arguments.output_dir == str(tmp_path / "run") and arguments.dataloader_num_workers == 0


def test_whole_digits_turns_off_the_presets_crops_and_mirrors_as_if_given():
    class Arguments:
        given_flags = frozenset()

    arguments = Arguments()
    assert whole_digits(arguments) is arguments
    assert arguments.given_flags == {"crop_scale", "horizontal_flip"}


def test_first_words_keeps_four_words_of_the_stripped_text():
    assert first_words("  the digit five\nis here  ") == "the digit five is"
    assert first_words("five") == "five"
    assert first_words("   ") == ""


def test_evaluate_reports_accuracies_token_counts_and_examples(lavit_model, lavit_processor):
    measured = evaluate(lavit_model, lavit_processor, [Image.fromarray(real_photos()[1])], [3])
    assert measured["count"] == 1 and len(measured["examples"]) == 1
    assert 0 <= measured["caption_accuracy"] <= 1 and 0 <= measured["vqa_accuracy"] <= 1
    patches = lavit_model.config.tokenizer_config.num_patches
    assert 1 <= measured["tokens_min"] <= measured["tokens_mean"] <= measured["tokens_max"] <= patches
    assert measured["examples"][0][0] == "three"
    assert all(len(caption.split()) <= 4 and len(answer.split()) <= 4 for _, caption, answer in measured["examples"])


def test_evaluation_rows_give_each_figure_with_the_data_it_was_measured_on():
    stage2, tuned = results(count=20), results(vqa_accuracy=0.456, count=20)
    rows = {row["metric"]: row for row in evaluation_rows(stage2, 0.3, tuned)}
    assert rows["caption accuracy (stage 2)"]["value"] == "0.25"
    assert rows["text-to-image class accuracy"]["value"] == "0.30"
    assert rows["VQA accuracy (fine-tuned)"]["value"] == "0.46"
    assert rows["visual tokens per image"]["value"] == "21.0 (min 12, max 30)"
    assert rows["VQA accuracy (fine-tuned)"]["data"].startswith("20 held-out digits")


def test_the_card_metadata_records_each_stages_steps_and_the_evaluation():
    rows = evaluation_rows(results(), 0.3, results())
    metadata = card_metadata(QUICK, results(), rows)
    assert metadata["evaluation"] is rows
    descriptions = " ".join(stage["description"] for stage in metadata["training_stages"])
    for key in ("tokenizer", "pretrain", "finetune", "vae", "detokenizer"):
        assert f"{QUICK[key]} " in descriptions, key
    assert f"{QUICK['train_digits']} coloured 64 px digits" in metadata["training_data"]
    assert "21.0 visual tokens" in metadata["token_statistics"] and "min 12, max 30" in metadata["token_statistics"]


@pytest.mark.parametrize(("accuracy", "said"), [(0.4, "40% of its answers on unseen digits are right"),
                                                (0.1, "are at chance (10%)")])
def test_the_summary_says_what_the_answers_show_and_lists_examples_and_files(capsys, tmp_path, accuracy, said):
    tuned = results(vqa_accuracy=accuracy)
    image = tmp_path / "images" / "reconstruction_0.png"
    print_summary(evaluation_rows(tuned, 0.3, tuned), tuned, [image], tmp_path / "hub", "The images differ.", 90.0)
    out = capsys.readouterr().out
    assert said in out
    assert "five   -> 'the digit five' | 'five'" in out
    assert f"  {image}\n" in out and str(tmp_path / "hub" / "language_model") in out
    assert "The images differ." in out and "done in 1.5 min." in out


def test_a_users_folder_where_the_hub_folder_goes_is_refused_before_any_work(tmp_path):
    (tmp_path / "hub_folder").mkdir()
    (tmp_path / "hub_folder" / "notes.txt").write_text("mine")
    with pytest.raises(NotLavitFolderError, match="hub_folder exists and was not made by lavit"):
        run_demo(tmp_path, quick=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub_folder"]  # no data, no runs
    assert (tmp_path / "hub_folder" / "notes.txt").read_text() == "mine"
