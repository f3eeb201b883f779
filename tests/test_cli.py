"""The `lavit` command line, Hub export and model cards, and the quickstart demo."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import real_photos
from lavit.hub_cards import check_export_folder, export_model
from PIL import Image
from test_hub import BLOCK_LAVIT, trained_tiny_model

from lavit import LaVITPipeline
from lavit.cli import TRAINING_COMMANDS, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The command's own error lines (progress bars of weight loading may precede them)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("lavit ")]


def real_photo_file(folder):
    path = folder / "coffee.png"
    Image.fromarray(real_photos()[2]).save(path)
    return path


@pytest.fixture
def photo_file(tmp_path):
    return real_photo_file(tmp_path)


def test_help_lists_every_command_and_each_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    for command in ("demo", "tokenize", "caption", "vqa", "generate", "reconstruct", "convert-original", "export",
                    "push", "new-language-model", "serve", *TRAINING_COMMANDS):
        assert command in listing, command
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, command
        assert "--" in capsys.readouterr().out, command


def test_bad_input_gives_one_line_and_a_nonzero_exit(capsys, tmp_path, lavit_folder):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize"])  # missing arguments: argparse's usage and one error line
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lavit tokenize: error:")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code, _, err = run(capsys, "caption", broken, "--model", lavit_folder)
    assert code == 1 and len(error_lines(err)) == 1 and "cannot read image file" in err and "broken.png" in err
    code, _, err = run(capsys, "caption", real_photo_file(tmp_path), "--model", tmp_path / "missing")
    assert code == 1 and len(error_lines(err)) == 1 and "model folder not found" in err
    code, _, err = run(capsys, "train", "--data", tmp_path / "nowhere", "--model", lavit_folder,
                       "--output_dir", tmp_path / "run", "--max_steps", "1", "--use_cpu")
    assert code == 1 and len(error_lines(err)) == 1
    (tmp_path / "not-a-release").mkdir()
    code, _, err = run(capsys, "convert-original", tmp_path / "not-a-release", tmp_path / "out")
    assert code == 1 and "not an official LaVIT release folder" in err
    code, _, err = run(capsys, "convert-original", tmp_path, tmp_path / "out")  # the output inside the source
    assert code == 1 and len(error_lines(err)) == 1 and "lies inside the input source" in err


def test_tokenize_with_budget_and_visualization(capsys, tmp_path, photo_file):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path / "tokenizer")
    code, out, _ = run(capsys, "tokenize", photo_file, photo_file, "--model", tmp_path / "tokenizer", "--budget", 3,
                       "--visualize", tmp_path / "kept.png")
    assert code == 0
    lines = [line for line in out.splitlines() if "tokens, code ids" in line]
    assert len(lines) == 2 and all(": 3 of 16 tokens" in line for line in lines)
    assert (tmp_path / "kept-0.png").is_file() and (tmp_path / "kept-1.png").is_file()


def test_caption_vqa_generate_reconstruct_on_a_model_folder(capsys, tmp_path, photo_file, lavit_folder,
                                                            pipeline_folder):
    code, out, _ = run(capsys, "caption", photo_file, "--model", lavit_folder, "--max-new-tokens", 3)
    assert code == 0 and out.startswith(f"{photo_file}: ")
    code, out, _ = run(capsys, "vqa", photo_file, "--question", "what is it?", "--model", lavit_folder,
                       "--max-new-tokens", 2)
    assert code == 0 and len(out.splitlines()) == 1
    code, _, err = run(capsys, "generate", "a red bus", "-o", tmp_path / "bus.png", "--model", lavit_folder)
    assert code == 1 and "without a pixel decoder" in err  # a language model alone draws no pixels
    code, out, _ = run(capsys, "generate", "a red bus", "-o", tmp_path / "bus.png", "--model", pipeline_folder,
                       "--num-images", 2, "--steps", 2, "--height", 16, "--width", 24)
    assert code == 0
    assert [Image.open(tmp_path / f"bus-{index}.png").size for index in range(2)] == [(24, 16)] * 2
    code, out, _ = run(capsys, "reconstruct", photo_file, "-o", tmp_path / "again.png", "--model", pipeline_folder,
                       "--budget", 4, "--steps", 2)
    assert code == 0 and Image.open(tmp_path / "again.png").size == (32, 32)


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_export_writes_a_complete_card_and_push_checks_before_uploading(capsys, tmp_path, pipeline_folder):
    metadata = tmp_path / "run.json"
    metadata.write_text(json.dumps({
        "model_name": "LaVIT test", "training_data": "three photos", "datasets": ["skimage-photos"],
        "evaluation": [{"metric": "caption accuracy", "value": "0.50", "data": "held-out photos"}],
        "token_statistics": "12.0 tokens per image",
    }))
    code, out, _ = run(capsys, "export", tmp_path / "hub", "--model", pipeline_folder, "--metadata", metadata,
                       "--repo-id", "someone/lavit-test", "--max-shard-size", "200KB")
    assert code == 0
    hub = tmp_path / "hub"
    check_export_folder(hub)
    assert (hub / "language_model" / "model.safetensors.index.json").is_file()  # sharded
    assert (hub / "model_index.json").is_file() and (hub / "condition_encoder" / "config.json").is_file()
    (hub / "unet" / "config.json").rename(hub / "unet" / "moved.json")
    with pytest.raises(ValueError, match="missing unet/config.json"):
        check_export_folder(hub)
    (hub / "unet" / "moved.json").rename(hub / "unet" / "config.json")
    card = (hub / "README.md").read_text()
    for text in ("library_name: transformers", "DiffusionPipeline.from_pretrained", 'subfolder="language_model"',
                 "skimage-photos", "# LaVIT test", "## Intended uses",
                 "## Training data", "three photos", "## Visual token statistics", "| caption accuracy | 0.50 |",
                 "## Limitations", "trust_remote_code=True", "someone/lavit-test", "@inproceedings{jin2024unified"):
        assert text in card, text
    assert not (tmp_path / "hub.tmp").exists()

    (hub / "stray.bin").write_bytes(pickle.dumps({"weights": [1.0]}))
    with pytest.raises(ValueError, match="stray.bin: not a kind of file lavit publishes"):
        check_export_folder(hub)
    (hub / "stray.bin").unlink()
    # no network in tests: the upload itself fails with one clear line, after the folder was checked
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lavit.cli", "push", "someone/lavit-test", "--model", str(hub)],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("lavit push: error:")
    assert "Traceback" not in result.stderr
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_model(tmp_path, tmp_path / "other")


@pytest.mark.slow  # the whole quick demo: every stage trained, about 1.5 minutes on 2 idle cores
def test_quick_demo_builds_a_hub_folder_that_loads_without_lavit(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "lavit.cli", "demo", "--quick", "--output", str(output)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caption accuracy" in result.stdout and "What it cannot do" in result.stdout
    assert "VAE fitted for 10 steps" in result.stdout
    assert "fitting the VAE" in result.stderr and "denoising" in result.stderr  # long steps show progress
    # the demo says whether the images drawn for 'three' and 'seven' differ, and why not when they do not
    assert "The images for 'three' and 'seven' differ" in result.stdout or "Note: the images for" in result.stdout
    results = json.loads((output / "demo_results.json").read_text())
    assert 1 <= results["finetuned"]["tokens_min"] <= results["finetuned"]["tokens_max"] <= 64
    for path in results["images"]:
        assert Image.open(path).size[0] > 0
    script = BLOCK_LAVIT + textwrap.dedent(f"""
        import torch
        from diffusers import DiffusionPipeline
        from transformers import AutoModel
        folder = {results["hub_folder"]!r}
        language_model = AutoModel.from_pretrained(folder, subfolder="language_model", trust_remote_code=True)
        assert type(language_model).__name__ == "LaVITModel"
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        images = pipe("the digit one", max_new_tokens=8, num_inference_steps=2).images
        print(images[0].size)
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip().splitlines()[-1] == "(32, 32)"


