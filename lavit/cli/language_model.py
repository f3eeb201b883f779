"""`lavit new-language-model`: a small random LLaMA and a BPE tokenizer trained on your texts, written offline
(stage 2 without the Hub; `lavit.training.language_model`)."""

from lavit.command_inputs import CommandError, PerItem
from lavit.modeling.validation_lavit import SEED
from lavit.paths import InputPath, OutputPath
from lavit.training.language_model import SIZE_RANGES

from .common import add_command


def add_parsers(commands) -> None:
    language_model = add_command(commands, "new-language-model", "write a small random LLaMA + a BPE tokenizer "
                                 "trained on your texts (stage 2 without the Hub)")
    language_model.add_argument("output", type=OutputPath,
                                help="folder for the LM and its tokenizer (--language_model of stage 2)")
    language_model.add_argument("--data", type=InputPath, default=None,
                                help="image-text data: its captions (and VQA questions and "
                                     "answers) train the tokenizer")
    language_model.add_argument("--texts", type=InputPath, nargs="+", default=[],
                                help="text files (.txt lines, or JSON/CSV/Parquet "
                                     "with a 'text' column)")
    language_model.add_argument("--vocab-size", type=SIZE_RANGES["vocab_size"], default=1000,
                                help="the most BPE tokens")
    language_model.add_argument("--hidden-size", type=SIZE_RANGES["hidden_size"], default=64, help="width of the model")
    language_model.add_argument("--num-layers", type=SIZE_RANGES["num_hidden_layers"], default=2, help="decoder layers")
    language_model.add_argument("--num-heads", type=SIZE_RANGES["num_attention_heads"], default=4,
                                help="attention heads (an even number that divides --hidden-size)")
    language_model.add_argument("--seed", type=SEED, default=0, help="seed of the random weights")


def run_new_language_model(args) -> None:
    from lavit.training.language_model import corpus_from_data, write_small_language_model

    if not args.data and not args.texts:
        raise CommandError("give --data (image-text data) and/or --texts (text files): the tokenizer trains on them")
    items = PerItem("new-language-model", "text_file", args.texts)
    texts = corpus_from_data(args.data) + [text for part in items.each(lambda path: corpus_from_data(None, [path]))
                                           .values() for text in part]
    if not texts:
        items.finish()
        raise CommandError("no texts to train the tokenizer on")
    folder = write_small_language_model(args.output, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                                        seed=args.seed)
    print(f"{folder}  ({len(texts)} texts; stage 2: --language_model {folder})")
    items.finish()


RUNNERS = {"new-language-model": run_new_language_model}
