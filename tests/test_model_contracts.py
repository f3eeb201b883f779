"""The contracts every transformers model keeps (our own tests of the invariants of transformers' common model tests):
complete folders on every save path, the tested transformers range, argument conventions, vocabulary, big-model
loading."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_detokenizer_config
from test_hub import BLOCK_LAVIT

from lavit import LaVITDetokenizer
from lavit.modeling.transformers_compat import transformers_requirement

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_without_lavit(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter where `lavit` cannot be imported (remote code only)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
                   "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", BLOCK_LAVIT + textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=tmp_path, env=environment, timeout=300)


@pytest.fixture
def lavit_folder(lavit_model, lavit_processor, tmp_path):
    """A saved tiny LaVIT folder with a pixel decoder and a processor."""
    torch.manual_seed(0)
    lavit_model.set_detokenizer(LaVITDetokenizer(tiny_detokenizer_config()).eval())
    folder = tmp_path / "lavit"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ folders


def test_every_save_path_without_lavit_gives_a_complete_folder(lavit_folder, tmp_path):
    """Re-saved remote code, Trainer checkpoint and final save, PEFT-merged model: each keeps the pipeline file and
    the detokenizer's code, so the text-to-image pipeline and the detokenizer load from it."""
    result = run_without_lavit(f"""
        import os
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, Trainer, TrainingArguments, pipeline

        source, out = {str(lavit_folder)!r}, {str(tmp_path)!r}
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
        model.save_pretrained(out + "/resaved")
        processor.save_pretrained(out + "/resaved")

        def collate(rows):
            batch = processor(text=rows)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return batch

        args = TrainingArguments(output_dir=out + "/run", max_steps=1, save_steps=1, per_device_train_batch_size=2,
                                 report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=["a photo of a cat", "two dogs play"],
                          data_collator=collate, processing_class=processor)
        trainer.train()
        trainer.save_model(out + "/final")
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        peft_model.merge_and_unload().save_pretrained(out + "/merged")

        for name in ("resaved", "run/checkpoint-1", "final", "merged"):
            folder = os.path.join(out, name)
            detokenizer = AutoModel.from_pretrained(folder + "/detokenizer", trust_remote_code=True)
            print(name, os.path.isfile(folder + "/pipelines_lavit.py"), type(detokenizer).__name__)
        images = pipeline("lavit-text-to-image", model=out + "/resaved", trust_remote_code=True)(
            "a red bus", max_new_tokens=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        print("pipeline", type(images[0]["image"]).__name__)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-5:]
    assert lines == [f"{name} True LaVITDetokenizer" for name in ("resaved", "run/checkpoint-1", "final", "merged")] \
        + ["pipeline Image"]


def test_folder_states_its_transformers_range_and_refuses_others(lavit_folder, tmp_path):
    config = json.loads((lavit_folder / "config.json").read_text())
    assert config["transformers_requirement"] == transformers_requirement()
    assert json.loads((lavit_folder / "detokenizer" / "config.json").read_text())["transformers_requirement"]
    result = run_without_lavit(f"""
        import transformers
        transformers.__version__ = "4.57.1"  # a release outside the range, as a user's machine may have
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(lavit_folder)!r}, trust_remote_code=True)
        except ImportError as error:
            print(error)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith(f"LaVIT needs {transformers_requirement()}; transformers 4.57.1 is installed")


def test_a_folder_of_another_model_type_is_refused_before_building(lavit_folder):
    from lavit import LaVITForCausalLM, LaVITTokenizerModel

    with pytest.raises(ValueError, match="'lavit_detokenizer' model, not a 'lavit' one.*LaVITDetokenizer"):
        LaVITForCausalLM.from_pretrained(lavit_folder / "detokenizer")
    with pytest.raises(ValueError, match="'lavit' model, not a 'lavit_detokenizer' one.*LaVITForCausalLM"):
        LaVITDetokenizer.from_pretrained(lavit_folder)
    # a visual tokenizer nested in a LaVIT folder still loads (its config is the folder's `tokenizer_config`)
    assert LaVITTokenizerModel.from_pretrained(lavit_folder).config.codebook_size == 32


# ------------------------------------------------------------------------------------------------ command line


def test_cli_turns_any_internal_failure_into_one_line(lavit_folder, tmp_path, capsys, monkeypatch):
    from lavit import LaVITForCausalLM
    from lavit.cli import main

    code = main(["caption", str(tmp_path / "missing.png"), "--model", str(lavit_folder / "detokenizer")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1

    from conftest import real_photos
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(real_photos()[2]).save(photo)
    code = main(["caption", str(photo), "--model", str(lavit_folder / "detokenizer")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("lavit caption: error:") and "lavit_detokenizer" in err[-1]

    def fail(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")  # any type, deep inside

    monkeypatch.setattr(LaVITForCausalLM, "generate", fail)
    code = main(["caption", str(photo), "--model", str(lavit_folder)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit")]
    assert code == 1 and err == ["lavit caption: error: AttributeError: 'NoneType' object has no attribute 'shape' "
                                 "(set LAVIT_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("LAVIT_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["caption", str(photo), "--model", str(lavit_folder)])
