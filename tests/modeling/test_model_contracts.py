"""The contracts every transformers model keeps (our own tests of the invariants of transformers' common model tests):
complete folders on every save path, the tested transformers range, argument conventions, vocabulary, big-model
loading."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    photo_batch,
    real_photos,
    text_vocab_size,
    tiny_lavit_config,
    tiny_tokenizer_config,
)
from lavit.modeling import LaVITCausalLMOutputWithPast
from lavit.modeling.transformers_compat import transformers_requirement
from test_hub import BLOCK_LAVIT

from lavit import LaVITDetokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_without_lavit(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter where `lavit` cannot be imported (remote code only)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
                   "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", BLOCK_LAVIT + textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=tmp_path, env=environment, timeout=300)


# ------------------------------------------------------------------------------------------------ folders


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_every_save_path_without_lavit_gives_a_complete_folder(lavit_folder, tmp_path):
    """Re-saved remote code, Trainer checkpoint and final save, PEFT-merged model: each keeps the pipeline file, so
    the text-to-image pipeline loads from it. (Pixels are `LaVITPipeline`'s: an LM folder holds no decoder.)"""
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
            reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
            print(name, os.path.isfile(folder + "/pipelines_lavit.py"), type(reloaded).__name__)
        images = pipeline("lavit-text-to-image", model=out + "/resaved", trust_remote_code=True)(
            "a red bus", max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        print("pipeline", len(images[0]["code_ids"]) == images[0]["token_count"])
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-5:]
    assert lines == [f"{name} True LaVITModel" for name in ("resaved", "run/checkpoint-1", "final", "merged")] \
        + ["pipeline True"]


def test_folder_states_its_transformers_range_and_refuses_others(lavit_model, lavit_folder, pipeline_folder,
                                                                 tmp_path):
    from lavit.hub_cards import model_card

    config = json.loads((lavit_folder / "config.json").read_text())
    assert config["transformers_requirement"] == transformers_requirement()
    assert f"pip install '{transformers_requirement()}'" in str(model_card(lavit_model, {}))
    for name in ("language_model", "condition_encoder"):
        assert json.loads((pipeline_folder / name / "config.json").read_text())["transformers_requirement"]
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


def test_a_folder_of_another_model_type_is_refused_before_building(lavit_folder, pipeline_folder):
    from lavit import LaVITForCausalLM, LaVITTokenizerModel

    with pytest.raises(ValueError, match="model_type 'lavit_detokenizer', not 'lavit'.*LaVITDetokenizer"):
        LaVITForCausalLM.from_pretrained(pipeline_folder / "condition_encoder")
    with pytest.raises(ValueError, match="model_type 'lavit', not 'lavit_detokenizer'.*LaVITForCausalLM"):
        LaVITDetokenizer.from_pretrained(lavit_folder)
    # the visual tokenizer nested in a LaVIT folder is refused too: its weights there carry the LaVIT model's prefix,
    # so transformers would build it from the nested config with random weights
    with pytest.raises(ValueError, match="model_type 'lavit', not 'lavit_tokenizer'.*LaVITForCausalLM"):
        LaVITTokenizerModel.from_pretrained(lavit_folder)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_turns_any_internal_failure_into_one_line(lavit_folder, tmp_path, capsys, monkeypatch):
    from lavit import LaVITForCausalLM
    from lavit.cli import main

    code = main(["caption", str(tmp_path / "missing.png"), "--model", str(lavit_folder / "detokenizer")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1

    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(real_photos()[2]).save(photo)
    code = main(["caption", str(photo), "--model", str(lavit_folder / "detokenizer")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("lavit caption: error:") and "detokenizer" in err[-1]

    def fail(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")  # any type, deep inside

    monkeypatch.setattr(LaVITForCausalLM, "generate", fail)
    code = main(["caption", str(photo), "--model", str(lavit_folder)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit")]
    assert code == 1 and err == [f"lavit caption: error: {photo}: AttributeError: 'NoneType' object has no attribute "
                                 "'shape' (set LAVIT_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("LAVIT_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["caption", str(photo), "--model", str(lavit_folder)])


# ------------------------------------------------------------------------------------------------ forward contracts


def image_batch(processor, padding_side="left"):
    photos = real_photos()
    return processor(images=[photos[0], photos[1]], text=["<image>a photo of a cat sitting", "two <image> dogs"],
                     padding_side=padding_side)


@torch.no_grad()
def test_left_padded_position_ids_are_padding_not_packing(lavit_model, lavit_processor):
    """The usual position ids of a left-padded batch restart at 0 after the pads (which get 1): same logits and loss
    as without them, not a packed batch run without its attention mask."""
    batch = image_batch(lavit_processor)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    reference = lavit_model(**batch, labels=labels)
    given = lavit_model(**batch, labels=labels, position_ids=position_ids)
    torch.testing.assert_close(given.logits, reference.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(given.loss, reference.loss)
    # a restart among attended tokens is still packing: an image row and a text row in one row, as separate rows
    first, second = lavit_processor(images=[real_photos()[0]], text="<image>a photo of a cat"), lavit_processor(
        text="two dogs play")
    row = torch.cat([first["input_ids"], second["input_ids"]], dim=1)
    lengths = [first["input_ids"].shape[1], second["input_ids"].shape[1]]
    packed_positions = torch.cat([torch.arange(length) for length in lengths])[None]
    packed = lavit_model(input_ids=row, attention_mask=torch.ones_like(row), position_ids=packed_positions,
                         pixel_values=first["pixel_values"]).logits
    alone = [lavit_model(**first).logits, lavit_model(**second).logits]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_return_dict_false_gives_tuples_for_every_model(lavit_model, lavit_processor, tiny_model):
    batch = image_batch(lavit_processor)
    full = lavit_model(**batch)
    as_tuple = lavit_model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)
    assert isinstance(lavit_model.model(**batch, return_dict=False), tuple)
    lavit_model.config.return_dict = False
    from_config = lavit_model(**batch)
    assert isinstance(from_config, tuple) and torch.equal(from_config[0], full.logits)
    assert isinstance(lavit_model(**batch, return_dict=True), LaVITCausalLMOutputWithPast)
    pixel_values = photo_batch(tiny_model, 2)
    tokenizer_output = tiny_model(pixel_values)
    tokenizer_tuple = tiny_model(pixel_values, return_dict=False)
    assert isinstance(tokenizer_tuple, tuple) and torch.equal(tokenizer_tuple[0], tokenizer_output.loss)


@torch.no_grad()
def test_shift_labels_are_the_targets(lavit_model, lavit_processor):
    text = lavit_processor(text=["a photo of a cat", "two dogs play in the park"])
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    reference = lavit_model(**text, labels=labels).loss
    torch.testing.assert_close(lavit_model(**text, shift_labels=shift_labels).loss, reference)
    # they win over labels (as in transformers' losses): other targets, other loss
    other = shift_labels.masked_fill(shift_labels != -100, 7)
    assert not torch.isclose(lavit_model(**text, labels=labels, shift_labels=other).loss, reference)
    batch = image_batch(lavit_processor)
    with pytest.raises(ValueError, match="shift_labels cannot be used with image placeholders"):
        lavit_model(**batch, shift_labels=batch["input_ids"])


@torch.no_grad()
def test_inputs_embeds_with_images_in_forward_and_generate(lavit_model, lavit_processor):
    batch = image_batch(lavit_processor)
    embeds = lavit_model.get_input_embeddings()(batch["input_ids"])
    reference = lavit_model(**batch)
    torch.testing.assert_close(lavit_model(**batch, inputs_embeds=embeds).logits, reference.logits)
    scaled = lavit_model(**batch, inputs_embeds=embeds * 2).logits  # the given embeddings are used, not the ids
    assert not torch.allclose(scaled, reference.logits)
    # without input_ids the placeholders are found by their embeddings (as LLaVA finds its image tokens)
    alone = lavit_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(alone, reference.logits)
    with pytest.raises(ValueError, match="image placeholder"):  # no placeholder embedding among them: named
        lavit_model(inputs_embeds=embeds * 2, attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    expected = lavit_model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(lavit_model.generate(**batch, inputs_embeds=embeds, max_new_tokens=4, do_sample=False), expected)


@torch.no_grad()
def test_assisted_decoding_with_an_image_prompt(lavit_model, lavit_processor):
    inputs = lavit_processor(images=[real_photos()[0]], text="<image>a photo of")
    expected = lavit_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assisted = lavit_model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=lavit_model)
    assert torch.equal(assisted, expected)
    lookup = lavit_model.generate(**inputs, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(lookup, expected)


def test_attn_implementation_reaches_a_transformers_vision_encoder(tmp_path):
    from lavit import LaVITTokenizerModel

    clip = dict(model_type="clip_vision_model", image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64)
    LaVITTokenizerModel(tiny_tokenizer_config(vision_config=clip)).save_pretrained(tmp_path / "tokenizer")
    for implementation in ("eager", "sdpa"):
        model = LaVITTokenizerModel.from_pretrained(tmp_path / "tokenizer", attn_implementation=implementation)
        assert model.vision_model.config._attn_implementation == implementation
    from lavit import LaVITForCausalLM

    config = tiny_lavit_config(40, tokenizer_config=tiny_tokenizer_config(vision_config=clip))
    LaVITForCausalLM(config).save_pretrained(tmp_path / "lavit")
    model = LaVITForCausalLM.from_pretrained(tmp_path / "lavit", attn_implementation="eager")
    assert model.visual_tokenizer.vision_model.config._attn_implementation == "eager"


def test_tensor_parallel_plan_covers_the_tied_head(text_tokenizer):
    from lavit import LaVITForCausalLM

    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer), tie_word_embeddings=True))
    plan = model.tp_plan
    # newer LLaMA plans split the embedding over the vocabulary; transformers 5.20 replicates it
    assert plan.get("model.language_model.embed_tokens", "embedding_rowwise") == "embedding_rowwise"
    # the head is split over the vocabulary like its tied embedding, and gathered for the logits
    assert plan["lm_head"] == "colwise_gather_output"
    assert model.lm_head.weight is model.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------------ vocabulary


def test_text_tokenizer_and_model_agree_on_every_id(lavit_model, lavit_processor):
    tokenizer, config = lavit_processor.tokenizer, lavit_model.config
    assert len(tokenizer) == config.vocab_size == config.visual_token_end
    assert tokenizer.convert_tokens_to_ids(["[IMG]", "[/IMG]", "<visual_0>", "<visual_31>"]) == [
        config.image_start_token_id, config.image_end_token_id, config.visual_token_offset, config.visual_token_end - 1
    ]
    # the usual recipe: add a text token, resize to the tokenizer; every visual row survives
    visual_rows = lavit_model.get_input_embeddings().weight[config.visual_token_offset:].detach().clone()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(["<new_word>"])
    new_id = tokenizer.convert_tokens_to_ids("<new_word>")
    assert new_id == config.visual_token_end  # never the id of a visual code
    lavit_model.resize_token_embeddings(len(tokenizer))
    assert torch.equal(lavit_model.get_input_embeddings().weight[config.visual_token_offset:new_id], visual_rows)
    batch = lavit_processor(images=[real_photos()[0]], text="<image>a photo of")
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[new_id]])], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    outputs = lavit_model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(outputs.loss) and outputs.logits.shape[-1] == new_id + 1
    decoded = tokenizer.decode([config.image_start_token_id, config.visual_token_offset, new_id],
                               skip_special_tokens=True)
    assert decoded.strip() == "<new_word>"


def test_resize_that_drops_visual_rows_is_refused(lavit_model):
    config = lavit_model.config
    weight = lavit_model.get_input_embeddings().weight.detach().clone()
    for size in (config.text_vocab_size + 2, config.visual_token_end - 1):
        with pytest.raises(ValueError, match=f"resize_token_embeddings\\({size}\\) would drop rows"):
            lavit_model.resize_token_embeddings(size)
    assert torch.equal(lavit_model.get_input_embeddings().weight, weight)


def test_chat_template_marks_the_assistant_tokens(lavit_processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": real_photos()[0]},
                                      {"type": "text", "text": "what is in the picture?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "two dogs play in the park"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a bowl of coffee"}]}],
    ]
    for padding_side in ("left", "right"):
        out = lavit_processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
            processor_kwargs={"padding_side": padding_side},
        )
        assert out["assistant_masks"].shape == out["input_ids"].shape
        marked = [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        assert [lavit_processor.tokenizer.decode(ids) for ids in marked] == ["a cat</s>", "a bowl of coffee</s>"]
        assert out["pixel_values"].shape[0] == 1


# ------------------------------------------------------------------------------------------------ big-model loading


@torch.no_grad()
def test_offloaded_model_gives_the_logits_and_tokens_of_the_whole_model(lavit_model, lavit_processor, tmp_path):
    """device_map="auto" with a CPU budget of a third of the model: the rest goes to disk (vision layers, the LM and
    its head among them), and every result matches the model loaded whole."""
    from lavit import LaVITForCausalLM

    lavit_model.save_pretrained(tmp_path / "lavit")
    size = sum(parameter.numel() * parameter.element_size() for parameter in lavit_model.parameters())
    offloaded = LaVITForCausalLM.from_pretrained(
        tmp_path / "lavit", device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path / "offload"
    )
    placement = offloaded.hf_device_map
    assert "disk" in placement.values() and placement["lm_head"] == "disk"
    assert any(name.startswith("model.visual_tokenizer.vision_model.layers") and device == "disk"
               for name, device in placement.items())
    batch = image_batch(lavit_processor)
    torch.testing.assert_close(offloaded(**batch).logits, lavit_model(**batch).logits, rtol=0, atol=1e-6)
    prompt = lavit_processor(text=["a red bus", "a cat"])
    expected = lavit_model.generate_image_tokens(**prompt, do_sample=False, max_new_tokens=8)
    tokens = offloaded.generate_image_tokens(**prompt, do_sample=False, max_new_tokens=8)
    assert torch.equal(tokens.code_ids, expected.code_ids) and torch.equal(tokens.token_counts, expected.token_counts)
    assert torch.equal(offloaded.generate(**batch, max_new_tokens=4, do_sample=False),
                       lavit_model.generate(**batch, max_new_tokens=4, do_sample=False))
