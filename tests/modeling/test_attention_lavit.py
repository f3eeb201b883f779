"""The attention functions and blocks of attention_lavit.py, against plain softmax attention written out."""

import pytest
import torch
from lavit.modeling.attention_lavit import (
    OFFICIAL_SOFTMAX_EPS,
    LaVITAttentionLayer,
    PaddedLayout,
    official_leaky_attention,
    sdpa_attention,
)


def qkv(batch=2, heads=2, queries=5, keys=5, head_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_dim, generator=generator) for length in (queries, keys, keys)]


def softmax_attention(query, key, value, visible):
    scores = (query @ key.transpose(-1, -2)) / query.shape[-1] ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ value


def test_sdpa_attention_masks_keys_and_zeroes_rows_without_keys():
    query, key, value = qkv()
    visible = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.6
    visible[..., 0] = True
    torch.testing.assert_close(sdpa_attention(query, key, value, visible),
                               softmax_attention(query, key, value, visible))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(sdpa_attention(query, key, value, is_causal=True),
                               softmax_attention(query, key, value, causal))
    visible[1, :, 2] = False  # image 1, query 2 sees no key: nothing to attend to
    output = sdpa_attention(query, key, value, visible)
    assert torch.equal(output[1, :, 2], torch.zeros_like(output[1, :, 2]))
    with pytest.raises(ValueError, match="not both"):
        sdpa_attention(query, key, value, visible, is_causal=True)


def test_official_leaky_attention_is_the_official_policy_softmax():
    query, key, value = qkv()
    visibility = (torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    scores = (query @ key.transpose(-1, -2)) / 2.0  # head_dim 4
    # softmax_with_policy written out: max over all keys, eps / N leaks to every key, invisible ones included
    weights = (scores - scores.amax(-1, keepdim=True)).exp() * visibility
    expected = ((weights + OFFICIAL_SOFTMAX_EPS / 5) / (weights.sum(-1, keepdim=True) + OFFICIAL_SOFTMAX_EPS)) @ value
    torch.testing.assert_close(official_leaky_attention(query, key, value, visibility), expected)
    # is_causal hides later keys as a lower-triangular visibility does
    causal = torch.ones(5, 5).tril()
    torch.testing.assert_close(official_leaky_attention(query, key, value, visibility, is_causal=True),
                               official_leaky_attention(query, key, value, visibility * causal))
    # all keys visible: (almost) the exact softmax; a row whose keys are all invisible leaks towards uniform weights
    torch.testing.assert_close(official_leaky_attention(query, key, value), softmax_attention(
        query, key, value, torch.ones(5, 5, dtype=torch.bool)), atol=1e-5, rtol=1e-5)
    hidden = torch.zeros(2, 1, 5, 5)
    torch.testing.assert_close(official_leaky_attention(query, key, value, hidden),
                               value.mean(dim=-2, keepdim=True).expand(-1, -1, 5, -1))


def test_padded_layout_round_trip_and_key_mask():
    lengths = torch.tensor([2, 0, 3])
    layout = PaddedLayout(lengths, 3)
    packed = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)
    padded = layout.pad(packed)
    assert padded.shape == (3, 3, 2)
    assert torch.equal(padded[0, :2], packed[:2]) and torch.equal(padded[2], packed[2:])
    assert torch.equal(layout.unpad(padded), packed)
    assert layout.key_mask.shape == (3, 1, 1, 3)
    assert layout.key_mask[:, 0, 0].tolist() == [[True, True, False], [False, False, False], [True, True, True]]


@pytest.mark.parametrize("is_causal", [True, False])
def test_layer_on_packed_tokens_equals_the_layer_on_each_image(is_causal):
    torch.manual_seed(0)
    layer = LaVITAttentionLayer(16, 4, 32, 1e-5, is_causal=is_causal).eval()
    lengths = torch.tensor([3, 5])
    layout = PaddedLayout(lengths, 5)
    hidden_states, context = torch.randn(8, 16), torch.randn(2, 4, 16)
    context_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])[:, None, None, :]
    with torch.no_grad():
        packed = layer(hidden_states, context, None, context_mask, layout)
        singles = [layer(rows[None], context[i : i + 1, : int(context_mask[i].sum())])[0]
                   for i, rows in enumerate(hidden_states.split(lengths.tolist()))]
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=1e-5)
