"""An lmms-eval model for LaVIT: `lmms-eval --model lavit --model_args pretrained=FOLDER --tasks ...` runs its image
tasks (text generation from images and text; the loss of each continuation for multiple-choice tasks).

lmms-eval finds the model through the `lmms_eval.models` entry point that `pip install lavit` declares
([`manifest`]); its prompts arrive as text with `<image>` placeholders or none (then the images go first, as in the
official LaVIT prompts). Requests run in batches of `batch_size` with the task's generation settings (`until`,
`max_new_tokens`, `num_beams`, `temperature`), so answers stop where the task says.
"""

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: the model id `lavit` -> [`LaVITLmms`]."""
    return ModelManifest(model_id="lavit", simple_class_path="lavit.evaluation.lmms_eval_model.LaVITLmms")


class LaVITLmms(lmms):
    """
    Args (the `--model_args` of lmms-eval): `pretrained` (a LaVIT folder or Hub id), `device` (default: the
    accelerate process's device), `dtype` (`float32`, `bfloat16`, `float16`; default: the checkpoint's),
    `batch_size` (default 1), `max_new_tokens` (used when a task gives none; default 32). `max_batch_size`, which
    lmms-eval's command line always passes, has no use here.
    """

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size: int = 1,
                 max_new_tokens: int = 32, max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"lavit: unknown model_args {sorted(kwargs)} (known: pretrained, device, dtype, "
                             f"batch_size, max_new_tokens)")
        from lavit import LaVITForCausalLM, LaVITProcessor
        from lavit.evaluation.runner import distributed_state
        from lavit.file_kinds import require_safetensors_weights

        require_safetensors_weights(pretrained)  # pickled weights are never loaded
        state = distributed_state()
        self._device = torch.device(device) if device else state.device
        settings = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = LaVITForCausalLM.from_pretrained(pretrained, **settings)
        self.model.eval().to(self._device)
        self.processor = LaVITProcessor.from_pretrained(pretrained)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._rank, self._world_size = state.process_index, state.num_processes

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _prompt(self, context: str, images: list) -> str:
        """`<image>` placeholders stay where the task put them; without any, the images come first."""
        placeholder = self.processor.image_token
        if context.count(placeholder) == len(images):
            return context
        return placeholder * len(images) + context.replace(placeholder, "")

    def _inputs(self, contexts: list[str], visuals: list[list]):
        images = [image for row in visuals for image in row]
        prompts = [self._prompt(context, row) for context, row in zip(contexts, visuals, strict=True)]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _doc(self, request: Instance):
        """The task's document a request was built from: `args` end with (doc_id, task, split) (lmms-eval's
        `ConfigurableTask.construct_requests`); `None` for the bare (context, continuation) of `acc_mutual_info`."""
        if len(request.args) < 6:
            return None
        doc_id, task, split = request.args[-3:]
        return self.task_dict[task][split][doc_id]

    def _visuals(self, request: Instance) -> list:
        """The request's images (`doc_to_visual` is `args[2]`); videos and audio are refused, not dropped: a score
        computed without them would not be the task's."""
        doc = self._doc(request)
        visuals = (request.args[2](doc) or []) if doc is not None else []
        for visual in visuals:
            if not hasattr(visual, "convert"):
                task, doc_id = request.args[-2], request.args[-3]
                raise ValueError(f"lavit: task {task!r} document {doc_id} gives a {type(visual).__name__} visual (a "
                                 f"video or audio); LaVIT reads images only: evaluate it on image tasks")
        return [visual.convert("RGB") for visual in visuals]

    def _continuation(self, request: Instance) -> str:
        """A log-likelihood request's continuation: `args[1]` is the text itself (`multiple_choice` tasks) or the
        task's `doc_to_target` (`loglikelihood` tasks), applied to the request's document."""
        target = request.args[1]
        return target if isinstance(target, str) else str(target(self._doc(request)))

    def _batches(self, requests: list[Instance]) -> list[list[Instance]]:
        """Consecutive requests with the same generation settings (a task's), at most `batch_size` each."""
        batches = []
        for request in requests:
            if batches and len(batches[-1]) < self.batch_size and batches[-1][0].args[1] == request.args[1]:
                batches[-1].append(request)
            else:
                batches.append([request])
        return batches

    def _generation(self, settings: dict) -> tuple[dict, list[str]]:
        """A task's `generation_kwargs` -> (`generate` arguments, stop strings)."""
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        generation = {"max_new_tokens": settings.get("max_new_tokens") or self.max_new_tokens,
                      "num_beams": settings.get("num_beams") or 1}
        temperature = settings.get("temperature") or 0
        generation["do_sample"] = temperature > 0
        if temperature > 0:
            generation["temperature"] = temperature
        return generation, until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for batch in tqdm(self._batches(requests), disable=self.rank != 0, desc="lavit"):
            generation, until = self._generation(batch[0].args[1])
            inputs = self._inputs([request.args[0] for request in batch], [self._visuals(r) for r in batch])
            with torch.no_grad():
                output = self.model.generate(**inputs, **generation)
            texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for text in texts:
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text.strip())
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(the continuation's mean negative log-likelihood per token after the context and images, whether greedy
        decoding would produce it). The loss, not a log-probability, whatever `lmms.loglikelihood`'s docstring says:
        lmms-eval's `multiple_choice` tasks pick the choice with the LOWEST value (`np.argmin`), as its Hugging Face
        models return their `loss`; a log-probability would make them pick the least likely choice."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="lavit loglikelihood"):
            context, continuation = request.args[0], self._continuation(request)
            visuals = self._visuals(request)
            context, prompt_length = self._prompt_length(context, continuation, visuals)
            full = self._inputs([context + continuation], [visuals])
            count = full["input_ids"].shape[1] - prompt_length
            if count <= 0:
                raise ValueError(f"lavit: the continuation {continuation!r} adds no token to the context")
            with torch.no_grad():
                logits = self.model(**full).logits[0, -count - 1:-1].float()
            targets = full["input_ids"][0, -count:]
            loss = torch.nn.functional.cross_entropy(logits, targets)
            results.append((float(loss), bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def _prompt_length(self, context: str, continuation: str, visuals: list) -> tuple[str, int]:
        """(the context, its length in tokens). An empty one (lmms-eval's contract allows it: `acc_mutual_info`'s
        unconditional requests) conditions on the start tokens the tokenizer adds, else on its `bos_token`."""
        if context or visuals:
            return context, self._inputs([context], [visuals])["input_ids"].shape[1]
        tokenizer = self.processor.tokenizer
        own = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        added = self._inputs([continuation], [[]])["input_ids"].shape[1] - own
        if added > 0:
            return context, added
        if tokenizer.bos_token is None:
            raise ValueError("lavit: an empty context needs a start token to condition on; the tokenizer has none")
        return self._prompt_length(tokenizer.bos_token, continuation, visuals)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lavit: multi-round generation is not supported; use single-round tasks")


__all__ = ["LaVITLmms", "manifest"]
