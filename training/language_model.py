"""A language model for stage 2 without the Hub: a small random LLaMA with a BPE tokenizer trained on your own texts.

Stage 2 takes any transformers causal-LM folder (`--language_model path/to/folder`); this writes one offline, sized
for small data on a CPU. Its weights are random: it learns language only from the stage-2 data.

    lavit new-language-model runs/lm --data photos/ [--texts corpus.txt] [--vocab-size 1000 --hidden-size 64]
"""

import re
import unicodedata
from pathlib import Path

import torch
from lavit.modeling.validation_lavit import SEED, Range, check_arguments

from lavit.atomic import fresh_staging_folder, replace_folder

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# the declared ranges of `write_small_language_model`'s sizes (also the `type=` of `lavit new-language-model`'s flags)
SIZE_RANGES = {
    "vocab_size": Range(len(SPECIAL_TOKENS) + 1, 2**24, integer=True, note="the special tokens and at least one more"),
    "hidden_size": Range(2, 2**16, integer=True), "num_hidden_layers": Range(1, 1024, integer=True),
    "num_attention_heads": Range(2, 1024, integer=True, note="an even number that divides hidden_size"),
    "max_position_embeddings": Range(1, 2**20, integer=True), "seed": SEED,
}
# the fine-tuning template (`training.sequences.VQA_TEMPLATE` and its answer; not imported from there, which would
# import TrainingArguments into `lavit new-language-model`; tests/training/test_language_model.py keeps them equal)
VQA_TEXT = "Question: {question} Answer: {answer}"

# the BPE trainer's cost grows with the square of a word's length: a word longer than this (a hash, a URL, a line
# without spaces: 24 s for 200k characters, hours for 1M) is cut into pieces of this length for the trainer
LONGEST_WORD = 64


def usable_text(text) -> str | None:
    """`text` without its surrounding white space when it holds something to learn from: None for what is not a
    string or holds only white space, controls and invisible format characters (zero-width spaces, BOMs)."""
    if not isinstance(text, str):
        return None
    visible = any(not unicodedata.category(character).startswith(("Z", "C")) for character in text)
    return text.strip() if visible else None


def bpe_training_text(text: str) -> str:
    """`text` as the BPE trainer reads it: every word longer than [`LONGEST_WORD`] cut into pieces of that length."""
    return re.sub(rf"\S{{{LONGEST_WORD}}}", r"\g<0> ", text)


def write_small_language_model(
    folder,
    texts: list[str],
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """
    Writes a random `LlamaForCausalLM` and a BPE tokenizer (Metaspace pre-tokenizer, `<unk>`, `<s>`,
    `</s>`; `</s>` is also the padding token) trained on `texts`, as a folder that `AutoModelForCausalLM` and
    `AutoTokenizer` load. No image tokens: stage 2 adds them.

    Args:
        folder: output folder: created, or replaced when lavit made it (`lavit.atomic.replace_folder`).
        texts: the corpus of the tokenizer (captions, questions, answers...); at least one non-empty string.
        vocab_size: the most BPE tokens (a small corpus may give fewer).
        hidden_size, num_hidden_layers, num_attention_heads: LLaMA sizes (key/value heads: half the heads).
        max_position_embeddings: the longest row the LM reads, visual tokens included (default: stage 2's default
            `--max_length`, which a run checks against it).
        seed: seed of the random weights.
    Raises:
        ValueError: `texts` holds no text, a size outside its range in `SIZE_RANGES`, or sizes that do not fit
            (`hidden_size` not divisible by the heads).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    check_arguments(SIZE_RANGES, {"vocab_size": vocab_size, "hidden_size": hidden_size, "seed": seed,
                                  "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
                                  "max_position_embeddings": max_position_embeddings})
    texts = [text for text in map(usable_text, texts) if text is not None]
    if not texts:
        raise ValueError("write_small_language_model needs at least one non-empty text to train its tokenizer on")
    if hidden_size % num_attention_heads or num_attention_heads % 2:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                         f"({num_attention_heads}), an even number")
    staging = fresh_staging_folder(folder)  # refuses, before any work, a `folder` that lavit did not make
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    backend.train_from_iterator(map(bpe_training_text, texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
    )
    tokenizer.save_pretrained(staging)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads // 2, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(staging)
    return replace_folder(staging, folder)  # a whole folder, or the previous one


def corpus_from_data(data: str | None = None, text_files: list[str] = ()) -> list[str]:
    """The texts of image-text data (`text`, and `question`/`answer` pairs in the fine-tuning template when the
    records have them) and of text files (`.txt` lines, or the `text` column of JSON/CSV/Parquet), without decoding
    any image. Blank texts are left out, so the count is of texts the tokenizer can learn from."""
    from .data import load_records, load_text_records, record_columns

    texts = []
    if data:
        records = load_records(data, require_text=False)
        present = record_columns(records)
        columns = [name for name in ("text", "question", "answer") if name in present]
        for record in records.select_columns(columns):
            texts.append(record.get("text"))
            question, answer = usable_text(record.get("question")), usable_text(record.get("answer"))
            if question and answer:
                texts.append(VQA_TEXT.format(question=question, answer=answer))
    for path in text_files:
        texts.extend(load_text_records(path)["text"])
    return [text for text in map(usable_text, texts) if text is not None]  # blank lines are no texts
