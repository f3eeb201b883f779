"""`lavit.training.trainer`: the optimizer choice (Kahan-summed AdamW exactly when a plain AdamW would train bf16
weights), the Liger device check, the toy VAE fit (its step count, a frozen VAE afterwards) and `whole_weights`
outside DeepSpeed. Trainer runs themselves are checked by the stage tests.
"""

import pytest
import torch
from conftest import TINY_VAE_CONFIG, training_args
from diffusers import AutoencoderKL
from lavit.training.trainer import LaVITTrainer, check_liger_device, fit_vae, kahan_adamw, whole_weights
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


def linear(dtype: torch.dtype, trainable: bool = True) -> torch.nn.Module:
    return torch.nn.Linear(2, 2).to(dtype).requires_grad_(trainable)


def test_liger_on_the_cpu_is_refused_with_the_fix_unless_triton_interprets(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--use_liger_kernel needs a GPU.*drop --use_liger_kernel"):
        check_liger_device(torch.device("cpu"))
    check_liger_device(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_liger_device(torch.device("cpu"))


def test_kahan_adamw_keeps_adams_settings_and_turns_compensation_on():
    optimi = pytest.importorskip("optimi")
    optimizer_cls, settings = kahan_adamw({"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "fused": True})
    assert optimizer_cls is optimi.AdamW
    assert settings == {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "kahan_sum": True}


@pytest.mark.parametrize("optim, dtype, trainable, kahan", [
    ("adamw_torch", torch.bfloat16, True, True),
    ("adamw_torch_fused", torch.bfloat16, True, True),
    ("adamw_torch", torch.float32, True, False),
    ("adamw_torch", torch.bfloat16, False, False),  # frozen bf16 weights take no update to lose
    ("sgd", torch.bfloat16, True, False),  # an optimizer the user chose is kept
])
def test_kahan_adamw_replaces_a_plain_adamw_only_for_trainable_bf16_weights(tmp_path, optim, dtype, trainable,
                                                                            kahan):
    if kahan:
        pytest.importorskip("optimi")
    args = training_args(tmp_path, optim=optim)
    optimizer_cls, settings = LaVITTrainer.get_optimizer_cls_and_kwargs(args, linear(dtype, trainable))
    assert settings.get("kahan_sum", False) is kahan
    assert (optimizer_cls.__module__.startswith("optimi")) is kahan


def test_without_a_model_the_optimizer_is_transformers_own(tmp_path):
    optimizer_cls, settings = LaVITTrainer.get_optimizer_cls_and_kwargs(training_args(tmp_path))
    assert optimizer_cls is torch.optim.AdamW and "kahan_sum" not in settings


def test_fit_vae_takes_the_steps_asked_across_epochs_and_leaves_the_vae_frozen():
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": 8})
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    images = [torch.rand(3, 8, 8) * 2 - 1 for _ in range(3)]
    losses = fit_vae(vae, images, torch.stack, steps=3, batch_size=2)  # 2 batches per epoch: the 3rd is a new epoch
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert not vae.training and not any(parameter.requires_grad for parameter in vae.parameters())
    assert any(not torch.equal(value, before[name]) for name, value in vae.state_dict().items())


def test_whole_weights_outside_deepspeed_changes_nothing(tmp_path):
    args = training_args(tmp_path)
    with whole_weights(args):
        assert not is_deepspeed_zero3_enabled()
    assert args.device.type == "cpu"
