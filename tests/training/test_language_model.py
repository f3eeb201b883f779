"""`lavit.training.language_model`: the small random LLaMA with its own BPE tokenizer written offline for stage 2
(sizes, special tokens, seeded weights, refusals before anything is written) and the corpus taken from image-text
data and text files."""

import json

import pytest
from lavit.training.language_model import (
    LONGEST_WORD,
    SPECIAL_TOKENS,
    VQA_TEXT,
    bpe_training_text,
    corpus_from_data,
    usable_text,
    write_small_language_model,
)
from lavit.training.sequences import VQA_TEMPLATE
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from lavit.atomic import NotLavitFolderError

TEXTS = ["a cat sits on a mat", "two dogs play in the park", "what is it? a cat"]
TINY = dict(vocab_size=60, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)


def write(folder, texts=TEXTS, **settings):
    return write_small_language_model(folder, texts, **{**TINY, **settings})


def test_the_folder_loads_as_a_llama_of_the_given_sizes_with_its_tokenizer(tmp_path):
    folder = write(tmp_path / "lm")
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer) <= 60
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (8, 16, 1)
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (2, 1, 32)
    assert [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token] == list(SPECIAL_TOKENS)
    assert tokenizer.pad_token == tokenizer.eos_token and config.pad_token_id == tokenizer.eos_token_id
    assert "[IMG]" not in tokenizer.get_vocab()  # stage 2 adds the image tokens
    assert LlamaForCausalLM.from_pretrained(folder).get_input_embeddings().weight.shape == (len(tokenizer), 8)
    ids = tokenizer("two dogs play", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == "two dogs play"


def test_the_weights_are_a_function_of_the_seed_and_a_rewrite_replaces_the_folder(tmp_path):
    name = "model.embed_tokens.weight"
    first = load_file(write(tmp_path / "lm", seed=1) / "model.safetensors")[name]
    again = load_file(write(tmp_path / "lm", seed=1) / "model.safetensors")[name]
    other = load_file(write(tmp_path / "lm", seed=2) / "model.safetensors")[name]
    assert first.equal(again) and not first.equal(other)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lm"]  # no staging folder left beside it


def test_a_folder_lavit_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(NotLavitFolderError, match="was not made by lavit"):
        write(tmp_path / "mine")
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("texts", "settings", "message"), [
    (["", "   ", None], {}, "needs at least one non-empty text"),
    (TEXTS, {"hidden_size": 10, "num_attention_heads": 4}, r"hidden_size \(10\) must be divisible by "
                                                          r"num_attention_heads \(4\)"),
    (TEXTS, {"hidden_size": 6, "num_attention_heads": 3}, r"num_attention_heads \(3\), an even number"),
    (TEXTS, {"vocab_size": 3}, r"vocab_size must be an integer in \[4, "),
    (TEXTS, {"num_hidden_layers": 0}, r"num_hidden_layers must be an integer in \[1, "),
])
def test_bad_texts_or_sizes_are_refused_before_anything_is_written(tmp_path, texts, settings, message):
    with pytest.raises(ValueError, match=message):
        write(tmp_path / "lm", texts, **settings)
    assert list(tmp_path.iterdir()) == []


def test_the_corpus_holds_captions_vqa_pairs_in_the_template_and_text_file_lines(tmp_path):
    records = [{"image": "a.png", "text": "a cat"}, {"image": "b.png", "question": "what?", "answer": "a dog"},
               {"image": "c.png", "question": "why?"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "more.txt").write_text("line one\nline two\n")
    corpus = corpus_from_data(str(tmp_path / "data.jsonl"), [str(tmp_path / "more.txt")])
    assert corpus == ["a cat", VQA_TEXT.format(question="what?", answer="a dog"), "line one", "line two"]
    assert corpus_from_data() == []


def test_the_corpus_writes_vqa_pairs_as_fine_tuning_reads_them():
    assert VQA_TEXT.format(question="what?", answer="a dog") == VQA_TEMPLATE.format(question="what?") + " a dog"


@pytest.mark.parametrize("text, usable", [("  a red bus \n", "a red bus"), ("\u200b\u200b", None), ("\ufeff", None),
                                          ("\u2060 \u3000", None), ("\u00a0", None), ("", None), (3, None),
                                          ("\u200bcat", "\u200bcat")])
def test_a_usable_text_holds_something_visible(text, usable):
    assert usable_text(text) == usable


@pytest.mark.parametrize("text", ["x" * 1_000_000, "a red bus", "ab " + "y" * 130 + " cd", "z" * LONGEST_WORD])
def test_the_bpe_trainer_reads_no_word_longer_than_the_limit_and_every_character(text):
    """The BPE trainer's time grows with the square of a word's length: one line without spaces took hours."""
    pieces = bpe_training_text(text)
    assert max(len(word) for word in pieces.split()) <= LONGEST_WORD
    assert pieces.split() == text.split() or "".join(pieces.split()) == "".join(text.split())
