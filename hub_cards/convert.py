"""An official LaVIT release folder (jy0205/LaVIT) -> the loaded model, processor and pipeline of a Hub folder."""

from pathlib import Path

from lavit.modeling import LaVITPipeline
from lavit.modeling.convert_original_lavit import convert_release
from lavit.modeling.validation_lavit import floating_dtype
from lavit.processing import LaVITImageProcessor, LaVITProcessor
from transformers import AutoTokenizer


def convert_release_folder(source: str | Path, pixel_decoder: str | None = "highres", dtype: str | None = None,
                           num_heads: int = 16) -> tuple:
    """Converts the release at `source` (`language_model/`, `visual_tokenizer/`, ...): `pixel_decoder` is
    "highres", "lowres" or None, `dtype` a torch dtype name, `num_heads` the heads of the ViT, merger and decoder.

    Returns:
        `(model, processor, pipeline, metadata)`: `pipeline` is a `LaVITPipeline` (the model is one of its
        components) when the release has the pixel decoder, else None; `metadata` is the model card's.

    Raises:
        ValueError: `source` is not a release folder, or its tokenizer does not fit its language model.
    """
    source = Path(source)
    if not (source / "language_model").is_dir() or not (source / "visual_tokenizer").is_dir():
        raise ValueError(f"{source} is not an official LaVIT release folder (language_model/ and "
                         f"visual_tokenizer/ expected)")
    model, detokenizer = convert_release(
        source, pixel_decoder=pixel_decoder, dtype=floating_dtype(dtype, "dtype", optional=True),
        vision_num_heads=num_heads, merger_num_heads=num_heads, decoder_num_heads=num_heads,
    )
    tokenizer = AutoTokenizer.from_pretrained(source / "language_model")
    text_tokens = LaVITProcessor.add_image_tokens(tokenizer, model.config.tokenizer_config.codebook_size)
    if text_tokens != model.config.text_vocab_size:
        raise ValueError(f"the release's tokenizer has {text_tokens} text tokens, the LM "
                         f"{model.config.text_vocab_size}")
    processor = LaVITProcessor(LaVITImageProcessor.from_tokenizer_config(model.config.tokenizer_config), tokenizer)
    metadata = {"summary": f"LaVIT converted from the official release `{source.name}` (jy0205/LaVIT) with "
                           f"`lavit convert-original`; every official tensor was mapped or is known to be unused.",
                "training_stages": [{"name": "official training",
                                     "description": "by the LaVIT authors (see the paper); no training here"}]}
    pipeline = LaVITPipeline.from_detokenizer(model, processor, detokenizer) if detokenizer is not None else None
    return model, processor, pipeline, metadata
