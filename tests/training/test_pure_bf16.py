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
    # it learns as float32 does: most of float32's drop (about 10% in 6 steps; the selector decides in float32, so
    # both runs see the same visual tokens)
    float32_drop, bf16_drop = (losses[0] - sum(losses[-2:]) / 2 for losses in (float32_losses, bf16_losses))
    assert float32_drop > 0.05 * float32_losses[0] and bf16_drop > 0.8 * float32_drop, (float32_drop, bf16_drop)
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


def test_every_model_a_stage_loads_from_a_bf16_folder_is_float32_unless_dtype_says(tmp_path):
    """atk37 F4: `lavit finetune --model BF16_FOLDER` trained bf16 weights under the default `--dtype float32` (and
    stage 1 a bf16 tokenizer, with no --dtype to say otherwise): transformers keeps a folder's saved dtype. Each
    loader of `training.models` reads LaVIT models in float32; `--dtype bfloat16` alone casts (`set_dtype`)."""
    from conftest import text_vocab_size, tiny_detokenizer_config, tiny_lavit_config, tiny_text_tokenizer
    from lavit.training.arguments import FinetuningArguments, PretrainingArguments, TokenizerTrainingArguments
    from lavit.training.models import build_tokenizer, build_unified_model, load_detokenizer, load_visual_tokenizer

    from lavit import LaVITDetokenizer, LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    tokenizer = tiny_text_tokenizer()
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(tokenizer))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "lavit")
    LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), tokenizer).save_pretrained(tmp_path / "lavit")
    model.model.visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    LaVITDetokenizer(tiny_detokenizer_config()).to(torch.bfloat16).save_pretrained(tmp_path / "detokenizer")

    def dtypes(module) -> set:
        return {parameter.dtype for parameter in module.parameters()}

    loaded = {
        "stage 1 --model": build_tokenizer(TokenizerTrainingArguments(data="d", model=str(tmp_path / "tokenizer"))),
        "a visual tokenizer of a model": load_visual_tokenizer(str(tmp_path / "lavit")),
        "a visual tokenizer folder": load_visual_tokenizer(str(tmp_path / "tokenizer")),
        "stage 2 --model": build_unified_model(PretrainingArguments(data="d", model=str(tmp_path / "lavit")))[0],
        "stage 3 --model": load_detokenizer(str(tmp_path / "detokenizer")),
    }
    assert {name: dtypes(module) for name, module in loaded.items()} == {name: {torch.float32} for name in loaded}
    bf16 = LaVITForCausalLM.from_pretrained(tmp_path / "lavit")  # transformers' own default: the saved dtype
    assert dtypes(bf16) == {torch.bfloat16}
    FinetuningArguments(data="d", model="m").set_dtype(bf16)  # the default --dtype float32
    assert dtypes(bf16) == {torch.float32}
    FinetuningArguments(data="d", model="m", dtype="bfloat16").set_dtype(bf16)
    assert dtypes(bf16) == {torch.bfloat16}
