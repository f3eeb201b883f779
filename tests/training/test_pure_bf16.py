"""Pure-bf16 training (`--dtype bfloat16`) beside float32 weights: stage 2 through its real entry point, the same
losses within bf16's tolerance, a loss that goes down, bf16 weights saved, and the optimizer that keeps small updates
(torch-optimi's AdamW with Kahan summation; transformers' own AdamW for float32 weights)."""

import json

import pytest
import torch
from conftest import final_weights, training_args
from test_training import stage2_script
from transformers import TrainerCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS = 6


class OptimizerKind(TrainerCallback):
    def __init__(self):
        self.optimizer = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer


def stage2_losses(components, output, dtype: str) -> tuple[list[float], dict, object]:
    from lavit.training.stage2_pretrain import pretrain

    seen = OptimizerKind()
    # one learning rate for all (visual_learning_rate=None), and the paper's split: both optimizer paths
    final = pretrain(stage2_script(components, dtype=dtype, visual_learning_rate=3e-3),
                     training_args(output, max_steps=STEPS, logging_steps=1, learning_rate=1e-3), callbacks=[seen])
    logs = [json.loads(line) for line in (output / "logs.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in logs if "loss" in entry], final_weights(final), seen.optimizer


@pytest.mark.slow  # two stage-2 runs (about 20 s on 2 cores)
def test_pure_bf16_stage2_gives_the_float32_losses_and_learns(components, tmp_path):
    pytest.importorskip("optimi")
    runs = {dtype: stage2_losses(components, tmp_path / dtype, dtype) for dtype in ("float32", "bfloat16")}
    (float32_losses, float32_weights, float32_optimizer) = runs["float32"]
    (bf16_losses, bf16_weights, bf16_optimizer) = runs["bfloat16"]
    assert len(bf16_losses) == len(float32_losses) == STEPS
    # the first step sees the same weights rounded to bf16; later steps drift by bf16's rounding of the updates
    assert bf16_losses[0] == pytest.approx(float32_losses[0], rel=1e-2)
    assert bf16_losses == pytest.approx(float32_losses, rel=3e-2)
    print(f"losses per step: float32 {float32_losses}, bfloat16 {bf16_losses}")
    assert sum(bf16_losses[-2:]) / 2 < bf16_losses[0] * 0.9  # it learns
    assert {tensor.dtype for tensor in bf16_weights.values() if tensor.is_floating_point()} == {torch.bfloat16}
    assert {tensor.dtype for tensor in float32_weights.values() if tensor.is_floating_point()} == {torch.float32}
    optimizer = getattr(bf16_optimizer, "optimizer", bf16_optimizer)  # accelerate wraps it
    assert type(optimizer).__module__.startswith("optimi") and all(group["kahan_sum"]
                                                                   for group in optimizer.param_groups)
    assert type(getattr(float32_optimizer, "optimizer", float32_optimizer)) is torch.optim.AdamW


def test_dtype_is_declared_and_refused_with_qlora():
    from lavit.training.arguments import FinetuningArguments, PretrainingArguments

    with pytest.raises(ValueError, match="dtype"):
        PretrainingArguments(data="d", language_model="lm", visual_tokenizer="t", dtype="float16")
    with pytest.raises(ValueError, match="--qlora"):
        FinetuningArguments(data="d", model="m", qlora=True, dtype="bfloat16").set_dtype(torch.nn.Linear(2, 2))


def test_kahan_adamw_keeps_the_updates_plain_bf16_adamw_rounds_away():
    """bf16 keeps 8 bits of mantissa: 1e-3 steps on weights of about 1 are below half a bf16 step, so a plain bf16
    AdamW loses most of them; the stages' optimizer for bf16 weights (`kahan_adamw`) follows float32 AdamW."""
    pytest.importorskip("optimi")
    from lavit.training.trainer import kahan_adamw

    torch.manual_seed(0)
    start = torch.randn(128, 128)
    settings = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    moved = {}
    for name in ("float32", "kahan", "plain bf16"):
        weight = torch.nn.Parameter(start.clone().to(torch.float32 if name == "float32" else torch.bfloat16))
        optimizer_cls, kwargs = kahan_adamw(settings) if name == "kahan" else (torch.optim.AdamW, settings)
        optimizer = optimizer_cls([{"params": [weight], "weight_decay": 0.0}], **kwargs)
        for step in range(100):  # a steady direction plus noise: the weights travel about 0.1
            noise = torch.randn(128, 128, generator=torch.Generator().manual_seed(step))
            weight.grad = (start.sign() + 0.3 * noise).to(weight.dtype)
            optimizer.step()
        moved[name] = weight.detach().float() - start.to(weight.dtype).float()
    error = {name: float((moved[name] - moved["float32"]).norm() / moved["float32"].norm()) for name in moved}
    assert error["kahan"] < 0.05 and error["plain bf16"] > 0.5, error
