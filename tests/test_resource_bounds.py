"""Bounded resources, checked before allocating (issue 24, section 4).

Every request whose memory or time follows from its arguments (new tokens, beams, images per prompt, image sides,
denoising steps) is checked in the model's entry points (`generate`, `generate_image_tokens`, the detokenizer's
`decode`) against the model's context length, its image size, the scheduler's steps and the memory there is, before
anything is allocated. In-process tests check the messages; the slow test runs each kind of request as a `lavit`
command under an address-space cap (`RLIMIT_AS`) and a time limit.
"""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from lavit.modeling.validation_lavit import available_memory, check_generation_budget, kv_cache_bytes
from lavit.training.sample_data import photo_images
from PIL import Image

HUGE = 10**9


@pytest.fixture
def photo_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(list(photo_images().values())[0]).save(path)
    return path


def image_prompt(processor, photo_file):
    return processor(images=[Image.open(photo_file)], text="<image>a photo of", return_tensors="pt")


def test_text_generation_is_bounded_by_the_context_and_the_memory(lavit_model, lavit_processor, photo_file):
    inputs = image_prompt(lavit_processor, photo_file)
    context = lavit_model.config.text_config.max_position_embeddings
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"max_new_tokens={HUGE} .* context length of {context} "
                                         r"\(max_position_embeddings\): give max_new_tokens <= \d+"):
        lavit_model.generate(**inputs, max_new_tokens=HUGE)
    with pytest.raises(ValueError, match="context length"):  # max_length counts the prompt, and is bounded too
        lavit_model.generate(**lavit_processor(text="a cat", return_tensors="pt"), max_length=HUGE)
    with pytest.raises(MemoryError, match=r"generate \(\d+ sequences .*the KV cache\) needs about .* GiB"):
        lavit_model.generate(**inputs, max_new_tokens=4, num_beams=HUGE)
    assert time.monotonic() - started < 30
    # inside the bounds generation runs as before
    output = lavit_model.generate(**inputs, max_new_tokens=3, num_beams=2)
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_image_generation_and_decoding_are_bounded(pipeline_folder):
    """Both pixel decoders (the `LaVITPipeline` and the detokenizer it is made from) go through one bound: sides,
    steps (0 is refused, not taken for the default), guidance and memory are checked before anything runs."""
    from conftest import tiny_detokenizer_config

    from lavit import LaVITDetokenizer, LaVITPipeline

    pipe = LaVITPipeline.from_pretrained(pipeline_folder)
    with pytest.raises(MemoryError, match="generate_image_tokens .* needs about"):
        pipe.language_model.generate_image_tokens(**pipe.processor(text="a red bus", return_tensors="pt"),
                                                  num_images_per_prompt=HUGE)
    detokenizer = LaVITDetokenizer(tiny_detokenizer_config()).eval()
    codes, counts = torch.tensor([1, 2, 3]), torch.tensor([3])
    limit = 2 * detokenizer.config.image_size
    many = 10**6  # images of 3 tokens each, at the largest side: about 100 GB of pixels alone
    for decode in (lambda **kwargs: detokenizer.decode(codes, counts, **kwargs),
                   lambda **kwargs: pipe("a red bus", **kwargs)):
        for height in (HUGE, 0, -64):
            with pytest.raises(ValueError, match=rf"height must be an integer in \[\d+, {limit}\] \(a multiple of"):
                decode(height=height)
        for steps in (HUGE, 0):
            with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
                decode(num_inference_steps=steps)
        with pytest.raises(ValueError, match="guidance_scale"):
            decode(guidance_scale=float("nan"))
    with pytest.raises(MemoryError, match=f"decoding {2 * many} UNet rows"):
        detokenizer.decode(codes.repeat(many), counts.repeat(many), height=limit, width=limit, guidance_scale=2.0)
    with pytest.raises(MemoryError, match=f"decoding {2 * many} UNet rows"):
        pipe("a red bus", num_images_per_prompt=many, height=limit, width=limit, guidance_scale=2.0)


def test_the_budget_check_takes_resolved_lengths(lavit_model):
    """One function that every path calls with its resolved lengths; its arithmetic is the KV cache's."""
    text_config = lavit_model.config.text_config
    past = lavit_model.model.language_model(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True).past_key_values
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in past.layers) * 4
    assert kv_cache_bytes(text_config, rows=1, length=5, dtype_bytes=4) == stored
    check_generation_budget(text_config, 10, 20, rows=4)  # fits: no error
    context = text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"give max_new_tokens <= {context - 10}"):
        check_generation_budget(text_config, 10, context, rows=1)
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            check_generation_budget(text_config, 10, bad, rows=1)
    assert available_memory() > 0


