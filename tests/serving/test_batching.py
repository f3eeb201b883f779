"""The per-row pieces of `lavit.serving.batching`, called step by step without `generate`: `SamplingSettings` (greedy
at temperature 0, the lone reference's arguments), `RowSampler` (greedy rows untouched, sampled rows one drawn token,
each request's rows the same whatever its batch mates) and `RowTexts` (text deltas that never hand out a stop
string or a partial character, each row finished once: EOS, `max_tokens`, a stop string, cancelled, or at the end)."""

import pytest
import torch
from conftest import tiny_text_tokenizer

from lavit.serving.batching import RowSampler, RowText, RowTexts, SamplingSettings, _safe_end

VOCAB = 40


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_text_tokenizer()


def scores(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def drawn_tokens(sampler: RowSampler, logits: torch.Tensor, steps: int = 3) -> list[list[int]]:
    """The token each row is left with at each step (the only finite score)."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return [sampler(ids, logits).argmax(dim=-1).tolist() for _ in range(steps)]


def test_temperature_zero_is_greedy_and_its_reference_does_not_sample():
    assert SamplingSettings(temperature=0).greedy and not SamplingSettings(temperature=0.1).greedy
    assert SamplingSettings(temperature=0, seed=5).reference_kwargs(3) == {"do_sample": False}
    kwargs = SamplingSettings(temperature=0.7, top_p=0.9, top_k=4, seed=5).reference_kwargs(3)
    generator = kwargs.pop("generator")
    assert kwargs == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 4, "num_return_sequences": 3}
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=torch.Generator().manual_seed(5)))


def test_greedy_rows_keep_their_scores_and_sampled_rows_one_token():
    logits = scores(3)
    sampler = RowSampler([SamplingSettings(temperature=0), SamplingSettings(seed=1)], [1, 2])
    out = sampler(torch.zeros(3, 1, dtype=torch.long), logits)
    assert torch.equal(out[0], logits[0]) and torch.equal(logits, scores(3))  # the input is not changed in place
    for row in out[1:]:
        assert (row == 0).sum() == 1 and torch.isinf(row).sum() == VOCAB - 1


def test_a_requests_rows_do_not_depend_on_its_batch_mates():
    settings = SamplingSettings(temperature=1.5, seed=3)
    logits = scores(4)
    alone = drawn_tokens(RowSampler([settings], [2]), logits[2:])
    batched = drawn_tokens(RowSampler([SamplingSettings(seed=9), SamplingSettings(temperature=0), settings],
                                      [1, 1, 2]), logits)
    assert [step[2:] for step in batched] == alone
    other_seed = drawn_tokens(RowSampler([SamplingSettings(temperature=1.5, seed=4)], [2]), logits[2:], steps=8)
    assert other_seed != drawn_tokens(RowSampler([settings], [2]), logits[2:], steps=8)


def test_top_k_one_and_a_tiny_top_p_leave_only_the_most_likely_token():
    logits = scores(2, seed=7)
    for settings in (SamplingSettings(temperature=2.0, top_k=1, seed=0), SamplingSettings(top_p=1e-6, seed=0)):
        for step in drawn_tokens(RowSampler([settings], [2]), logits, steps=5):
            assert step == logits.argmax(dim=-1).tolist()


def test_settings_and_row_counts_must_agree():
    sampler = RowSampler([SamplingSettings(seed=1), SamplingSettings(seed=2)], [1])
    with pytest.raises(ValueError, match="shorter|longer"):
        sampler(torch.zeros(1, 1, dtype=torch.long), scores(1))


def run_texts(tokenizer, rows: list[RowText], steps: list[list[int]], eos=2):
    """Feeds `RowTexts` the prompt, then each step's tokens (one per row), then `end()`: the streamer's deltas."""
    deltas = []
    texts = RowTexts(tokenizer, rows, {eos}, deltas.append)
    texts.put(torch.zeros(len(rows), 3, dtype=torch.long))  # the prompt: not part of any answer
    for tokens in steps:
        texts.put(torch.tensor(tokens))
    texts.end()
    return deltas


def joined(deltas: list, row: int) -> str:
    return "".join(step[row][0] for step in deltas if step[row] is not None)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_deltas_add_up_to_the_text_and_each_row_finishes_once(tokenizer):
    words = ids(tokenizer, "a photo of a cat")
    rows = [RowText(max_tokens=len(words), stop=[]), RowText(max_tokens=50, stop=[])]
    steps = [[word, word] for word in words] + [[2, 2]]
    deltas = run_texts(tokenizer, rows, steps)
    assert rows[0].text == rows[1].text == "a photo of a cat" == joined(deltas, 0) == joined(deltas, 1)
    assert (rows[0].finish_reason, rows[1].finish_reason) == ("length", "stop")
    assert rows[1].tokens == words  # EOS ends the row without becoming part of it
    reasons = [[step[row][1] for step in deltas if step[row] is not None and step[row][1]] for row in (0, 1)]
    assert reasons == [["length"], ["stop"]]
    assert deltas[-1][0] is None  # a finished row gets None for the tokens `generate` pads it with


def test_a_stop_string_cuts_the_text_and_is_never_handed_out(tokenizer):
    rows = [RowText(max_tokens=50, stop=["of a cat"]), RowText(max_tokens=50, stop=["of the"])]
    steps = [[word, word] for word in ids(tokenizer, "a photo of a cat sitting")]
    deltas = run_texts(tokenizer, rows, steps)
    assert rows[0].text == joined(deltas, 0) == "a photo " and rows[0].finish_reason == "stop"
    handed_out = ""
    for step in deltas:  # the tail that might still become the stop string is held back
        handed_out += step[0][0] if step[0] else ""
        assert "of" not in handed_out
    # a tail held back that turns out not to be a stop string is handed out after all
    assert rows[1].text == joined(deltas, 1) == "a photo of a cat sitting" and rows[1].finish_reason == "length"


def test_the_end_closes_open_rows_and_is_silent_when_all_are_done(tokenizer):
    words = ids(tokenizer, "a pho")
    deltas = []
    texts = RowTexts(tokenizer, [RowText(max_tokens=9, stop=["photo"])], {2}, deltas.append)
    texts.put(torch.zeros(1, 2, dtype=torch.long))
    for word in words:
        texts.put(torch.tensor([word]))
    texts.end()  # "pho" was held back (it may have become "photo"): handed out now
    assert texts.rows[0].finish_reason == "length" and deltas[-1] == [("pho", "length")]
    assert joined(deltas, 0) == "a pho"
    count = len(deltas)
    texts.end()
    assert len(deltas) == count


def test_the_stopping_criterion_is_per_row_and_cancels_only_open_rows():
    cancelled = {"now": False}
    rows = [RowText(1, [], cancelled=lambda: cancelled["now"]), RowText(1, [], cancelled=lambda: cancelled["now"]),
            RowText(1, [])]
    rows[1].finish_reason = "stop"
    criterion = RowTexts(None, rows, {2}, lambda deltas: None)
    ids_so_far = torch.zeros(3, 4, dtype=torch.long)
    assert criterion(ids_so_far, None).tolist() == [False, True, False]
    cancelled["now"] = True
    assert criterion(ids_so_far, None).tolist() == [True, True, False]
    assert [row.finish_reason for row in rows] == ["cancelled", "stop", None]


@pytest.mark.parametrize(("text", "stops", "end"), [
    ("hello", [], 5),
    ("hello\ufffd\ufffd", [], 5),  # a character whose bytes are not all generated yet
    ("hello wor", ["world"], 6),
    ("hello wo", ["xyz", "or"], 7),
    ("hello w", ["hello world"], 0),  # the whole text may still become the stop string
    ("hello", ["lo!", "o!"], 3),
])
def test_safe_end_holds_back_what_may_still_change(text, stops, end):
    assert _safe_end(text, stops) == end
