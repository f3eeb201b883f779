"""Requests -> model inputs (`RequestPreparer`, on the ingress: processor and config only) and model inputs -> tokens
and images (`LaVITEngine`, on each model replica). Both are plain Python: Ray Serve only moves `ChatJob`s and
`ImageJob`s between them, so a test can run them in one process.
"""

import asyncio
import base64
import io
import secrets
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from lavit.modeling.generation_lavit import SuppressImageTokensLogitsProcessor, row_generators
from lavit.modeling.validation_lavit import SEED, floating_dtype

from .batching import RowSampler, RowText, RowTexts, SamplingSettings
from .media import read_image_url
from .schemas import ChatCompletionRequest, ImageGenerationRequest, ImagePart, OpenAIError, ServeLimits


@dataclass
class ChatJob:
    """One chat request, ready for the model: compact prompt ids, its images' pixels, and how to decode."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    sampling: SamplingSettings
    n: int
    max_tokens: int
    stop: list[str]
    image_max_tokens: int | None
    cancelled: bool = False  # set where the request is given up (timeout, closed connection): its rows stop


@dataclass
class ImageJob:
    """One image-generation request, ready for the model."""

    prompt: str
    input_ids: list[int]
    n: int
    seed: int
    size: tuple[int, int] | None
    settings: dict

    def generators(self, device) -> list[torch.Generator]:
        """One random stream per image, drawn from the request's seed: the pipeline's `generator` list, so the
        request's images are the same alone or batched with other requests."""
        return row_generators(torch.Generator().manual_seed(self.seed), self.n, self.n, device)

    def batch_key(self) -> tuple:
        """Requests with equal keys share one pipeline call (same size and decoding settings)."""
        return self.size, tuple(sorted(self.settings.items()))


class RequestPreparer:
    """The checks that need the tokenizer and the config (prompt length against the context, images), and the
    conversion of OpenAI messages to LaVIT's prompt (the processor's chat template)."""

    def __init__(self, model_path: str, limits: ServeLimits, allowed_local_media_path: str | None = None):
        from transformers import AutoConfig

        from lavit import LaVITProcessor
        from lavit.command_inputs import lavit_model_paths

        if allowed_local_media_path is not None and not Path(allowed_local_media_path).is_dir():
            raise ValueError(f"--allowed-local-media-path {allowed_local_media_path} is not a folder")
        language_model_path, processor_path = lavit_model_paths(model_path, "")
        self.processor = LaVITProcessor.from_pretrained(processor_path)
        self.config = AutoConfig.from_pretrained(language_model_path)
        self.limits, self.allowed_local_media_path = limits, allowed_local_media_path
        self.context_length = self.config.text_config.max_position_embeddings
        self.tokens_per_image = self.config.tokenizer_config.num_patches

    def chat_job(self, request: ChatCompletionRequest) -> ChatJob:
        # 1. messages -> the chat template's text with `<image>` placeholders, and the images
        messages, images = [], []
        for index, message in enumerate(request.messages):
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
                continue
            content = []
            for part_index, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    param = f"messages[{index}].content[{part_index}].image_url"
                    images.append(read_image_url(part.image_url.url, param, self.limits.max_image_pixels,
                                                 self.allowed_local_media_path))
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": part.text})
            messages.append({"role": message.role, "content": content})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.encode(prompt, images, "messages")
        input_ids = inputs["input_ids"][0].tolist()
        # 2. the prompt's longest possible length (every image at its most visual tokens) and the answer fit
        per_image = min(request.image_max_tokens or self.tokens_per_image, self.tokens_per_image)
        prompt_bound = len(input_ids) + len(images) * per_image
        room = self.context_length - prompt_bound
        max_tokens = request.new_token_limit() or min(self.limits.max_tokens, room)
        if room < 1 or max_tokens > room:
            raise OpenAIError(
                f"the prompt takes up to {prompt_bound} tokens ({len(input_ids)} text, {len(images)} image(s) of up "
                f"to {per_image} visual tokens) and the answer up to {max_tokens}; the model's context is "
                f"{self.context_length}: shorten the messages, send fewer images, lower image_max_tokens or "
                f"max_tokens", "messages", code="context_length_exceeded")
        sampling = SamplingSettings(request.temperature, request.top_p, request.top_k, request_seed(request))
        return ChatJob(input_ids, inputs.get("pixel_values"), sampling, request.n, max_tokens, request.stop_strings(),
                       request.image_max_tokens)

    def encode(self, text: str, images: list, param: str):
        """The processor's inputs for a prompt of either endpoint; text it refuses (LaVIT's control or visual tokens
        spelled out, `<image>` placeholders without their images) is a 400 naming `param`, the same for both."""
        try:
            return self.processor(text=text, images=images or None, return_tensors="pt")
        except ValueError as error:
            raise OpenAIError(str(error).splitlines()[0], param) from error

    def image_job(self, request: ImageGenerationRequest) -> ImageJob:
        input_ids = self.encode(request.prompt, [], "prompt")["input_ids"][0].tolist()
        if len(input_ids) + self.tokens_per_image + 2 > self.context_length:
            raise OpenAIError(f"the prompt has {len(input_ids)} tokens; with an image of up to "
                              f"{self.tokens_per_image} visual tokens it must fit the context of "
                              f"{self.context_length}", "prompt", code="context_length_exceeded")
        settings = {name: getattr(request, name) for name in ("guidance_scale", "decoder_guidance_scale",
                                                              "num_inference_steps")
                    if getattr(request, name) is not None}
        if request.image_max_tokens is not None:
            settings["max_new_tokens"] = min(request.image_max_tokens, self.tokens_per_image)
            settings["min_new_tokens"] = min(20, settings["max_new_tokens"])
        return ImageJob(request.prompt, input_ids, request.n, request_seed(request), request.pixel_size(), settings)


