"""Pipelines on a saved model folder: built-in image-text-to-text (plain and chat) and lavit-text-to-image."""

import pytest
import torch
from conftest import real_photos
from PIL import Image
from transformers import pipeline


def saved_folder(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_image_text_to_text_pipeline_captions_and_answers(lavit_model, lavit_processor, tmp_path):
    folder = saved_folder(lavit_model, lavit_processor, tmp_path / "lavit")
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    photo = Image.fromarray(real_photos()[0])
    prompt = "<image>question: what is in the picture? answer:"
    result = pipe(images=photo, text=prompt, max_new_tokens=5, generate_kwargs={"do_sample": False},
                  return_full_text=False)
    inputs = lavit_processor(images=[photo], text=prompt)
    expected = lavit_model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    expected_text = lavit_processor.batch_decode(expected, skip_special_tokens=True)[0]
    assert result[0]["generated_text"].strip() == expected_text.strip()

    messages = [{"role": "user", "content": [{"type": "image", "image": photo},
                                             {"type": "text", "text": "describe the image"}]}]
    chat = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False})
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    rendered = lavit_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "USER: <image>describe the image ASSISTANT:"


def test_text_to_image_pipeline_returns_code_ids(lavit_model, lavit_processor, tmp_path):
    folder = saved_folder(lavit_model, lavit_processor, tmp_path / "lavit")
    pipe = pipeline("lavit-text-to-image", model=folder, trust_remote_code=True)
    results = pipe("a red bus", max_new_tokens=6, min_new_tokens=2, generator=torch.Generator().manual_seed(0),
                   num_images_per_prompt=2)
    assert len(results) == 2
    expected = lavit_model.generate_image_tokens(**lavit_processor(text="a red bus"), max_new_tokens=6,
                                                 min_new_tokens=2, generator=torch.Generator().manual_seed(0),
                                                 num_images_per_prompt=2)
    assert [result["code_ids"] for result in results] == [ids.tolist() for ids in expected.per_image()]
    assert all(result["token_count"] == len(result["code_ids"]) for result in results)
    with pytest.raises(ValueError, match=r"does not take \['guidance'\]"):
        pipe("a red bus", guidance=4.0)
    # every setting of the model's image generation reaches it (read from the model: no copied list to drift)
    from dataclasses import fields

    from lavit.processing.pipelines_lavit import image_generation_arguments

    settings = {field.name for field in fields(lavit_model.image_generation_config_class)}
    assert settings | {"generator", "negative_input_ids"} <= image_generation_arguments(lavit_model)
    assert {"cache_implementation", "compile_decoding"} <= settings
    forward = pipe._sanitize_parameters(cache_implementation="dynamic", compile_decoding=False)[1]
    assert forward == {"cache_implementation": "dynamic", "compile_decoding": False}
