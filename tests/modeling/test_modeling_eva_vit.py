"""modeling_eva_vit.py: the EVA-CLIP vision transformer on real photos, against the EVA arithmetic written out here
(CLS + patches with learned positions, pre-norm blocks, a fused qkv with q and v biases but no key bias, exact GELU,
no final norm), its refusal of a wrong input shape, and its weight init."""

import pytest
import torch
import torch.nn.functional as F
from conftest import real_photos, tiny_tokenizer_config
from lavit.modeling.modeling_eva_vit import LaVITEvaPreTrainedModel, LaVITEvaVisionModel

from lavit import LaVITEvaVisionConfig, LaVITImageProcessor


@pytest.fixture(scope="module")
def eva():
    torch.manual_seed(0)
    model = LaVITEvaVisionModel(tiny_tokenizer_config().vision_config).eval()
    with torch.no_grad():  # the init leaves the biases at zero; non-zero ones show where each one is added
        for layer in model.layers:
            layer.attn.q_bias.normal_()
            layer.attn.v_bias.normal_()
    return model


@pytest.fixture(scope="module")
def pixel_values(eva):
    size = eva.config.image_size
    processor = LaVITImageProcessor(size={"height": size, "width": size})
    return processor(images=real_photos()[:2], return_tensors="pt")["pixel_values"]


def reference_forward(model, pixel_values):
    """The official EVA block arithmetic, written out with plain tensor operations."""
    config = model.config
    embeddings = model.embeddings
    patches = F.conv2d(pixel_values, embeddings.patch_embedding.weight, embeddings.patch_embedding.bias,
                       stride=config.patch_size).flatten(2).transpose(1, 2)
    cls = embeddings.cls_token.expand(len(pixel_values), -1, -1)
    hidden = torch.cat([cls, patches], 1) + embeddings.position_embedding
    heads = config.num_attention_heads
    for layer in model.layers:
        attn = layer.attn
        normed = F.layer_norm(hidden, (config.hidden_size,), layer.layer_norm1.weight, layer.layer_norm1.bias,
                              config.layer_norm_eps)
        query, key, value = (normed @ attn.qkv.weight.T).chunk(3, -1)
        query, value = query + attn.q_bias, value + attn.v_bias  # no key bias

        def split(x):
            return x.view(*x.shape[:2], heads, -1).transpose(1, 2)

        scores = split(query) @ split(key).transpose(-1, -2) / (config.hidden_size // heads) ** 0.5
        attended = (scores.softmax(-1) @ split(value)).transpose(1, 2).flatten(2)
        hidden = hidden + attn.proj(attended)
        normed = F.layer_norm(hidden, (config.hidden_size,), layer.layer_norm2.weight, layer.layer_norm2.bias,
                              config.layer_norm_eps)
        hidden = hidden + layer.mlp.fc2(F.gelu(layer.mlp.fc1(normed), approximate="none"))
    return hidden


def test_the_output_is_the_eva_arithmetic_of_the_last_block_without_a_final_norm(eva, pixel_values):
    with torch.no_grad():
        output = eva(pixel_values).last_hidden_state
        expected = reference_forward(eva, pixel_values)
    config = eva.config
    assert output.shape == (2, (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(module, torch.nn.LayerNorm) and name.count(".") == 0
                   for name, module in eva.named_modules())


def test_hidden_states_are_the_embeddings_then_every_block(eva, pixel_values):
    with torch.no_grad():
        output = eva(pixel_values, output_hidden_states=True)
        embeddings = eva.embeddings(pixel_values)
    assert len(output.hidden_states) == eva.config.num_hidden_layers + 1
    torch.testing.assert_close(output.hidden_states[0], embeddings)
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state)
    assert eva(pixel_values).hidden_states is None


def test_the_cls_token_comes_first_and_images_do_not_mix(eva, pixel_values):
    with torch.no_grad():
        embeddings = eva.embeddings(pixel_values)
        together = eva(pixel_values).last_hidden_state
        alone = torch.cat([eva(image[None]).last_hidden_state for image in pixel_values])
    cls_row = (eva.embeddings.cls_token + eva.embeddings.position_embedding[:, :1])[0, 0]
    assert torch.allclose(embeddings[0, 0], cls_row) and torch.allclose(embeddings[1, 0], cls_row)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 56, 56), (1, 3, 42, 42), (1, 1, 56, 56), (1, 3, 56, 70)])
def test_a_wrong_input_shape_is_refused_naming_the_expected_one(eva, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 56, 56\), got " +
                       str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        eva(torch.zeros(shape))


def test_init_draws_positions_and_cls_and_zeroes_the_biases():
    torch.manual_seed(0)
    config = LaVITEvaVisionConfig(image_size=28, patch_size=14, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=32, initializer_range=0.05)
    model = LaVITEvaVisionModel(config)
    assert isinstance(model, LaVITEvaPreTrainedModel)
    positions = model.embeddings.position_embedding
    assert positions.shape == (1, 5, 64)
    assert 0.035 < positions.std().item() < 0.065  # drawn with std initializer_range
    assert 0.02 < model.embeddings.cls_token.std().item() < 0.08
    assert torch.count_nonzero(model.layers[0].attn.q_bias) == 0
    assert torch.count_nonzero(model.layers[0].attn.v_bias) == 0


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    torch.manual_seed(0)
    model = LaVITEvaVisionModel(tiny_tokenizer_config().vision_config).train()
    model(pixel_values).last_hidden_state.square().mean().backward()
    plain = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.layers[0].gradient_checkpointing
    model(pixel_values).last_hidden_state.square().mean().backward()
    for expected, parameter in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected)
