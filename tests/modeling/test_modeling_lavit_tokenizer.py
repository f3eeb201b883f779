"""Behaviour of LaVITTokenizerModel on tiny configs (CPU, float32) and real photos from scikit-image."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import photo_batch, tiny_tokenizer_config
from lavit.modeling.attention_lavit import official_leaky_attention, sdpa_attention
from lavit.modeling.modeling_lavit_tokenizer import (
    LaVITFeaturesOutput,
    LaVITOfficialTokenMerger,
    LaVITPackedTokensOutput,
    LaVITTokenizationOutput,
    LaVITTokenMerger,
    build_token_merger,
    check_selection_arguments,
    keep_at_least_one,
    kept_token_fields,
    top_k_keep_weights,
)

from lavit import LaVITTokenizerModel


def test_tokenize_shapes_and_packed_form(tiny_model):
    pixel_values = photo_batch(tiny_model, 4)
    tokens = tiny_model.tokenize(pixel_values)
    num_patches = tiny_model.config.num_patches
    assert tokens.keep_mask.shape == (4, num_patches) and tokens.keep_mask.dtype == torch.bool
    assert tokens.token_counts.tolist() == tokens.keep_mask.sum(1).tolist()
    assert tokens.code_ids.shape == (int(tokens.token_counts.sum()),)
    assert int(tokens.code_ids.max()) < tiny_model.config.codebook_size
    per_image = tokens.per_image()
    assert [len(ids) for ids in per_image] == tokens.token_counts.tolist()
    assert torch.equal(torch.cat(per_image), tokens.code_ids)

    features = tiny_model.encode_features(pixel_values)
    assert features.features.shape == (int(features.token_counts.sum()), tiny_model.config.vision_hidden_size)
    reconstructed = tiny_model.decode_codes(tokens.code_ids, tokens.token_counts)
    assert reconstructed.shape == (4, num_patches, tiny_model.config.vision_hidden_size)


def test_deterministic_mode_is_reproducible_and_sample_mode_is_seedable(tiny_model):
    pixel_values = photo_batch(tiny_model, 3)
    first, second = tiny_model.tokenize(pixel_values), tiny_model.tokenize(pixel_values)
    assert torch.equal(first.code_ids, second.code_ids) and torch.equal(first.keep_mask, second.keep_mask)
    assert torch.equal(first.keep_mask, (first.keep_probs > 0.5) | (first.token_counts[:, None] == 1)
                       & first.keep_mask)

    def sample(seed):
        return tiny_model.tokenize(pixel_values, mode="sample", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1).keep_mask, sample(1).keep_mask)
    assert not torch.equal(sample(1).keep_mask, sample(2).keep_mask)


def test_token_budgets_keep_the_most_probable_patches(tiny_model):
    pixel_values = photo_batch(tiny_model, 3)
    num_patches = tiny_model.config.num_patches
    budget = tiny_model.tokenize(pixel_values, max_tokens=5)
    assert budget.token_counts.tolist() == [5, 5, 5]
    for keep, probs in zip(budget.keep_mask, budget.keep_probs, strict=True):
        assert probs[keep].min() >= probs[~keep].max()
    ratio = tiny_model.tokenize(pixel_values, keep_ratio=0.25)
    assert ratio.token_counts.tolist() == [round(0.25 * num_patches)] * 3
    assert tiny_model.tokenize(pixel_values, max_tokens=10_000).token_counts.tolist() == [num_patches] * 3
    assert tiny_model.tokenize(pixel_values, keep_ratio=1e-6).token_counts.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="at most one"):
        tiny_model.tokenize(pixel_values, max_tokens=3, keep_ratio=0.5)


def test_selection_helpers_on_hand_made_probabilities():
    keep_probs = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.1, 0.3, 0.4]])
    assert top_k_keep_weights(keep_probs, 2).tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert top_k_keep_weights(keep_probs, 0).sum(1).tolist() == [1, 1]  # budgets are clipped to [1, N]
    assert top_k_keep_weights(keep_probs, 99).sum(1).tolist() == [4, 4]
    weights = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], requires_grad=True)
    forced = keep_at_least_one(weights, keep_probs)
    assert forced.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]  # only the empty image gets its most probable patch
    forced.sum().backward()
    assert torch.equal(weights.grad, torch.ones_like(weights))  # straight-through: the gradient passes unchanged
    fields = kept_token_fields(torch.stack([keep_probs, 1 - keep_probs], -1).log(), forced)
    assert fields["token_counts"].tolist() == [1, 1] and fields["keep_mask"].tolist() == forced.bool().tolist()
    torch.testing.assert_close(fields["keep_probs"], keep_probs)
    assert not any(tensor.requires_grad for tensor in fields.values())
    for arguments, message in (((None, 0, None), "max_tokens must be an integer >= 1"),
                               ((None, None, 1.5), r"\(0, 1\]"), (("random", None, None), "mode"),
                               ((None, 3, 0.5), "at most one")):
        with pytest.raises(ValueError, match=message):
            check_selection_arguments(*arguments)


def test_at_least_one_token_per_image(tiny_config):
    model = LaVITTokenizerModel(tiny_config).eval()
    with torch.no_grad():
        model.selector.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))  # p_keep ~ 0 everywhere
    tokens = model.tokenize(photo_batch(model, 2))
    assert tokens.token_counts.tolist() == [1, 1]
    assert torch.equal(tokens.keep_mask.float().argmax(1), tokens.keep_probs.argmax(1))


@pytest.mark.parametrize("attention", ["exact", "official"])
def test_batched_equals_one_image_at_a_time(attention):
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config(merger_attention=attention)).eval()
    pixel_values = photo_batch(model, 4)
    generator = torch.Generator().manual_seed(3)
    num_patches = model.config.num_patches
    keep_mask = torch.zeros(4, num_patches, dtype=torch.bool)
    for image, count in enumerate([3, 8, 13, num_patches]):  # the last image has no dropped token to merge
        keep_mask[image, torch.randperm(num_patches, generator=generator)[:count]] = True
    batched = model.encode_features(pixel_values, keep_mask=keep_mask)
    assert len(set(batched.token_counts.tolist())) == 4
    singles = [model.encode_features(pixel_values[i : i + 1], keep_mask=keep_mask[i : i + 1]).features
               for i in range(4)]
    torch.testing.assert_close(batched.features, torch.cat(singles), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched.features).all()
    tokens = model.tokenize(pixel_values, keep_mask=keep_mask)
    decoded = model.decode_codes(tokens.code_ids, tokens.token_counts)
    for i, ids in enumerate(tokens.per_image()):
        single = model.decode_codes(ids, tokens.token_counts[i : i + 1])
        torch.testing.assert_close(decoded[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_exact_merger_equals_a_plain_per_image_reference(tiny_model):
    """Exact mode = a standard causal transformer over kept tokens with cross-attention to dropped ones."""
    features = tiny_model.encode_patches(photo_batch(tiny_model, 1))[0]
    keep = torch.zeros(tiny_model.config.num_patches, dtype=torch.bool)
    keep[[1, 4, 5, 9, 15]] = True
    merger = tiny_model.merger
    hidden, context = features[keep], merger.context_norm(features)[~keep]

    def attention(module_q, keys, values, causal, num_heads=4):
        q = module_q.view(len(module_q), num_heads, -1).transpose(0, 1)
        k = keys.view(len(keys), num_heads, -1).transpose(0, 1)
        v = values.view(len(values), num_heads, -1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(module_q), -1)

    with torch.no_grad():
        for layer in merger.layers:
            q, k, v = layer.self_attn.qkv(layer.self_attn_norm(hidden)).chunk(3, -1)
            hidden = hidden + layer.self_attn.out_proj(attention(q, k, v, causal=True))
            normed = layer.cross_attn_norm(hidden)
            cross = attention(layer.cross_attn.q_proj(normed), layer.cross_attn.k_proj(context),
                              layer.cross_attn.v_proj(context), causal=False)
            hidden = hidden + layer.cross_attn.out_proj(cross)
            hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
        reference = merger.norm(hidden)
        ours = merger(features[None], keep[None].float())
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_training_forward_returns_each_loss_term(tiny_model):
    tiny_model.train()
    torch.manual_seed(0)
    output = tiny_model(photo_batch(tiny_model, 3))
    config = tiny_model.config
    expected = (output.reconstruction_loss + config.keep_ratio_weight * output.keep_ratio_loss
                + config.commitment_weight * output.commitment_loss)
    torch.testing.assert_close(output.loss, expected)
    assert 0 <= output.reconstruction_loss.item() <= 2
    assert output.reconstructed_features.shape == output.image_features.shape
    keep_ratio = output.keep_mask.float().mean(1)
    torch.testing.assert_close(output.keep_ratio_loss, ((config.keep_ratio_target - keep_ratio) ** 2).mean())
    assert 1 <= float(output.perplexity) <= config.codebook_size and 0 < float(output.codebook_usage) <= 1
    without_vq = tiny_model(photo_batch(tiny_model, 3), use_quantizer=False)
    assert float(without_vq.commitment_loss) == 0.0
    assert tiny_model(photo_batch(tiny_model, 1), return_loss=False).loss is None


@pytest.mark.parametrize("attention", ["exact", "official"])
def test_gradients_reach_selector_and_merger_but_not_the_encoder(attention):
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config(merger_attention=attention)).train()
    assert not model.vision_model.training, "the frozen encoder must stay in eval mode under model.train()"
    output = model(photo_batch(model, 2))
    output.reconstruction_loss.backward()  # the reconstruction term alone must reach the selector
    assert model.selector.fc1.weight.grad is not None and model.selector.fc1.weight.grad.abs().sum() > 0
    for name, parameter in model.merger.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model.decoder.in_proj.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None and not parameter.requires_grad
               for parameter in model.vision_model.parameters())


def test_kmeans_init_ema_and_dead_code_restart():
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config(codebook_size=16, dead_code_threshold=0.5)).train()
    quantizer = model.quantizer
    assert not bool(quantizer.initialized)
    latents = torch.randn(64, model.config.vision_hidden_size)
    samples = torch.nn.functional.normalize(quantizer.project_in(latents).detach(), dim=-1)
    quantizer(latents)
    assert bool(quantizer.initialized)
    # k-means centroids are unit vectors close to the data: every sample has a centroid within reach
    assert torch.allclose(quantizer.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    best_cosine = (samples @ quantizer.codebook.t()).max(dim=1).values
    random_codebook = torch.nn.functional.normalize(torch.randn(16, samples.shape[1]), dim=-1)
    assert best_cosine.mean() > (samples @ random_codebook.t()).max(dim=1).values.mean()

    before = quantizer.codebook.clone()
    quantizer(torch.randn(64, model.config.vision_hidden_size) + 1.0)  # a shifted batch pulls the codes
    assert not torch.allclose(before, quantizer.codebook), "EMA must move the codebook"

    # a code that no sample chooses decays below the threshold and is restarted on a batch vector
    with torch.no_grad():
        quantizer.codebook[3] = -torch.nn.functional.normalize(samples.mean(0), dim=0)
        quantizer.ema_cluster_size[3] = 0.0
        quantizer.ema_code_sum[3] = quantizer.codebook[3]
    quantizer(latents)
    restarted = quantizer.codebook[3]
    assert float(quantizer.ema_cluster_size[3]) >= 0.5
    assert (samples @ restarted).max() > 0.999, "a restarted code is a vector of the current batch"


def test_codebook_distances_stay_float32_under_autocast(tiny_model):
    latents = torch.randn(10, tiny_model.config.vision_hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code_ids, normalized = tiny_model.quantizer.lookup(tiny_model.quantizer.project_in(latents))
    assert normalized.dtype == torch.float32 and code_ids.dtype == torch.int64


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 32, 32), "shape"),
    (torch.zeros(2, 1, 56, 56), "shape"),
    (torch.zeros(2, 3, 56, 56, dtype=torch.uint8), "floating point"),
    (torch.full((1, 3, 56, 56), float("nan")), "NaN"),
    (torch.zeros(0, 3, 56, 56), "empty"),
    (np.zeros((1, 3, 56, 56), dtype=np.float32), "torch.Tensor"),
])
def test_bad_pixel_values_raise_clear_errors(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.tokenize(bad)


def test_bad_keep_masks_and_codes_raise_clear_errors(tiny_model):
    pixel_values = photo_batch(tiny_model, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
        tiny_model.tokenize(pixel_values, keep_mask=torch.ones(2, 15, dtype=torch.bool))
    empty = torch.zeros(2, 16, dtype=torch.bool)
    empty[0, 0] = True
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        tiny_model.tokenize(pixel_values, keep_mask=empty)
    with pytest.raises(ValueError, match="0 and 1"):
        tiny_model.tokenize(pixel_values, keep_mask=torch.full((2, 16), 0.5))
    with pytest.raises(ValueError, match="sum to 2 but there are 3"):
        tiny_model.decode_codes(torch.tensor([1, 2, 3]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tiny_model.decode_codes(torch.tensor([1, 99]), torch.tensor([2]))
    with pytest.raises(ValueError, match="mode"):
        tiny_model.tokenize(pixel_values, mode="random")


@pytest.mark.parametrize("attention, merger_class, attention_function", [
    ("exact", LaVITTokenMerger, sdpa_attention),
    ("official", LaVITOfficialTokenMerger, official_leaky_attention),
])
def test_merger_variant_is_picked_at_construction(attention, merger_class, attention_function):
    config = tiny_tokenizer_config(merger_attention=attention)
    model = LaVITTokenizerModel(config)
    assert type(model.merger) is merger_class and type(build_token_merger(config)) is merger_class
    for layer in model.merger.layers:
        assert layer.self_attn.attention_function is attention_function and layer.self_attn.is_causal
        assert layer.cross_attn.attention_function is attention_function
    # the feature decoder always attends exactly; both mergers load the same checkpoints
    assert all(layer.self_attn.attention_function is sdpa_attention for layer in model.decoder.layers)
    other = LaVITTokenizerModel(tiny_tokenizer_config(merger_attention="official" if attention == "exact" else "exact"))
    assert model.state_dict().keys() == other.state_dict().keys()


def test_encoder_read_out_is_fixed_at_construction(tiny_model):
    pixel_values = photo_batch(tiny_model, 2)
    with torch.no_grad():  # EVA: its last block, CLS dropped
        expected = tiny_model.vision_model(pixel_values).last_hidden_state[:, 1:]
    assert torch.equal(tiny_model.encode_patches(pixel_values), expected)
    vision_config = dict(model_type="clip_vision_model", image_size=56, patch_size=14, hidden_size=32,
                         num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    clip = LaVITTokenizerModel(tiny_tokenizer_config(vision_config=vision_config, vision_feature_layer=-2)).eval()
    with torch.no_grad():  # a transformers backbone: the configured hidden state, CLS dropped
        hidden_states = clip.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert torch.equal(clip.encode_patches(pixel_values), hidden_states[-2][:, 1:])
    assert not torch.equal(hidden_states[-2], hidden_states[-1])


def test_packed_outputs_share_their_common_fields_through_the_base(tiny_model):
    common = [field.name for field in dataclasses.fields(LaVITPackedTokensOutput)]
    assert common == ["token_counts", "keep_mask", "keep_probs"]
    for output_class, own in ((LaVITTokenizationOutput, "code_ids"), (LaVITFeaturesOutput, "features")):
        assert [field.name for field in dataclasses.fields(output_class)] == [*common, own]
    pixel_values = photo_batch(tiny_model, 2)
    tokens, features = tiny_model.tokenize(pixel_values), tiny_model.encode_features(pixel_values)
    for name in common:
        assert torch.equal(getattr(tokens, name), getattr(features, name)), name
    assert [len(rows) for rows in features.per_image()] == tokens.token_counts.tolist()


@pytest.mark.parametrize("backbone", ["clip_vision_model", "siglip_vision_model"])
def test_transformers_vision_backbones(backbone):
    vision_config = dict(model_type=backbone, image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)
    model = LaVITTokenizerModel(tiny_tokenizer_config(vision_config=vision_config, vision_feature_layer=-2)).train()
    assert not model.vision_model.training
    features = model.encode_patches(photo_batch(model, 2))
    assert features.shape == (2, 16, 32)
    output = model(photo_batch(model, 2))
    output.loss.backward()
    assert all(parameter.grad is None for parameter in model.vision_model.parameters())
    assert model.eval().tokenize(photo_batch(model, 2)).code_ids.numel() > 0


@pytest.mark.parametrize("attention", ["exact", "official"])
def test_gradient_checkpointing_gives_the_same_gradients(attention):
    # decay 1 and no restarts: the codebook stays put between the two runs
    config = tiny_tokenizer_config(merger_attention=attention, kmeans_init=False, codebook_decay=1.0,
                                   dead_code_threshold=0.0)
    torch.manual_seed(0)
    model = LaVITTokenizerModel(config).train()
    pixel_values = photo_batch(model, 2)

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)  # same Gumbel draw
        loss = model(pixel_values).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.merger.layers[0].gradient_checkpointing
    checkpointed_loss, checkpointed = gradients()
    torch.testing.assert_close(plain_loss, checkpointed_loss)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name, gradient in plain.items():
        torch.testing.assert_close(gradient, checkpointed[name], atol=1e-5, rtol=1e-4, msg=name)


def test_image_selection_is_one_typed_object_at_every_entry_point(lavit_model, lavit_processor):
    """`LaVITImageSelection`, a dict of its fields and its fields as keyword arguments select the same tokens through
    the tokenizer, the LaVIT model and the processor; unknown names raise naming the fields."""
    from dataclasses import fields

    from conftest import real_photos

    from lavit import LaVITImageSelection

    tokenizer = lavit_model.visual_tokenizer
    pixel_values = lavit_processor.image_processor(real_photos()[:2], return_tensors="pt")["pixel_values"]
    selection = LaVITImageSelection(max_tokens=3)
    expected = tokenizer.tokenize(pixel_values, max_tokens=3).code_ids
    for value in (selection, {"max_tokens": 3}):
        assert torch.equal(tokenizer.tokenize(pixel_values, selection=value).code_ids, expected)
    features = lavit_model.model.get_image_features(pixel_values, image_selection=selection)
    assert features.token_counts.tolist() == [3, 3]
    assert LaVITImageSelection.from_value({"mode": "sample"}, max_tokens=2) == LaVITImageSelection("sample", 2)
    names = [field.name for field in fields(LaVITImageSelection)]
    assert names == ["mode", "max_tokens", "keep_ratio", "generator"]
    with pytest.raises(ValueError, match=r"image selection does not take 'budget'; its settings are "):
        tokenizer.tokenize(pixel_values, budget=3)
    with pytest.raises(ValueError, match="at most one"):
        LaVITImageSelection(max_tokens=3, keep_ratio=0.5)
    lavit_processor.set_visual_tokenizer(lavit_model, selection)
    typed = lavit_processor(text="<image>a cat", images=real_photos()[0])["input_ids"]
    lavit_processor.set_visual_tokenizer(lavit_model, max_tokens=3)
    assert torch.equal(lavit_processor(text="<image>a cat", images=real_photos()[0])["input_ids"], typed)


@pytest.mark.parametrize("value", ["sample", 4, [4], ("mode", "sample")])
def test_an_image_selection_of_another_type_is_named(value):
    from lavit import LaVITImageSelection

    with pytest.raises(ValueError, match="image selection must be"):
        LaVITImageSelection.from_value(value)


@pytest.mark.parametrize("settings", [{"mode": ""}, {"mode": "Sample"}, {"generator": 5}, {"generator": "seed"}])
def test_an_image_selection_value_out_of_its_range_is_refused(settings):
    from lavit import LaVITImageSelection

    with pytest.raises(ValueError):
        LaVITImageSelection(**settings)
