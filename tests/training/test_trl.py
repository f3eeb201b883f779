"""Fine-tuning with the ecosystem's trainers on raw images: TRL's SFTTrainer end to end (conversational image-text data
-> train -> save -> reload -> generate), the exact loss under gradient accumulation, and the placeholder contract the
processor writes when it has the visual tokenizer (expanded spans: the Trainer, TRL and the LM see one sequence)."""

import copy

import pytest
import torch
from conftest import real_photos
from PIL import Image

trl = pytest.importorskip("trl")

CAPTIONS = ["an astronaut in a suit", "a cat", "a bowl of coffee", "a rocket on the launch pad"]


def conversational_dataset():
    """TRL's conversational prompt-completion format with one image per example."""
    from datasets import Dataset

    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    return Dataset.from_dict({
        "prompt": [question] * len(CAPTIONS),
        "completion": [[{"role": "assistant", "content": [{"type": "text", "text": text}]}] for text in CAPTIONS],
        "images": [[Image.fromarray(photo)] for photo in real_photos()[: len(CAPTIONS)]],
    })


def sft_trainer(model, processor, output_dir, **settings):
    settings = {**dict(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                       use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                       dataloader_num_workers=0), **settings}
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**settings), train_dataset=conversational_dataset(),
                          processing_class=processor)


def test_expanded_placeholders_give_the_compact_outputs(lavit_model, lavit_processor):
    photos = real_photos()
    texts = ["<image>a photo of a cat", "question: what is <image> answer: red", "a red bus"]
    compact = lavit_processor(images=photos[:2], text=texts)
    lavit_processor.set_visual_tokenizer(lavit_model, max_tokens=6)
    expanded = lavit_processor(images=photos[:2], text=texts)
    counts = expanded["image_keep_mask"].sum(dim=1)
    assert counts.tolist() == [6, 6]
    # the ids are the LM's sequence: [IMG] + the image's code ids + [/IMG]
    config = lavit_model.config
    start = int((expanded["input_ids"][0] == config.image_start_token_id).nonzero()[0])
    codes = lavit_model.visual_tokenizer.tokenize(compact["pixel_values"][:1], max_tokens=6).code_ids
    assert expanded["input_ids"][0, start + 1 : start + 7].tolist() == (codes + config.visual_token_offset).tolist()
    assert int(expanded["input_ids"][0, start + 7]) == config.image_end_token_id
    assert int(expanded["attention_mask"].sum()) == int(compact["attention_mask"].sum()) + int(counts.sum())
    labels = {name: inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
              for name, inputs in (("compact", compact), ("expanded", expanded))}
    with torch.no_grad():
        by_model = lavit_model(**compact, labels=labels["compact"], image_selection={"max_tokens": 6})
        by_processor = lavit_model(**expanded, labels=labels["expanded"])
    assert by_processor.logits.shape[1] == expanded["input_ids"].shape[1]
    assert torch.allclose(by_model.loss, by_processor.loss, atol=1e-5)
    # truncation counts visual tokens now, and never splits an image span
    text_ids = lavit_processor(text="a photo of a cat")["input_ids"]
    for room, kept in ((3, False), (8, True)):  # the span takes 8 tokens: [IMG], 6 visual ids, [/IMG]
        cut = lavit_processor(images=photos[:1], text="a photo of a cat<image>", truncation=True,
                              max_length=text_ids.shape[1] + room)
        assert torch.equal(cut["input_ids"][:, : text_ids.shape[1]], text_ids)
        assert ("pixel_values" in cut) == ("image_keep_mask" in cut) == kept
        assert cut["input_ids"].shape[1] == text_ids.shape[1] + (8 if kept else 0)
    lavit_processor.set_visual_tokenizer(None)
    assert not lavit_processor.expands_images


