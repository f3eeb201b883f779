"""TRL's vision-language trainers on a tiny local LaVIT and locally built image datasets (`make test-peers`).

TRL's sdist ships no tests (trl 1.16.0: none under `tests/`; only the package index is reachable at test time), so
these are the checks its own trainer tests make of every model they train (`tests/test_sft_trainer.py`,
`test_dpo_trainer.py`): training logs a finite `train_loss` and EVERY trainable parameter changes (with PEFT: every
adapter weight, while the base weights stay). lavit adds: the frozen visual tokenizer never changes, and the saved
folder reloads to the trained weights and generates the trained model's tokens. Enumerated: each trainer with each
image dataset format TRL reads (SFT: prompt-completion and messages, with and without LoRA; DPO: preferences).

With compact `[IMG][/IMG]` placeholders (a processor without the visual tokenizer) TRL 1.16's SFT loss fails on a
length mismatch: TRL's collator must see the LM's sequence, so every case sets `set_visual_tokenizer`
(docs/unified_model.md).
"""

import copy
import math

import pytest
import torch
from conftest import real_photos
from PIL import Image

trl = pytest.importorskip("trl")

CAPTIONS = ["an astronaut in a suit", "a cat", "a bowl of coffee", "a rocket on the launch pad"]
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]


def images():
    return [[Image.fromarray(photo)] for photo in real_photos()[: len(CAPTIONS)]]


def answers():
    return [[{"role": "assistant", "content": [{"type": "text", "text": text}]}] for text in CAPTIONS]


def prompt_completion():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [QUESTION] * len(CAPTIONS), "completion": answers(), "images": images()})


def messages():
    from datasets import Dataset

    return Dataset.from_dict({"messages": [QUESTION + answer for answer in answers()], "images": images()})


def preferences():
    from datasets import Dataset

    chosen = answers()
    return Dataset.from_dict({"prompt": [QUESTION] * len(CAPTIONS), "chosen": chosen,
                              "rejected": chosen[1:] + chosen[:1], "images": images()})


SETTINGS = dict(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True, report_to="none",
                logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)


def sft(model, processor, output_dir, dataset, peft_config=None):
    return trl.SFTTrainer(model=model, processing_class=processor, train_dataset=dataset, peft_config=peft_config,
                          args=trl.SFTConfig(output_dir=str(output_dir), **SETTINGS))


def dpo(model, processor, output_dir, dataset, peft_config=None):
    # the reference model is given: TRL would otherwise load it from the (unsaved) model's path
    return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), processing_class=processor,
                          train_dataset=dataset, args=trl.DPOConfig(output_dir=str(output_dir), **SETTINGS))


def lora():
    from lavit.training.lora import lora_config

    return lora_config(["q_proj", "v_proj"], r=4)


CASES = [
    pytest.param(sft, prompt_completion, None, id="sft-prompt-completion"),
    pytest.param(sft, messages, None, id="sft-messages"),
    pytest.param(sft, prompt_completion, lora, id="sft-prompt-completion-lora"),
    pytest.param(dpo, preferences, None, id="dpo-preferences"),
]


def generate(model, processor):
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(images=[image for [image] in images()[:2]], text=[prompt] * 2)
    with torch.no_grad():
        return model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize(("make_trainer", "make_dataset", "make_peft_config"), CASES)
def test_trainer_trains_every_trainable_weight_and_saves_what_it_trained(make_trainer, make_dataset,
                                                                         make_peft_config, lavit_model,
                                                                         lavit_processor, tmp_path):
    from lavit import LaVITForCausalLM, LaVITProcessor

    lavit_model.save_pretrained(tmp_path / "base")
    lavit_processor.set_visual_tokenizer(lavit_model)  # TRL's collator must write the LM's sequence
    peft_config = make_peft_config() if make_peft_config else None
    trainer = make_trainer(lavit_model.train(), lavit_processor, tmp_path / "run", make_dataset(), peft_config)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()

    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    trained = dict(trainer.model.named_parameters())
    trainable = [name for name, param in trained.items() if param.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable) == bool(peft_config)
    for name in trainable:  # TRL's check: every parameter the trainer trains has moved
        assert not torch.allclose(before[name], trained[name]), f"{name} did not change"
    for name, param in trained.items():  # the frozen ones (the visual tokenizer; the base weights under LoRA) stay
        if not param.requires_grad:
            assert torch.equal(before[name], param), f"frozen {name} changed"
    assert any(".visual_tokenizer." in name for name in trained if name not in trainable)

    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    lavit_processor.save_pretrained(folder)
    processor = LaVITProcessor.from_pretrained(folder)
    if peft_config:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(LaVITForCausalLM.from_pretrained(tmp_path / "base"), folder)
    else:
        reloaded = LaVITForCausalLM.from_pretrained(folder)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, trained[name]), f"{name} was not saved as trained"
    assert torch.equal(generate(reloaded, processor), generate(trainer.model, processor))
