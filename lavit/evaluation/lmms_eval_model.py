"""An lmms-eval model for LaVIT: `lmms-eval --model lavit --model_args pretrained=FOLDER --tasks ...` runs its image
tasks (text generation from images and text; the loss of each continuation for multiple-choice tasks).

lmms-eval finds the model through the `lmms_eval.models` entry point that `pip install lavit` declares
([`manifest`]); its prompts arrive as text with `<image>` placeholders or none (then the images go first, as in the
official LaVIT prompts; a prompt whose placeholders do not match its images is refused). Requests run in batches of
`batch_size` with the task's generation settings ([`generation_settings`]: each honoured or refused), so answers stop
where the task says.
"""


def manifest():
    """The `lmms_eval.models` entry point: the model id `lavit` -> [`LaVITLmms`]. Defined before this module imports
    lmms-eval: importing this module first makes lmms-eval's registry load the entry point while the module is still
    being imported, and it must find `manifest` then."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lavit", simple_class_path="lavit.evaluation.lmms_eval_model.LaVITLmms")


import torch  # noqa: E402  (after `manifest`, see there)
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lavit.modeling.validation_lavit import SEED, Choice, Range, floating_dtype  # noqa: E402

# a task's `generation_kwargs`, each honoured (None: the default) or the request is refused naming it
GENERATION_SETTINGS = {
    "max_new_tokens": Range(1, integer=True, optional=True),
    "temperature": Range(0, optional=True, note="0 is greedy"),
    "top_p": Range(0, 1, optional=True),
    "top_k": Range(0, integer=True, optional=True, note="0: off"),
    "num_beams": Range(1, integer=True, optional=True),
    "repetition_penalty": Range(0, low_open=True, optional=True),
    "do_sample": Choice((True, False), optional=True),
    "seed": Range(0, SEED.high, integer=True, optional=True, note=SEED.note),  # lavit's one seed range
}
# settings some lmms-eval tasks carry that are not the model's to apply: why each is left alone
IGNORED_SETTINGS = {
    "image_aspect_ratio": "LLaVA's image padding; LaVIT's processor resizes each image itself",
    "max_agentic_steps": "the rounds of lmms-eval's agentic loop, which its evaluator runs (one call per round)",
}


def generation_settings(settings: dict | None, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """A task's `generation_kwargs` -> (`generate` arguments, stop strings): every setting in `GENERATION_SETTINGS`
    checked against its range, `until` a string or a list of strings; anything else raises a ValueError naming it.
    Sampling is `do_sample` when given, else `temperature > 0` (lmms-eval's convention), from a generator seeded with
    `seed` when given (every row its own stream); greedy decoding ignores `temperature`, `top_p`, `top_k` and `seed`,
    as `generate` does."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(GENERATION_SETTINGS) - set(IGNORED_SETTINGS) - {"until"})
    if unknown:
        raise ValueError(f"lavit: unknown generation_kwargs {unknown} (known: until, {', '.join(GENERATION_SETTINGS)})")
    values = {name: spec.check(f"lavit: generation_kwargs {name}", settings.get(name))
              for name, spec in GENERATION_SETTINGS.items()}
    until = settings.get("until")
    until = [until] if isinstance(until, str) else until if until is not None else []
    if not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
        raise ValueError(f"lavit: generation_kwargs until must be a string or a list of strings, got {until!r}")
    temperature = values["temperature"]
    sample = values["do_sample"] if values["do_sample"] is not None else bool(temperature)
    generation = {"max_new_tokens": values["max_new_tokens"] or default_max_new_tokens,
                  "num_beams": values["num_beams"] or 1, "do_sample": sample}
    if values["repetition_penalty"] is not None:
        generation["repetition_penalty"] = values["repetition_penalty"]
    if sample:
        if temperature == 0:
            raise ValueError("lavit: generation_kwargs do_sample is true but temperature is 0 (greedy): give a "
                             "temperature > 0, or do_sample false")
        generation["temperature"] = 1.0 if temperature is None else temperature
        generation["top_p"] = 1.0 if values["top_p"] is None else values["top_p"]
        generation["top_k"] = values["top_k"] or 0
        if values["seed"] is not None:
            generation["generator"] = torch.Generator().manual_seed(values["seed"])
    return generation, [stop for stop in until if stop]


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
            from lavit.modeling.validation_lavit import keyword_names, unknown_names

            known = keyword_names(type(self).__init__) - {"self"}
            raise ValueError(f"lavit: unknown model_args {', '.join(unknown_names(kwargs, known))} (known: "
                             f"{', '.join(sorted(known))})")
        from lavit.command_inputs import load_lavit_model
        from lavit.evaluation.runner import distributed_state
        from lavit.file_kinds import require_safetensors_weights

        require_safetensors_weights(pretrained)  # pickled weights are never loaded
        state = distributed_state()
        self._device = torch.device(device) if device else state.device
        dtype = floating_dtype(dtype, "model_args dtype=", optional=True)
        settings = {} if dtype is None else {"dtype": dtype}
        # a model folder, a LaVITPipeline folder (or its language_model/), a PEFT adapter folder or a Hub id, as for
        # every lavit command
        self.model, self.processor = load_lavit_model(pretrained, "pretrained=", **settings)
        self.model.eval().to(self._device)
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
        """`<image>` placeholders stay where the task put them; without any, the images come first. Any other count
        of placeholders is refused: which image goes where would be a guess."""
        placeholder = self.processor.image_token
        count = context.count(placeholder)
        if count == len(images):
            return context
        if count == 0:
            return placeholder * len(images) + context
        raise ValueError(f"lavit: the prompt has {count} {placeholder} placeholder(s) for {len(images)} image(s): "
                         f"put one per image where it belongs, or none to put the images first; prompt: "
                         f"{context[:200]!r}")

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

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for batch in tqdm(self._batches(requests), disable=self.rank != 0, desc="lavit"):
            generation, until = generation_settings(batch[0].args[1], self.max_new_tokens)
            inputs = self._inputs([request.args[0] for request in batch], [self._visuals(r) for r in batch])
            with torch.no_grad():
                output = self.model.generate(**inputs, **generation)
            texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for text in texts:
                for stop in until:
                    text = text.split(stop)[0]
                answers.append(text.strip())
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(the continuation's mean negative log-likelihood per token after the context and images, whether greedy
        decoding would produce it). The loss, not a log-probability, whatever `lmms.loglikelihood`'s docstring says:
        lmms-eval's `multiple_choice` tasks pick the choice with the LOWEST value (`np.argmin`), as its Hugging Face
        models return their `loss`; a log-probability would make them pick the least likely choice."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="lavit loglikelihood"):
            continuation = self._continuation(request)
            full, count = self._scored(request.args[0], continuation, self._visuals(request))
            if count <= 0:
                raise ValueError(f"lavit: the continuation {continuation!r} adds no token to the context")
            with torch.no_grad():
                logits = self.model(**full).logits[0, -count - 1:-1].float()
            targets = full["input_ids"][0, -count:]
            loss = torch.nn.functional.cross_entropy(logits, targets)
            results.append((float(loss), bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def _scored(self, context: str, continuation: str, visuals: list) -> tuple[dict, int]:
        """(the inputs of context + continuation, how many of their last tokens are scored). As lm-evaluation-harness
        does, the context's trailing spaces move to the continuation and the two are tokenized together (a word
        split between them is one token, as the model reads it); the scored tokens start at the first one that is
        not the context's own, so a continuation that completes the context's last word ("a ca" + "t") scores the
        token that word became."""
        spaces = len(context) - len(context.rstrip())
        if spaces and continuation:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context, context_ids = self._context_ids(context, continuation, visuals)
        full = self._inputs([context + continuation], [visuals])
        full_ids = full["input_ids"][0].tolist()
        shared = 0
        while shared < min(len(context_ids), len(full_ids)) and context_ids[shared] == full_ids[shared]:
            shared += 1
        return full, len(full_ids) - shared

    def _context_ids(self, context: str, continuation: str, visuals: list) -> tuple[str, list[int]]:
        """(the context, its token ids). An empty one (lmms-eval's contract allows it: `acc_mutual_info`'s
        unconditional requests) conditions on the start tokens the tokenizer adds, else on its `bos_token`."""
        if context or visuals:
            return context, self._inputs([context], [visuals])["input_ids"][0].tolist()
        tokenizer = self.processor.tokenizer
        own = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        ids = self._inputs([continuation], [[]])["input_ids"][0].tolist()
        if len(ids) > own:
            return context, ids[: len(ids) - own]
        if tokenizer.bos_token is None:
            raise ValueError("lavit: an empty context needs a start token to condition on; the tokenizer has none")
        return self._context_ids(tokenizer.bos_token, continuation, visuals)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lavit: multi-round generation is not supported; use single-round tasks")


__all__ = ["GENERATION_SETTINGS", "LaVITLmms", "generation_settings", "manifest"]
