"""LaVITForCausalLM: placeholder expansion, targets, losses, packing, Trainer/PEFT integration, bad inputs."""

import pytest
import torch
from conftest import real_photos

from lavit import LaVITForCausalLM


def interleaved_batch(processor, padding_side="right"):
    """Three rows: two images + text, text only, one image between text. Real photos, different token counts."""
    photos = real_photos()
    texts = [
        "<image>a photo of a cat<image> two dogs play",
        "the quick brown fox jumps over the lazy dog",
        "question: what is <image> answer: a rocket",
    ]
    return processor(images=[photos[0], photos[1], photos[3]], text=texts, padding_side=padding_side)


def text_labels(batch):
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def test_expansion_places_every_image_with_its_own_token_count(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    config = lavit_model.config
    tokens = lavit_model.visual_tokenizer.tokenize(batch["pixel_values"])
    assert len(set(tokens.token_counts.tolist())) > 1, "the photos should keep different numbers of tokens"
    prepared = lavit_model.model.prepare_multimodal_inputs(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=text_labels(batch)
    )
    assert torch.equal(prepared.image_token_counts, tokens.token_counts)
    lengths = prepared.attention_mask.sum(dim=1)
    images_per_row = [2, 0, 1]
    counts = tokens.token_counts.tolist()
    expected_lengths = batch["attention_mask"].sum(dim=1) + torch.tensor([counts[0] + counts[1], 0, counts[2]])
    assert torch.equal(lengths, expected_lengths)
    # visual slots hold the code ids (LM offset) as input ids and as targets, between [IMG] and [/IMG]
    visual = (prepared.input_ids >= config.visual_token_offset) & prepared.attention_mask.bool()
    assert visual.sum(dim=1).tolist() == [counts[0] + counts[1], 0, counts[2]]
    assert torch.equal(prepared.input_ids[visual] - config.visual_token_offset, tokens.code_ids)
    assert torch.equal(prepared.labels[visual], prepared.input_ids[visual])
    starts = (prepared.input_ids == config.image_start_token_id).sum(dim=1).tolist()
    assert starts == images_per_row
    # positions count real tokens only and restart in each row
    assert torch.equal(prepared.position_ids[prepared.attention_mask.bool()],
                       torch.cat([torch.arange(int(n)) for n in lengths]))


def test_loss_is_one_cross_entropy_with_per_modality_parts(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    labels = text_labels(batch)
    both = lavit_model(**batch, labels=labels)
    text_only = lavit_model(**batch, labels=labels, loss_modalities="text")
    image_only = lavit_model(**batch, labels=labels, loss_modalities="image")
    assert both.text_loss is not None and both.image_loss is not None
    assert torch.allclose(text_only.loss, both.text_loss, atol=1e-6)
    assert torch.allclose(image_only.loss, both.image_loss, atol=1e-6)
    assert image_only.text_loss is None and text_only.image_loss is None
    # the joint mean is the target-weighted mix of the two parts
    targets = both.labels[:, 1:]
    num_image = int(((targets >= lavit_model.config.text_vocab_size)).sum())
    num_text = int((targets != -100).sum()) - num_image
    mixed = (both.text_loss * num_text + both.image_loss * num_image) / (num_text + num_image)
    assert torch.allclose(both.loss, mixed, atol=1e-5)
    # with num_items_in_batch the loss is the sum divided by it (gradient accumulation across micro-batches); the
    # count must include every target, so the ids hold expanded spans: with compact ones the model refuses it
    prepared = lavit_model.model.prepare_multimodal_inputs(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=labels)
    keep_mask = lavit_model.visual_tokenizer.tokenize(batch["pixel_values"]).keep_mask
    scaled = lavit_model(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask, labels=prepared.labels,
                         pixel_values=batch["pixel_values"], image_keep_mask=keep_mask,
                         num_items_in_batch=torch.tensor(1000))
    assert torch.allclose(scaled.loss, both.loss * (num_text + num_image) / 1000, atol=1e-6)
    with pytest.raises(ValueError, match="3 image.s. of this batch are compact"):
        lavit_model(**batch, labels=labels, num_items_in_batch=torch.tensor(1000))


def test_unsupervised_image_keeps_only_text_targets(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    labels = text_labels(batch)
    config = lavit_model.config
    labels[batch["input_ids"] == config.image_start_token_id] = -100  # images as prompts only
    outputs = lavit_model(**batch, labels=labels)
    assert not bool((outputs.labels >= config.visual_token_offset).any())
    assert outputs.image_loss is not None  # [/IMG] is still a target: it is an image-modality id


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_and_padded_batches_give_the_same_loss(lavit_model, lavit_processor, padding_side):
    padded = interleaved_batch(lavit_processor, padding_side=padding_side)
    padded_loss = lavit_model(**padded, labels=text_labels(padded)).loss
    rows = [ids[mask.bool()] for ids, mask in zip(padded["input_ids"], padded["attention_mask"], strict=True)]
    packed_ids = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(len(row)) for row in rows])[None]
    packed = lavit_model(input_ids=packed_ids, position_ids=position_ids, pixel_values=padded["pixel_values"],
                         labels=packed_ids.clone(), use_cache=False)
    assert packed.logits.shape[0] == 1
    assert torch.allclose(packed.loss, padded_loss, atol=1e-5), (packed.loss, padded_loss)


@pytest.mark.parametrize("generated_image_inputs", ["codes", "features"])
def test_generation_targets_enter_as_codes_as_in_generation(lavit_model, lavit_processor, generated_image_inputs):
    """A text-to-image pair feeds its image the way `generate_image_tokens` does (code embeddings), so the visual rows
    of the embedding learn; an image-to-text pair keeps the continuous features."""
    photos = real_photos()
    lavit_model.config.generated_image_inputs = generated_image_inputs
    visual_rows = slice(lavit_model.config.visual_token_offset, lavit_model.config.visual_token_end)
    embeddings = lavit_model.get_input_embeddings().weight
    try:
        for text, generated in (("a photo of a cat<image>", True), ("<image>a photo of a cat", False)):
            batch = lavit_processor(images=[photos[0]], text=[text])
            lavit_model.zero_grad()
            outputs = lavit_model(**batch, labels=batch["input_ids"])
            outputs.loss.backward()
            feeds_codes = generated and generated_image_inputs == "codes"
            assert bool(embeddings.grad[visual_rows].abs().sum() > 0) == feeds_codes, text
            if feeds_codes:  # the same loss as the expanded ids fed without pixels (discrete embeddings only)
                prepared = lavit_model.model.prepare_multimodal_inputs(
                    batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["input_ids"]
                )
                discrete = lavit_model(input_ids=prepared.input_ids, labels=prepared.labels)
                assert torch.allclose(discrete.loss, outputs.loss, atol=1e-6)
    finally:
        lavit_model.config.generated_image_inputs = "codes"
        lavit_model.zero_grad()


def test_expanded_pretokenized_form_equals_compact_form(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    labels = text_labels(batch)
    compact = lavit_model(**batch, labels=labels)
    prepared = lavit_model.model.prepare_multimodal_inputs(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=labels
    )
    keep_mask = lavit_model.visual_tokenizer.tokenize(batch["pixel_values"]).keep_mask
    # pre-tokenized data: visual slots already in input_ids, any visual id as label placeholder
    placeholder_labels = prepared.labels.masked_fill(prepared.labels >= lavit_model.config.visual_token_offset,
                                                     lavit_model.config.visual_token_offset)
    expanded = lavit_model(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                           pixel_values=batch["pixel_values"], image_keep_mask=keep_mask, labels=placeholder_labels)
    assert torch.allclose(expanded.loss, compact.loss, atol=1e-6)
    assert torch.equal(expanded.labels, compact.labels)
    # Trainer counts labels[..., 1:] != -100 before the forward: exact for the expanded form
    count = int((placeholder_labels[:, 1:] != -100).sum())
    assert count == int((compact.labels[:, 1:] != -100).sum())


def test_gradient_accumulation_with_num_items_matches_the_full_batch(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    prepared = lavit_model.model.prepare_multimodal_inputs(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=text_labels(batch)
    )
    keep_mask = lavit_model.visual_tokenizer.tokenize(batch["pixel_values"]).keep_mask
    inputs = dict(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask, labels=prepared.labels,
                  pixel_values=batch["pixel_values"], image_keep_mask=keep_mask)
    model = lavit_model.train()
    model.zero_grad()
    model(**inputs).loss.backward()
    full = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad()
    num_items = (prepared.labels[:, 1:] != -100).sum()
    image_rows = {0: [0, 1], 1: [], 2: [2]}
    for rows in ([0], [1, 2]):
        images = [index for row in rows for index in image_rows[row]]
        micro = {key: value[rows] for key, value in inputs.items() if key not in ("pixel_values", "image_keep_mask")}
        micro["pixel_values"] = inputs["pixel_values"][images] if images else None
        micro["image_keep_mask"] = inputs["image_keep_mask"][images] if images else None
        model(**micro, num_items_in_batch=num_items).loss.backward()
    for name, grad in full.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


def test_trainable_parts_and_frozen_tokenizer(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    model = lavit_model.train()
    assert not model.visual_tokenizer.training and not model.visual_tokenizer.vision_model.training
    model(**batch, labels=text_labels(batch)).loss.backward()
    assert all(param.grad is None for param in model.visual_tokenizer.parameters())
    for module in (model.model.visual_merger, model.model.visual_projection, model.lm_head):
        assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in module.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    model = lavit_model.train()
    grads = []
    for enabled in (False, True):
        if enabled:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.zero_grad()
        loss = model(**batch, labels=text_labels(batch)).loss
        loss.backward()
        grads.append({name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_resize_token_embeddings_keeps_the_vocabulary_layout(lavit_model, lavit_processor):
    old_vocab = lavit_model.config.vocab_size
    lavit_model.resize_token_embeddings(old_vocab + 5)
    assert lavit_model.config.text_config.vocab_size == old_vocab + 5
    assert lavit_model.lm_head.weight.shape[0] == old_vocab + 5
    batch = interleaved_batch(lavit_processor)
    outputs = lavit_model(**batch, labels=text_labels(batch))
    assert outputs.logits.shape[-1] == old_vocab + 5 and torch.isfinite(outputs.loss)


def test_lora_training_step_updates_only_adapters(lavit_model, lavit_processor):
    from peft import LoraConfig, get_peft_model

    batch = interleaved_batch(lavit_processor)
    peft_model = get_peft_model(lavit_model.train(), LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj)", init_lora_weights=False
    ))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    loss = peft_model(**batch, labels=text_labels(batch)).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, param in peft_model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == trainable


def test_plain_trainer_gets_the_exact_loss_or_one_clear_error(lavit_model, lavit_processor, tmp_path):
    """transformers.Trainer divides the summed loss by the targets it counts in the labels: with compact images the
    model would add targets it never counted (the loss about 3x off), so the model refuses, naming both fixes; with
    the expanded processor the Trainer counts every target and optimises the model's exact loss."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    photos = real_photos()
    examples = [{"text": f"<image>{caption}", "image": photos[index % len(photos)]}
                for index, caption in enumerate(["a photo of a cat", "an astronaut in a suit", "a bowl of coffee",
                                                 "a rocket on the launch pad"])]

    def collate(rows):
        batch = lavit_processor(images=[row["image"] for row in rows], text=[row["text"] for row in rows])
        batch["labels"] = text_labels(batch)
        return batch

    def trainer(accumulation):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, logging_steps=1, remove_unused_columns=False,
                                 save_strategy="no", logging_nan_inf_filter=False)
        return Trainer(model=lavit_model, args=args, train_dataset=examples, data_collator=collate)

    for accumulation in (1, 2):
        with pytest.raises(ValueError, match="compact .*set_visual_tokenizer.*LaVITTrainer"):
            trainer(accumulation).train()

    # the expanded processor: the first step's logged loss is the model's own loss on the first batch
    lavit_processor.set_visual_tokenizer(lavit_model)
    try:
        first_batch = collate(examples[:2])
        with torch.no_grad():
            expected = lavit_model.eval()(**first_batch).loss.item()
        losses = []

        class Losses(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                losses.extend([logs["loss"]] if logs and "loss" in logs else [])

        run = trainer(1)
        run.train_dataset = examples[:2]  # one batch, in any order: the mean over its targets is the same
        run.add_callback(Losses())
        before = lavit_model.lm_head.weight.detach().clone()
        run.train()
        assert losses[0] == pytest.approx(expected, rel=1e-4)
        assert not torch.equal(before, lavit_model.lm_head.weight)
    finally:
        lavit_processor.set_visual_tokenizer(None)


def test_generate_lengths_count_the_ids_the_user_gave(lavit_model, lavit_processor):
    """max_length / min_length count the prompt's ids (an image as its [IMG] [/IMG] pair) plus new tokens, as for
    a text-only model; the hidden visual tokens never count."""
    inputs = lavit_processor(images=[real_photos()[0]], text=["<image>a photo of"])
    prompt_length = inputs["input_ids"].shape[1]
    assert prompt_length < 10 < 20
    for limit in (10, 20):
        output = lavit_model.eval().generate(**inputs, max_length=limit, min_length=limit, do_sample=False)
        assert output.shape == (1, limit)
        assert torch.equal(output[0, :prompt_length], inputs["input_ids"][0])
    output = lavit_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape == (1, prompt_length + 3)
    with pytest.raises(ValueError, match=f"max_length={prompt_length} leaves no room after the prompt's "
                                         f"{prompt_length} ids"):
        lavit_model.generate(**inputs, max_length=prompt_length)


def test_bad_inputs_raise_clear_errors(lavit_model, lavit_processor):
    batch = interleaved_batch(lavit_processor)
    with pytest.raises(ValueError, match="3 image placeholder.*2 image"):
        lavit_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"][:2])
    with pytest.raises(ValueError, match="no pixel_values"):
        lavit_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    config = lavit_model.config
    unclosed = torch.tensor([[5, config.image_start_token_id, 7, config.image_start_token_id,
                              config.image_end_token_id]])
    with pytest.raises(ValueError, match="not paired|never closed|non-visual"):
        lavit_model(input_ids=unclosed, pixel_values=batch["pixel_values"][:1])
    wrong_length = torch.tensor([[5, config.image_start_token_id, config.visual_token_offset,
                                  config.image_end_token_id]])
    with pytest.raises(ValueError, match="fills 1 visual slots"):
        lavit_model(input_ids=wrong_length, pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        lavit_model(**{**batch, "pixel_values": torch.zeros(3, 3, 112, 112)})
    with pytest.raises(ValueError, match=r"input_ids must be in \[0"):
        lavit_model(input_ids=torch.tensor([[config.vocab_size + 3]]))


def test_from_components_extends_a_text_lm(lavit_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    text_lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
    model = LaVITForCausalLM.from_components(lavit_model.visual_tokenizer, text_lm)
    assert model.config.text_vocab_size == 40
    assert model.config.vocab_size == 40 + 2 + lavit_model.config.tokenizer_config.codebook_size
    assert torch.equal(model.get_input_embeddings().weight[:40], text_lm.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.weight[:40], text_lm.lm_head.weight)
    text = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(model(input_ids=text).logits[..., :40], text_lm(input_ids=text).logits, atol=1e-5)
    merger_state = model.model.visual_merger.state_dict()
    for key, value in lavit_model.visual_tokenizer.merger.state_dict().items():
        assert torch.equal(merger_state[key], value), key
