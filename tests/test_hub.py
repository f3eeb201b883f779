"""save_pretrained / from_pretrained, Auto classes and trust_remote_code loading without `lavit` installed."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import photo_batch, tiny_tokenizer_config
from transformers import AutoConfig, AutoModel

from lavit import LaVITTokenizerConfig, LaVITTokenizerModel

# prepended to the subprocess scripts: `lavit` cannot be imported there, as on a machine without the package
BLOCK_LAVIT = textwrap.dedent("""
    import sys

    class BlockLavit:
        def find_spec(self, name, path=None, target=None):
            if name == "lavit" or name.startswith("lavit."):
                raise ImportError("lavit is blocked in this process")

    sys.meta_path.insert(0, BlockLavit())
""")


def trained_tiny_model():
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config()).train()
    model(photo_batch(model, 2)).loss.backward()  # runs k-means init + an EMA update: buffers hold real state
    return model.eval()


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = LaVITTokenizerModel.from_pretrained(tmp_path)
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[key]), key
    assert bool(loaded.quantizer.initialized)
    pixel_values = photo_batch(model, 3)
    assert torch.equal(model.tokenize(pixel_values).code_ids, loaded.tokenize(pixel_values).code_ids)


def test_auto_classes_and_saved_code_files(tmp_path):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lavit.LaVITTokenizerConfig",
        "AutoModel": "modeling_lavit_tokenizer.LaVITTokenizerModel",
    }
    assert config["vision_config"]["model_type"] == "lavit_eva_vision"
    for name in ("configuration_lavit.py", "modeling_lavit_tokenizer.py", "attention_lavit.py", "modeling_eva_vit.py"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "convert_original_lavit.py").exists()  # conversion is not part of the model's code
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LaVITTokenizerConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LaVITTokenizerModel)
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)


def test_remote_code_loads_where_lavit_cannot_be_imported(tmp_path):
    model = trained_tiny_model()
    folder = tmp_path / "tokenizer"
    model.save_pretrained(folder)
    pixel_values = photo_batch(model, 2)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = model.tokenize(pixel_values).code_ids.tolist()
    script = BLOCK_LAVIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        try:
            import lavit  # noqa: F401
            raise SystemExit("lavit should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(name == "lavit" or name.startswith("lavit.") for name in sys.modules)
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        print(model.tokenize(pixels).code_ids.tolist())
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_lavit_folder_loads_every_auto_class_without_lavit(lavit_model, lavit_processor, tmp_path):
    from conftest import real_photos

    folder = tmp_path / "lavit"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lavit.LaVITConfig",
        "AutoModel": "modeling_lavit.LaVITModel",
        "AutoModelForCausalLM": "modeling_lavit.LaVITForCausalLM",
        "AutoModelForImageTextToText": "modeling_lavit.LaVITForCausalLM",
        "AutoModelForMultimodalLM": "modeling_lavit.LaVITForCausalLM",
    }
    assert config["custom_pipelines"]["lavit-text-to-image"]["impl"] == "pipelines_lavit.LaVITTextToImagePipeline"
    for name in ("modeling_lavit.py", "pipelines_lavit.py", "processing_lavit.py",
                 "image_processing_lavit.py", "generation_config.json",
                 "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    photo = real_photos()[2]
    inputs = lavit_processor(images=[photo], text="<image>a photo of")
    expected = lavit_model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist()
    torch.save(photo, tmp_path / "photo.pt")
    script = BLOCK_LAVIT + textwrap.dedent(f"""
        import torch
        from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor)
        folder = {str(folder)!r}
        assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "LaVITConfig"
        assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "LaVITModel"
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        photo = torch.load({str(tmp_path / "photo.pt")!r}, weights_only=False)
        inputs = processor(images=[photo], text="<image>a photo of")
        print(model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist())
        low = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                   device_map="auto")
        assert low.dtype == torch.bfloat16 and low.lm_head.weight.dtype == torch.bfloat16
        print(low.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1])
        assert not any(name == "lavit" or name.startswith("lavit.") for name in sys.modules)
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == expected
    assert int(lines[-1]) == len(expected[0]) - 2


def test_the_required_files_are_the_code_a_saved_folder_holds(lavit_folder, pipeline_folder):
    """`hub_cards.export`'s lists of required files are derived from the code (`saving_lavit.code_files`): they are
    exactly the `.py` files a saved model folder and each part of a saved pipeline folder hold, and every file named
    is there (the check passes on a folder as saved, with its card)."""
    from lavit.hub_cards.export import PIPELINE_FOLDERS, PIPELINE_ROOT_FILES, REQUIRED_FILES, missing_files

    def code(names):
        return {name for name in names if name.endswith(".py")}

    assert code(REQUIRED_FILES) == {path.name for path in lavit_folder.glob("*.py")}
    assert code(PIPELINE_ROOT_FILES) == {path.name for path in pipeline_folder.glob("*.py")}
    for name, required in PIPELINE_FOLDERS.items():
        assert code(required) == {path.name for path in (pipeline_folder / name).glob("*.py")}, name
    (lavit_folder / "README.md").write_text("card")
    (pipeline_folder / "README.md").write_text("card")
    assert missing_files(lavit_folder, REQUIRED_FILES) == []
    assert missing_files(pipeline_folder, PIPELINE_ROOT_FILES, weights=False) == []