def test_caption_with_a_huge_token_count_ends_with_one_line(lavit_folder, photo_file, capsys):
    from lavit.cli import main

    code = main(["caption", str(photo_file), "--model", str(lavit_folder), "--max-new-tokens", str(HUGE)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lavit ")]
    assert code == 1 and "Traceback" not in err and len(lines) == 1
    assert "context length" in lines[0] and f"max_new_tokens={HUGE}" in lines[0]


CAPPED = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from lavit.cli import main
for argv in json.loads(sys.argv[1]):
    started = time.monotonic()
    code = main(argv)
    print(json.dumps({{"code": code, "seconds": time.monotonic() - started}}), flush=True)
    print("=== end of request", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_every_kind_of_request_fails_fast_under_a_memory_cap(lavit_folder, pipeline_folder, photo_file, tmp_path):
    """Each request of `lavit` commands whose memory follows from its arguments, run under a 4 GiB address-space cap
    (one process, the requests one after the other): each stops within seconds with the bound's one line, where
    unchecked it would try to allocate gigabytes (and fail with the allocator's message, or be killed)."""
    model, pipeline, image = str(lavit_folder), str(pipeline_folder), str(photo_file)
    requests = {
        "caption tokens": (["caption", image, "--model", model, "--max-new-tokens", str(HUGE)], "context length"),
        "caption beams": (["caption", image, "--model", model, "--num-beams", str(HUGE)], "KV cache"),
        "vqa tokens": (["vqa", image, "--question", "what?", "--model", model, "--max-new-tokens", str(HUGE)],
                       "context length"),
        "images per prompt": (["generate", "a bus", "-o", str(tmp_path / "a.png"), "--model", pipeline,
                               "--num-images", str(HUGE)], "UNet rows"),
        "image side": (["generate", "a bus", "-o", str(tmp_path / "b.png"), "--model", pipeline, "--height",
                        str(HUGE)], "height must be"),
        "denoising steps": (["reconstruct", image, "-o", str(tmp_path / "c.png"), "--model", pipeline,
                             "--steps", str(HUGE)], "num_inference_steps must be"),
    }
    result = subprocess.run(
        [sys.executable, "-c", CAPPED.format(cap=4 * 2**30), json.dumps([argv for argv, _ in requests.values()])],
        capture_output=True, text=True, timeout=600,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = result.stderr.split("=== end of request")
    assert len(outcomes) == len(requests)
    for (kind, (_, message)), outcome, err in zip(requests.items(), outcomes, errors, strict=False):
        lines = [line for line in err.splitlines() if line.startswith("lavit ")]
        assert outcome["code"] == 1 and len(lines) == 1 and message in lines[0], (kind, err[-2000:])
        assert outcome["seconds"] < 30, (kind, outcome)
    assert not any((tmp_path / name).exists() for name in ("a.png", "b.png", "c.png"))


@pytest.mark.parametrize("over", [0, 1, 40])
def test_a_prompt_that_fills_the_context_is_told_what_to_shorten(lavit_model, over):
    """#24 §8: a prompt as long as the context got "give max_new_tokens <= 0". Every context check's advice goes
    through `room_advice`: the prompt's length, the context and what to change, never a bound below 1."""
    from lavit.training.sequences import check_max_length

    context = lavit_model.config.text_config.max_position_embeddings
    checks = {
        "generate": lambda: check_generation_budget(lavit_model.config.text_config, context + over, 1, rows=1),
        "image tokens": lambda: check_generation_budget(lavit_model.config.text_config, context + over, 1, rows=1,
                                                        given_length=5),
        "--max_length": lambda: check_max_length(1, lavit_model.config, image_tokens=context + over),
    }
    for name, check in checks.items():
        with pytest.raises(ValueError) as error:
            check()
        message = str(error.value)
        assert f"{context + over} tokens" in message and f"context of {context}" in message, (name, message)
        assert "shorter prompt" in message or "fewer patches" in message, (name, message)
        assert not re.search(r"<= (0|-\d)", message), (name, message)
    with pytest.raises(ValueError, match="fewer visual tokens"):  # a prompt made long by its images
        checks["image tokens"]()
