import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest (importlib mode) imports this file as `tests.conftest`, test files as `conftest`: one module, one state
sys.modules.setdefault("conftest", sys.modules[__name__])

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO_ROOT.parent / "shared" / "parity" / "official_tiny"


def tiny_tokenizer_config(**overrides):
    from lavit import LaVITTokenizerConfig

    settings = dict(
        vision_config=dict(
            image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64,
        ),
        merger_num_layers=2,
        merger_num_heads=4,
        merger_intermediate_size=64,
        codebook_size=32,
        code_dim=8,
        decoder_hidden_size=32,
        decoder_num_layers=1,
        decoder_num_heads=4,
        decoder_intermediate_size=64,
    )
    settings.update(overrides)
    return LaVITTokenizerConfig(**settings)


@pytest.fixture
def tiny_config():
    return tiny_tokenizer_config()


@pytest.fixture
def tiny_model(tiny_config):
    from lavit import LaVITTokenizerModel

    torch.manual_seed(0)
    return LaVITTokenizerModel(tiny_config).eval()


@functools.cache
def _decoded_photos() -> tuple[np.ndarray, ...]:
    from skimage import data

    return data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()


def real_photos() -> list[np.ndarray]:
    """RGB photos that ship with scikit-image (no download): decoded once per process, a fresh copy each call (tests
    may write into them)."""
    return [photo.copy() for photo in _decoded_photos()]


def png_bytes(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG file bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_clip():
    """A randomly initialised CLIP (text + vision towers, 32 px) and its processor, with the offline BPE tokenizer of
    the tests: (model, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    text_tokenizer = tiny_text_tokenizer()
    tokenizer = CLIPTokenizerFast(tokenizer_object=text_tokenizer.backend_tokenizer, unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(text_tokenizer), max_position_embeddings=32, eos_token_id=2,
                                         **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=8)
    torch.manual_seed(0)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    return CLIPModel(config).eval(), processor


def photo_batch(model, count=4) -> torch.Tensor:
    """The first `count` real photos as pixel values for the visual tokenizer `model`: the official preprocessing of
    its config (`LaVITImageProcessor.from_tokenizer_config`), on its device and in its dtype."""
    from lavit import LaVITImageProcessor

    image_processor = LaVITImageProcessor.from_tokenizer_config(model.config)
    pixel_values = image_processor(images=real_photos()[:count], return_tensors="pt")["pixel_values"]
    return pixel_values.to(model.device, model.dtype)


@pytest.fixture(scope="session")
def parity_files():
    if not PARITY_DIR.is_dir():
        pytest.skip(f"official parity fixtures not found at {PARITY_DIR} (they live in ../shared, beside the repo)")
    from safetensors.torch import load_file

    return {name: load_file(PARITY_DIR / f"{name}.safetensors") for name in
            ("tokenizer_state_dict", "decoder_state_dict", "highres_decoder_state_dict", "inputs", "expected")}


def has_cuda() -> bool:
    return torch.cuda.is_available()


CORPUS = [
    "a photo of a cat sitting on a red sofa", "two dogs play in the park", "a man rides a bicycle down the street",
    "question: what color is the bus? answer: red", "a bowl of coffee on a wooden table", "an astronaut in a suit",
    "a rocket on the launch pad", "the quick brown fox jumps over the lazy dog", "user: describe the image assistant:",
    "what is in the picture? it is a cat.", "how many people are there? three", "a close up of a flower",
]


def tiny_text_tokenizer():
    """A real BPE tokenizer trained offline on a few sentences, with `[IMG]`/`[/IMG]` after the text vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lavit import LaVITProcessor

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
    )
    LaVITProcessor.add_image_tokens(tokenizer, tiny_tokenizer_config().codebook_size)
    return tokenizer


def text_vocab_size(tokenizer) -> int:
    """The text part of a LaVIT tokenizer's vocabulary: `[IMG]` comes right after it."""
    return tokenizer.convert_tokens_to_ids("[IMG]")


def tiny_lavit_config(text_vocab_size: int, **overrides):
    from lavit import LaVITConfig

    tokenizer_config = tiny_tokenizer_config()
    settings = dict(
        text_config=dict(
            model_type="llama", vocab_size=text_vocab_size + 2 + tokenizer_config.codebook_size, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        ),
        tokenizer_config=tokenizer_config,
        text_vocab_size=text_vocab_size,
    )
    settings.update(overrides)
    return LaVITConfig(**settings)


@pytest.fixture(scope="session")
def text_tokenizer():
    return tiny_text_tokenizer()


@pytest.fixture
def lavit_processor(text_tokenizer):
    from lavit import LaVITImageProcessor, LaVITProcessor

    return LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), text_tokenizer)


@pytest.fixture
def lavit_model(text_tokenizer):
    from lavit import LaVITForCausalLM

    torch.manual_seed(0)
    return LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()


@pytest.fixture
def lavit_folder(lavit_model, lavit_processor, tmp_path):
    """A saved tiny LaVIT model folder with its processor."""
    folder = tmp_path / "lavit"
    lavit_model.save_pretrained(folder)
    lavit_processor.save_pretrained(folder)
    return folder