def test_convert_original_release_to_a_hub_folder(capsys, tmp_path, parity_files):
    from official_release import write_official_release
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    release = tmp_path / "release"
    release.mkdir()
    write_official_release(parity_files, release)
    # the release's text tokenizer: exactly the 40 text ids of the parity LM
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"word{index}": index for index in range(3, 40)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(release / "language_model")
    code, out, err = run(capsys, "convert-original", release, tmp_path / "converted", "--num-heads", 4)
    assert code == 0, err
    converted = tmp_path / "converted"
    check_export_folder(converted)
    # the release has a pixel decoder: the folder is a LaVITPipeline's, the language model one of its components
    assert json.loads((converted / "model_index.json").read_text())["_class_name"] == ["pipeline_lavit",
                                                                                       "LaVITPipeline"]
    assert "converted from the official release" in (converted / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(converted, subfolder="language_model", trust_remote_code=True)
    assert model.config.text_vocab_size == 40
    pipe = LaVITPipeline.from_pretrained(converted)
    expected = parity_files["expected"]
    conditions = pipe.condition_encoder(expected["code_ids"], expected["token_counts"])
    torch.testing.assert_close(conditions.pooled_prompt_embeds, expected["highres_pooled_prompt_embeds"],
                               atol=1e-5, rtol=1e-5)


def test_batched_captions_equal_one_at_a_time_and_flags_take_both_spellings(capsys, tmp_path, lavit_folder):
    files = []
    for index in (0, 2, 3):
        files.append(tmp_path / f"photo{index}.png")
        Image.fromarray(real_photos()[index]).save(files[-1])
    outputs = {}
    for batch_size, flag in ((1, "--max-new-tokens"), (3, "--max_new_tokens"), (2, "--max_new_tokens")):
        code, out, _ = run(capsys, "caption", *files, "--model", lavit_folder, f"{flag}=3", "--batch_size",
                           batch_size, "--num-beams", 2)
        assert code == 0
        # a library may log to stdout while the model loads (DeepSpeed's accelerator line): keep the caption lines
        outputs[batch_size] = [line for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert len(outputs[1]) == 3 and [line.split(":")[0] for line in outputs[1]] == [str(path) for path in files]
    assert outputs[1] == outputs[2] == outputs[3]


def test_demo_says_whether_images_of_different_prompts_differ():
    from lavit.demo import describe_generated_images

    black, white = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
    codes, other_codes = torch.tensor([1, 2]), torch.tensor([3])
    assert "differ (mean pixel difference 255.0/255, threshold 10/255; same seed" in describe_generated_images(
        ("three", "seven"), [codes, other_codes], [black, white])
    # the case: images a few levels apart on average (3.6/255 there) are not called different
    grey = Image.new("RGB", (4, 4), (4, 4, 4))
    assert "nearly the same (mean pixel difference 4.0/255" in describe_generated_images(
        ("three", "seven"), [codes, other_codes], [black, grey])
    assert "same visual tokens" in describe_generated_images(("three", "seven"), [codes, codes], [black, black])
    assert "detokenizer" in describe_generated_images(("three", "seven"), [codes, other_codes], [black, black])


def test_demo_seed_drives_its_data_and_its_training(tmp_path):
    """`lavit demo --seed S`: the digits' colours and every stage's `TrainingArguments.seed` follow S (the band of
    docs/demo.md is measured over seeds)."""
    import numpy as np

    from lavit.cli import build_parser
    from lavit.demo import QUICK, stage_arguments, write_demo_data

    steps = {**QUICK, "train_digits": 12, "eval": 4}

    def pixels(seed: int, name: str) -> list:
        _, train_images, _, eval_images, _ = write_demo_data(tmp_path / name, steps, seed)
        return [np.asarray(image) for image in train_images + eval_images]

    again, first, other = pixels(1, "again"), pixels(1, "first"), pixels(2, "other")
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert stage_arguments(tmp_path / "run", 3, 7).seed == 7
    assert build_parser().parse_args(["demo", "--seed", "7"]).seed == 7


def test_a_full_demo_prints_the_measured_band_beside_its_figures(capsys, tmp_path):
    from lavit.demo import MEASURED_BAND, evaluation_rows, print_summary

    tuned = {"caption_accuracy": 0.3, "vqa_accuracy": 0.4, "tokens_mean": 21.0, "tokens_min": 12, "tokens_max": 30,
             "count": 100, "examples": []}
    rows = evaluation_rows(tuned, 0.35, tuned)
    for band in (True, False):
        print_summary(rows, tuned, [], tmp_path, "", 60.0, band=band)
        out = capsys.readouterr().out
        low, high = MEASURED_BAND["VQA accuracy (fine-tuned)"]
        line = next(line for line in out.splitlines() if line.startswith("VQA accuracy (fine-tuned)"))
        assert (f"0.40  {low:.2f}-{high:.2f}" in line) is band and ("band:" in out) is band
