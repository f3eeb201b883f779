import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def real_photos() -> list[np.ndarray]:
    """RGB photos that ship with scikit-image (no download)."""
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]


def photo_batch(model, count=4) -> torch.Tensor:
    return torch.cat([model.image_to_pixel_values(photo) for photo in real_photos()[:count]])


@pytest.fixture(scope="session")
def parity_files():
    if not PARITY_DIR.is_dir():
        pytest.skip(f"official parity fixtures not found at {PARITY_DIR} (they live in ../shared, beside the repo)")
    from safetensors.torch import load_file

    return {name: load_file(PARITY_DIR / f"{name}.safetensors") for name in
            ("tokenizer_state_dict", "decoder_state_dict", "highres_decoder_state_dict", "inputs", "expected")}


def has_cuda() -> bool:
    return torch.cuda.is_available()