@pytest.fixture
def pipeline_folder(lavit_model, lavit_processor, tmp_path):
    """A saved tiny `LaVITPipeline` folder (the model of `lavit_folder` and a tiny pixel decoder)."""
    from lavit import LaVITDetokenizer, LaVITPipeline

    torch.manual_seed(0)
    pipe = LaVITPipeline.from_detokenizer(lavit_model, lavit_processor, LaVITDetokenizer(tiny_detokenizer_config()))
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def write_tiny_language_model(folder, corpus=CORPUS, vocab_size=160, hidden_size=64):
    from lavit.training.language_model import write_small_language_model

    return write_small_language_model(folder, corpus, vocab_size, hidden_size)


def write_stage_components(root: Path) -> dict:
    """The inputs of the training entry points under `root`: a tiny untrained (seeded) visual tokenizer folder with
    its image processor, a tiny LM and a photo imagefolder."""
    from lavit.training.sample_data import write_photo_imagefolder

    from lavit import LaVITImageProcessor, LaVITTokenizerModel

    torch.manual_seed(0)
    LaVITTokenizerModel(tiny_tokenizer_config()).save_pretrained(root / "tokenizer")
    LaVITImageProcessor.from_tokenizer_config(tiny_tokenizer_config()).save_pretrained(root / "tokenizer")
    write_tiny_language_model(root / "lm")
    return {"tokenizer": root / "tokenizer", "lm": root / "lm", "photos": write_photo_imagefolder(root / "photos")}


def training_settings(output_dir, **overrides) -> dict:
    """CPU, fp32, quiet training settings for the stage tests (JSON-ready, for the multi-process runs too)."""
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=0, logging_steps=5, save_steps=1000, disable_tqdm=True, report_to="none", seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return settings


def training_args(output_dir, **overrides):
    """`LaVITTrainingArguments` with the `training_settings` of the stage tests."""
    from lavit.training.arguments import LaVITTrainingArguments

    return LaVITTrainingArguments(**training_settings(output_dir, **overrides))


def tiny_unet_config(cross_attention_dim: int, pooled_size: int | None = None) -> dict:
    """A two-level diffusers UNet (SDXL-style added conditions when `pooled_size` is given)."""
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    if pooled_size is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + pooled_size, use_linear_projection=True)
    return config


TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
    sample_size=32,
)


def tiny_detokenizer_config(conditioning="highres", **overrides):
    """Tiny detokenizer matching `tiny_tokenizer_config()`: 16 features of width 32, 32x32 images."""
    from lavit import LaVITDetokenizerConfig

    sizes = [12, 20] if conditioning == "highres" else [24]
    settings = dict(
        conditioning=conditioning, prompt_projection_sizes=sizes, pooled_projection_size=16, pooling_num_heads=4,
        negative_context_length=5, unet_config=tiny_unet_config(sum(sizes), 16 if conditioning == "highres" else None),
        vae_config=TINY_VAE_CONFIG, image_size=32, num_inference_steps=4,
    )
    settings.update(overrides)
    return LaVITDetokenizerConfig.from_tokenizer_config(tiny_tokenizer_config(), **settings)


@pytest.fixture(scope="module")
def components(tmp_path_factory):  # module scope: each test module that asks gets its own copy
    """A tiny (untrained, deterministic) visual tokenizer, a tiny LM and a photo dataset, pre-tokenized too."""
    from lavit.training.arguments import PretokenizeArguments
    from lavit.training.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("components")
    components = write_stage_components(root)
    tokenized = pretokenize(PretokenizeArguments(data=str(components["photos"]),
                                                 visual_tokenizer=str(root / "tokenizer"),
                                                 output=str(root / "photos_tokenized"), batch_size=4))
    return {**components, "tokenized": tokenized}


def final_weights(folder) -> dict:
    """The weights of a final folder: a model's, or those of a pipeline folder's decoder (what stage 3 writes) under
    the names of the `LaVITDetokenizer` it was trained as (condition modules unprefixed, `unet.*`, `vae.*`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return load_file(folder / "model.safetensors")
    weights = load_file(folder / "condition_encoder" / "model.safetensors")
    for name in ("unet", "vae"):
        part = load_file(folder / name / "diffusion_pytorch_model.safetensors")
        weights.update({f"{name}.{key}": value for key, value in part.items()})
    return weights


def write_lora_adapter(base_folder, output, rank: int, seed: int, base_name: str | None = None):
    """A LoRA adapter of the LaVIT model in `base_folder` whose B matrices are drawn from `seed` (adapters that
    change the weights), saved to `output` with `base_name` as its recorded base (PEFT's own record by default);
    returns the PEFT model."""
    from lavit.training.lora import lora_config
    from peft import get_peft_model

    from lavit import LaVITForCausalLM

    model = get_peft_model(LaVITForCausalLM.from_pretrained(base_folder), lora_config(r=rank))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(output)
    return model
