import base64
import io
import socket
import threading

import numpy as np
import torch
from PIL import Image


def write_tiny_lavit(folder):
    """A tiny `LaVITPipeline` folder (seeded, untrained): the language model with its processor and a pixel decoder,
    as `lavit serve` reads it."""
    from conftest import text_vocab_size, tiny_detokenizer_config, tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITDetokenizer, LaVITForCausalLM, LaVITImageProcessor, LaVITPipeline, LaVITProcessor

    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(tokenizer))).eval()
    processor = LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), tokenizer)
    detokenizer = LaVITDetokenizer(tiny_detokenizer_config()).eval()
    LaVITPipeline.from_detokenizer(model, processor, detokenizer).save_pretrained(folder)
    return folder


def png_bytes(seed: int, size=40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(seed: int, size=40) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed, size)).decode()


def alone(engine, job) -> list[str]:
    """The job's answers from `generate` alone (the reference), cut as the server cuts them."""
    ids = torch.tensor([job.input_ids])
    images = {} if job.pixel_values is None else {
        "pixel_values": job.pixel_values,
        "image_selection": {} if job.image_max_tokens is None else {"max_tokens": job.image_max_tokens}}
    output = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images,
                                   max_new_tokens=job.max_tokens, **job.sampling.reference_kwargs(job.n))
    answers = []
    for row in output[:, ids.shape[1]:]:
        tokens = []
        for token in row.tolist():
            if token in engine.eos_token_ids:
                break
            tokens.append(token)
        text = engine.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in job.stop if stop in text]
        answers.append(text[: min(cuts)] if cuts else text)
    return answers * job.n if job.sampling.greedy else answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_outcome(api, body: dict, streaming: threading.Event) -> str:
    """How a chat request (`body`: the `openai` client's `create` arguments) ended: "200", its status code,
    "connection error", or "stream error" (the clean error event that ends a stream whose replica was lost; any
    other error event is returned with its body). `streaming` is set once a stream yields."""
    import openai

    try:
        answer = api.chat.completions.create(**body)
        for _ in answer if body.get("stream") else ():
            streaming.set()
        return "200"
    except openai.APIStatusError as error:
        return str(error.status_code)
    except openai.APIConnectionError:
        return "connection error"
    except openai.APIError as error:  # an error event ended the stream: the clean one names its cause
        if (error.body or {}).get("code") != "replica_lost":
            return f"stream error {error.body}"
        return "stream error"