def test_trl_sft_trainer_end_to_end(lavit_model, lavit_processor, tmp_path):
    lavit_processor.set_visual_tokenizer(lavit_model)
    trainer = sft_trainer(lavit_model.train(), lavit_processor, tmp_path / "run", max_steps=24, learning_rate=3e-2,
                          per_device_train_batch_size=2)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["labels"].shape == batch["input_ids"].shape  # one sequence for TRL and the LM
    # TRL's completion-only loss: the answer text is supervised, the input image's codes are not
    supervised = batch["labels"][batch["labels"] != -100]
    assert bool((supervised < lavit_model.config.text_vocab_size).all())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # the mean of the last quarter of the steps against the first quarter's: one step's loss of a 2-example batch is
    # noise. The answers' own entropy is a floor near 0.55x the first losses (seen: 4.80 -> 2.73 over 24 steps), so
    # the bar is 0.65x: learning, not a chance dip
    quarter = max(1, len(losses) // 4)
    assert sum(losses[-quarter:]) / quarter < 0.65 * sum(losses[:quarter]) / quarter, losses

    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    lavit_processor.save_pretrained(folder)
    from lavit import LaVITForCausalLM, LaVITProcessor

    model, processor = LaVITForCausalLM.from_pretrained(folder).eval(), LaVITProcessor.from_pretrained(folder)
    assert not processor.expands_images  # the visual tokenizer is never written into the processor's folder
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    photos = [Image.fromarray(photo) for photo in real_photos()[:2]]
    inputs = processor(images=photos, text=[prompt] * 2)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    trained = lavit_model.eval().generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(output, trained)  # the reloaded folder is the trained model
    assert all(answer.strip() and answer.split()[0] in {"a", "an"} for answer in answers), answers


def test_trainer_loss_is_exact_under_gradient_accumulation_on_raw_images(lavit_model, lavit_processor, tmp_path):
    """`Trainer` on raw images with image and text targets (the processor writes expanded spans, so the targets it
    counts are the ones the model supervises): one step of two accumulated micro-batches of two examples gives the
    loss and the update of the whole batch of four computed by hand (summed cross-entropy over all targets / their
    number; the examples have different numbers of targets, so a mean of per-micro-batch means would differ).
    float64 and a token budget keep the frozen selector's choices identical whatever the batch composition."""
    from transformers import Trainer, TrainingArguments

    model = lavit_model.double().train()
    lavit_processor.set_visual_tokenizer(model, max_tokens=8)
    photos = real_photos()
    examples = [{"image": photos[index], "text": f"<image>{caption}"} for index, caption in enumerate(CAPTIONS)]

    def collate(rows):
        batch = lavit_processor(images=[row["image"] for row in rows], text=[row["text"] for row in rows])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    initial = {name: value.clone() for name, value in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                             use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    trained = {name: value.clone() for name, value in model.state_dict().items()}

    model.load_state_dict(initial)
    model.zero_grad()
    batch = collate(examples)
    targets = (batch["labels"][:, 1:] != -100).sum()
    assert len(set((batch["labels"][:, 1:] != -100).sum(dim=1).tolist())) > 1  # unequal micro-batches
    outputs = model(**batch, num_items_in_batch=targets)
    assert int((outputs.labels[:, 1:] != -100).sum()) == int(targets)  # the model supervises what Trainer counted
    outputs.loss.backward()
    assert loss == pytest.approx(float(outputs.loss), rel=1e-6)
    for name, parameter in model.named_parameters():
        if name in ("lm_head.weight", "model.visual_projection.weight"):
            update = trained[name] - initial[name]
            assert float(update.abs().max()) > 1e-4, name  # the step changed the weights
            assert torch.allclose(update, -parameter.grad, atol=1e-9), name


def test_lora_targets_only_the_language_model_and_warns_for_frozen_adapters(lavit_model, lavit_processor):
    from lavit.modeling import modeling_lavit
    from lavit.training.lora import language_model_targets, lora_config
    from peft import LoraConfig, get_peft_model
    from transformers.testing_utils import CaptureLogger

    assert language_model_targets("q_proj, v_proj") == language_model_targets(["q_proj", "v_proj"])
    assert language_model_targets(r".*\.q_proj") == r".*\.q_proj"  # a regex is PEFT's business
    batch = lavit_processor(images=real_photos()[:1], text="<image>a cat")
    for config, frozen_adapters in ((lora_config(["q_proj", "v_proj"], r=4), False),
                                    (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), True)):
        model = get_peft_model(copy.deepcopy(lavit_model), config)
        adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
        in_tokenizer = [name for name in adapted if ".visual_tokenizer." in name]
        assert adapted and bool(in_tokenizer) == frozen_adapters
        assert all(".language_model." in name for name in adapted) != frozen_adapters
        modeling_lavit.logger.warning_once.cache_clear()
        with CaptureLogger(modeling_lavit.logger) as captured:
            model.train()(**batch)
        assert ("sit in the frozen visual tokenizer" in captured.out) == frozen_adapters


def test_lavit_trainer_is_exact_with_compact_placeholders_on_raw_images(lavit_model, lavit_processor, tmp_path):
    """Stage-2 batches (compact `[IMG] [/IMG]`, image and text targets, packed rows) under gradient accumulation:
    `LaVITTrainer` runs the frozen tokenizer before counting, so one step of two micro-batches gives the loss and the
    update of the whole batch computed by hand with every target the model supervises."""
    import datasets
    from conftest import training_args
    from lavit.training.collators import LaVITDataCollator
    from lavit.training.sequences import SequenceBuilder
    from lavit.training.trainer import LaVITTrainer

    model = lavit_model.double().train()
    config = model.config
    images = [Image.fromarray(photo) for photo in real_photos()[:4]]
    records = datasets.Dataset.from_dict({"image": images, "text": CAPTIONS}).cast_column("image",
                                                                                         datasets.Image(decode=False))
    rows = SequenceBuilder(lavit_processor.tokenizer, config, max_length=40, order="text_to_image").build(records)
    collator = LaVITDataCollator(lavit_processor.image_processor, config.image_start_token_id,
                                 pad_token_id=lavit_processor.tokenizer.pad_token_id)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = LaVITTrainer(model=model, train_dataset=rows, data_collator=collator, args=training_args(
        tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, remove_unused_columns=False))
    encoded = []  # images the frozen encoder reads: once per image and step (the Trainer hands its output on)
    hook = model.visual_tokenizer.vision_model.register_forward_hook(
        lambda module, args, output: encoded.append(args[0].shape[0]))
    trainer.train()
    hook.remove()
    assert sum(encoded) == len(images)
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    trained = {name: value.clone() for name, value in model.state_dict().items()}

    model.load_state_dict(initial)
    model.zero_grad()
    batch = collator([rows[index] for index in range(len(rows))])
    # the whole batch in one forward: the model's own mean over every target it supervises (a num_items_in_batch
    # with compact placeholders is refused: see test_plain_trainer_gets_the_exact_loss_or_one_clear_error)
    outputs = model(**batch)
    assert bool((outputs.labels >= config.visual_token_offset).any())  # image targets are part of the loss
    outputs.loss.backward()
    assert loss == pytest.approx(float(outputs.loss), rel=1e-6)
    update = trained["lm_head.weight"] - initial["lm_head.weight"]
    assert float(update.abs().max()) > 1e-4
    assert torch.allclose(update, -model.lm_head.weight.grad, atol=1e-9)


def test_messages_format_with_assistant_only_loss_supervises_the_answers_only(lavit_model, lavit_processor, tmp_path):
    """TRL's `messages` format: `assistant_only_loss=True` reads the chat template's assistant mask through the
    processor, so only the answers (and their end of turn) are targets, never the prompt or the input image codes."""
    from datasets import Dataset

    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": text}]}] for text in CAPTIONS[:2]
    ]
    dataset = Dataset.from_dict({"messages": conversations,
                                 "images": [[Image.fromarray(photo)] for photo in real_photos()[:2]]})
    lavit_processor.set_visual_tokenizer(lavit_model)
    trainer = trl.SFTTrainer(
        model=lavit_model.train(), train_dataset=dataset, processing_class=lavit_processor,
        args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                           report_to="none", save_strategy="no", assistant_only_loss=True),
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["labels"].shape == batch["input_ids"].shape
    tokenizer = lavit_processor.tokenizer
    answers = [tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert answers == [f"{text}{tokenizer.eos_token}" for text in CAPTIONS[:2]]
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def preference_dataset():
    """TRL's conversational preference format with one image per example: the right caption is chosen."""
    from datasets import Dataset

    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    answers = [[{"role": "assistant", "content": [{"type": "text", "text": text}]}] for text in CAPTIONS]
    return Dataset.from_dict({
        "prompt": [question] * len(CAPTIONS), "chosen": answers, "rejected": answers[1:] + answers[:1],
        "images": [[Image.fromarray(photo)] for photo in real_photos()[: len(CAPTIONS)]],
    })


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_trl_dpo_trainer_end_to_end(lavit_model, lavit_processor, tmp_path):
    """TRL's DPOTrainer on images: the weights the LM trains change, the frozen visual tokenizer does not, and the
    saved model reloads and generates as the trained one."""
    lavit_processor.set_visual_tokenizer(lavit_model)
    before = {name: param.detach().clone() for name, param in lavit_model.named_parameters()}
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                         learning_rate=1e-2, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                         seed=0, dataloader_num_workers=0)
    # the reference model is given: TRL would otherwise load it from the (unsaved) model's path
    trainer = trl.DPOTrainer(model=lavit_model.train(), ref_model=copy.deepcopy(lavit_model).eval(), args=args,
                             train_dataset=preference_dataset(), processing_class=lavit_processor)
    trainer.train()
    changed = {name for name, param in lavit_model.named_parameters() if not torch.equal(param, before[name])}
    assert any(".language_model." in name for name in changed)
    assert not any(name.startswith("model.visual_tokenizer.") for name in changed)
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    from lavit import LaVITForCausalLM

    inputs = lavit_processor(images=[Image.fromarray(real_photos()[0])], text="<image>what is in the picture?")
    reloaded = LaVITForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False),
                       lavit_model.eval().generate(**inputs, max_new_tokens=4, do_sample=False))
