"""Many requests in one `LaVITForCausalLM.generate` call, each row getting what it would get alone.

A batch mixes requests with their own sampling settings, seeds, `n`, `max_tokens` and stop strings. `generate` runs
greedy over the batch (`do_sample=False`) with two per-row pieces:

- `RowSampler` (a logits processor): a sampled row applies its own warpers (temperature, top-k, top-p) and draws from
  its own stream, seeded as `generate(generator=torch.Generator().manual_seed(seed), num_return_sequences=n)` seeds
  it (`row_generators`), then leaves only the drawn token at 0 so greedy picks it; greedy rows are left alone;
- `RowTexts` (a streamer and a stopping criterion): each row's tokens become text deltas, and a row is finished at
  its own `max_tokens`, at EOS or at a stop string, after which `generate` pads it (and stops when all are done).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from lavit.modeling.generation_lavit import row_generators, sample_rows, sampling_warpers


@dataclass
class SamplingSettings:
    """One request's text sampling; `temperature == 0` is greedy (OpenAI's convention)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def reference_kwargs(self, n: int) -> dict:
        """The arguments of `generate` that give this request's rows when it runs alone (tests compare with it);
        greedy rows are all the same, so greedy gives one (repeat it `n` times)."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "generator": torch.Generator().manual_seed(self.seed), "num_return_sequences": n}


class RowSampler(LogitsProcessor):
    """Per-row sampling for a batch decoded greedily; `settings[i]` and `rows[i]` (rows of request i, its `n`)."""

    def __init__(self, settings: list[SamplingSettings], rows: list[int]):
        self.settings, self.rows = settings, rows
        self.generators = None

    def _build(self, device):
        generators, warpers = [], []
        for setting, count in zip(self.settings, self.rows, strict=True):
            if setting.greedy:
                generators += [None] * count
                warpers += [None] * count
            else:
                generators += row_generators(torch.Generator().manual_seed(setting.seed), count, count, device)
                warpers += [sampling_warpers(setting.temperature, setting.top_k, setting.top_p)] * count
        self.generators, self.warpers = generators, warpers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self._build(scores.device)
        scores = scores.clone()
        for row, (generator, warpers) in enumerate(zip(self.generators, self.warpers, strict=True)):
            if generator is None:
                continue
            row_scores = scores[row : row + 1]
            for warper in warpers:
                row_scores = warper(input_ids[row : row + 1], row_scores)
            token = sample_rows(row_scores.float().softmax(dim=-1), [generator])
            scores[row] = -float("inf")
            scores[row, token] = 0.0
        return scores


@dataclass
class RowText:
    """One output row: its tokens, the text handed out so far, and why it finished (`"stop"`, `"length"`, or
    `"cancelled"` once `cancelled()` says no one reads it any more: a timeout, a closed connection)."""

    max_tokens: int
    stop: list[str]
    cancelled: Callable[[], bool] = bool
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None


class RowTexts(BaseStreamer, StoppingCriteria):
    """The text of every row of a batch as it is generated: `generate(streamer=self, stopping_criteria=[self])`.
    `on_step(deltas)` is called after each step with one `(text_delta, finish_reason)` per row (`None` once a row has
    finished before)."""

    def __init__(self, tokenizer, rows: list[RowText], eos_token_ids: set[int], on_step):
        self.tokenizer, self.rows, self.eos_token_ids, self.on_step = tokenizer, rows, eos_token_ids, on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # `generate` first hands the streamer the prompt
            self.prompt_seen = True
            return
        deltas = [self._add(row, int(token)) for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True)]
        self.on_step(deltas)

    def end(self) -> None:
        deltas = []
        for row in self.rows:  # generate stopped (all rows done, or its own limit): close what is still open
            if row.finish_reason is None:
                row.finish_reason = "length"
                deltas.append((row.text[row.sent :], "length"))
                row.sent = len(row.text)
            else:
                deltas.append(None)
        if any(delta is not None for delta in deltas):
            self.on_step(deltas)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row in self.rows:  # a cancelled row stops here; `generate` ends once every row has
            if row.finish_reason is None and row.cancelled():
                row.finish_reason = "cancelled"
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)

    def _add(self, row: RowText, token: int):
        if row.finish_reason is not None:
            return None
        if token in self.eos_token_ids:
            row.finish_reason = "stop"
        else:
            row.tokens.append(token)
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min((row.text.find(stop) for stop in row.stop if stop in row.text), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = row.text[:cut], "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
        end = len(row.text) if row.finish_reason else _safe_end(row.text, row.stop)
        delta = row.text[row.sent : end]
        row.sent = max(row.sent, end)
        return delta, row.finish_reason


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of an unfinished row's text can be handed out: not a trailing partial character, and not a tail
    that may still become a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for length in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:length]):
                end -= length
                break
    return end