def request_seed(request: ChatCompletionRequest | ImageGenerationRequest) -> int:
    """The request's seed, or a random one in the same range (lavit's one seed range, `SEED`: torch's CPU generator
    reads 32 bits, so a wider seed would repeat a narrower one's draws)."""
    return request.seed if request.seed is not None else secrets.randbelow(SEED.high + 1)


class LaVITEngine:
    """A loaded LaVIT model on one device: a batch of `ChatJob`s in one `generate`, images through `render_images`."""

    def __init__(self, model_path: str, device: str | None = None, dtype: str | None = None):
        from lavit import LaVITForCausalLM, LaVITPipeline, LaVITProcessor
        from lavit.command_inputs import lavit_model_paths
        from lavit.modeling.folders_lavit import is_lavit_pipeline_folder

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        default = torch.bfloat16 if device.startswith("cuda") else None
        torch_dtype = floating_dtype(dtype, "--dtype", optional=True) or default
        self.pipeline = None  # a pipeline folder also draws images; a language model folder only writes text
        if is_lavit_pipeline_folder(model_path):
            self.pipeline = LaVITPipeline.from_pretrained(model_path, torch_dtype=torch_dtype).to(device)
            self.pipeline.set_progress_bar_config(disable=True)
            if self.pipeline.language_model is None:
                raise ValueError(f"{model_path} is a pixel decoder without a language model: serve a pipeline "
                                 f"folder with one (LaVITPipeline.from_pretrained(folder, language_model=...))")
            self.model, self.processor = self.pipeline.language_model.eval(), self.pipeline.processor
        else:
            language_model_path, processor_path = lavit_model_paths(model_path, "")
            self.model = LaVITForCausalLM.from_pretrained(language_model_path, dtype=torch_dtype).to(device).eval()
            self.processor = LaVITProcessor.from_pretrained(processor_path)
        self.device = torch.device(device)
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos if eos is not None
                                                                    else self.processor.tokenizer.eos_token_id])

    def run_batch(self, jobs: list[ChatJob], on_step) -> list[RowText]:
        """Decodes every job's `n` rows in one `generate`; `on_step(deltas)` gets one `(text_delta, finish_reason)`
        (or None) per row after each step, rows in job order; a job whose `cancelled` is set stops at the next step.
        Returns the rows."""
        # 1. rows: each job's prompt repeated `n` times, left-padded together; its images once per row
        rows = [job.input_ids for job in jobs for _ in range(job.n)]
        length = max(len(ids) for ids in rows)
        pad = self.model.config.text_config.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        image_inputs = self._image_inputs(jobs)
        # 2. per-row sampling and stopping (see batching.py)
        texts = [RowText(job.max_tokens, job.stop, cancelled=lambda job=job: job.cancelled)
                 for job in jobs for _ in range(job.n)]
        streamer = RowTexts(self.processor.tokenizer, texts, self.eos_token_ids, on_step)
        # LaVIT's generate puts its image-token suppression after the processors it is given: the sampler draws from
        # the suppressed scores, as `generate(generator=...)` does, so it suppresses them first itself
        suppress = SuppressImageTokensLogitsProcessor(self.model.config.text_vocab_size,
                                                      self.model.config.visual_token_end)
        sampler = RowSampler([job.sampling for job in jobs], [job.n for job in jobs])
        self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **image_inputs, do_sample=False,
            max_new_tokens=max(job.max_tokens for job in jobs), logits_processor=[suppress, sampler], streamer=streamer,
            stopping_criteria=[streamer], pad_token_id=pad,
        )
        return texts

    async def stream(self, jobs: list[ChatJob]):
        """`run_batch` in a thread, as an async generator of one item per job and step: the `n` deltas of the job's
        rows (`(text_delta, finish_reason)` or None), or `StopIteration` once all its rows have finished (the shape
        Ray Serve's streaming `@serve.batch` takes)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        runner = asyncio.ensure_future(asyncio.to_thread(
            self.run_batch, jobs, lambda deltas: loop.call_soon_threadsafe(queue.put_nowait, deltas)))
        starts = [sum(job.n for job in jobs[:index]) for index in range(len(jobs))]
        done = [False] * len(jobs)
        try:
            while not (runner.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, runner], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                deltas, items = getter.result(), []
                for index, (job, start) in enumerate(zip(jobs, starts, strict=True)):
                    rows = deltas[start : start + job.n]
                    items.append(StopIteration if done[index] else rows)
                    done[index] = done[index] or all(row is None or row[1] is not None for row in rows)
                yield items
            runner.result()  # a failure inside generate is raised here
        finally:  # the reader left (a timeout, a closed connection): the rows stop rather than decode for no one
            for job in jobs:
                job.cancelled = True

    def _image_inputs(self, jobs: list[ChatJob]) -> dict:
        """Every row's images. One selection for the whole batch when the selector is deterministic and the jobs agree
        on the visual token budget; else each image's keep mask from its own job (its budget, or a sampled selection
        drawn from the job's seed, as `lavit caption --seed` draws it): the same tokens as the job alone."""
        per_row = [job for job in jobs for _ in range(job.n) if job.pixel_values is not None]
        if not per_row:
            return {}
        pixel_values = torch.cat([job.pixel_values for job in per_row]).to(self.device, self.model.dtype)
        visual_tokenizer = self.model.visual_tokenizer
        budgets = {job.image_max_tokens for job in per_row}
        sampled = visual_tokenizer.config.selection_mode == "sample" and None in budgets
        if len(budgets) == 1 and not sampled:
            budget = budgets.pop()
            return {"pixel_values": pixel_values, "image_selection": {} if budget is None else {"max_tokens": budget}}
        masks = []
        for job in per_row:
            selection = ({"max_tokens": job.image_max_tokens} if job.image_max_tokens is not None
                         else {"generator": torch.Generator(self.device).manual_seed(job.sampling.seed)})
            for image in job.pixel_values.to(self.device, self.model.dtype):
                masks.append(visual_tokenizer.tokenize(image[None], **selection).keep_mask)
        return {"pixel_values": pixel_values, "image_keep_mask": torch.cat(masks)}

    def render_images(self, jobs: list[ImageJob]) -> list[list[str] | Exception]:
        """Each job's `n` images as base64 PNGs, drawn by the `LaVITPipeline` (the one place that asks for pixels):
        jobs with the same size and settings in one pipeline call, every image from its own generator (`ImageJob.
        generators`), so a job gets what it gets alone. A job's failure is returned in its place; a group the pipeline
        refuses as a whole (its memory bound) is drawn one job at a time."""
        if self.pipeline is None:
            error = OpenAIError("this model is a language model folder without a pixel decoder: serve a "
                                "LaVITPipeline folder (model_index.json) to draw images", "model", status=400)
            return [error] * len(jobs)
        errors = {i: self.size_error(job) for i, job in enumerate(jobs)}
        results = {i: error for i, error in errors.items() if error is not None}
        drawable = [i for i in range(len(jobs)) if i not in results]
        for _, group in groupby(sorted(drawable, key=lambda i: repr(jobs[i].batch_key())),
                                key=lambda i: repr(jobs[i].batch_key())):
            group = list(group)
            try:
                drawn = self._draw([jobs[i] for i in group])
            except Exception as error:
                drawn = ([error] if len(group) == 1 else
                         [item for i in group for item in self.render_images([jobs[i]])])
            results.update(zip(group, drawn, strict=True))
        return [results[i] for i in range(len(jobs))]

    def size_error(self, job: ImageJob) -> OpenAIError | None:
        """The decoder's own bound on the job's `size` (multiples, largest side) as an error naming `size`, checked
        with the other settings at their defaults so that nothing else can fail here; None when it can be drawn."""
        if job.size is None:
            return None
        try:
            height, width, steps, guidance_scale = self.pipeline.decode_settings(*job.size)
            self.pipeline.check_decode_request(height, width, steps, images=1, guidance_scale=guidance_scale)
        except ValueError as error:
            return OpenAIError(f"size {width}x{height} cannot be drawn by this model: {str(error).splitlines()[0]}",
                               "size")
        return None

    def _draw(self, jobs: list[ImageJob]) -> list[list[str]]:
        """One pipeline call for jobs that share size and settings: each job's prompt once per image. The request's
        `guidance_scale` is the language model's (the pipeline's `token_guidance_scale`), its
        `decoder_guidance_scale` the diffusion decoder's (the pipeline's `guidance_scale`)."""
        height, width = jobs[0].size or (None, None)
        settings = dict(jobs[0].settings)
        try:
            images = self.pipeline(
                [job.prompt for job in jobs for _ in range(job.n)], num_images_per_prompt=1,
                generator=[generator for job in jobs for generator in job.generators(self.device)],
                height=height, width=width, token_guidance_scale=settings.pop("guidance_scale", None),
                guidance_scale=settings.pop("decoder_guidance_scale", None), **settings,
            ).images
        except ValueError as error:  # the decoder's own bounds (size, memory): the request's, not the server's
            raise OpenAIError(f"the image cannot be drawn: {str(error).splitlines()[0]}", None) from error
        encoded, start = [], 0
        for job in jobs:
            encoded.append([png_base64(image) for image in images[start : start + job.n]])
            start += job.n
        return encoded


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
