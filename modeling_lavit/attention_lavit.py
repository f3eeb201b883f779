"""Attention blocks of LaVIT's token merger and feature decoder (official `Block` of `modeling_visual_tokenzier.py`
and `modeling_decoder.py`): self-attention, cross-attention to a dense context, MLP, pre-norm residuals.

Two attention functions share one signature `(query, key, value, attention_mask=None, is_causal=False)` over
(B, H, S, head_dim) tensors; a module is given one when it is built, and each reads `attention_mask` one way:
- [`sdpa_attention`]: exact masked attention (PyTorch SDPA); `attention_mask` is a boolean "may attend" mask.
- [`official_leaky_attention`]: the official `softmax_with_policy`; `attention_mask` holds float visibility weights.

Packed variable-length tokens (T, D) go through linear layers as they are; [`PaddedLayout`] pads them per image
only for the attention kernels.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_layers import GradientCheckpointingLayer

# eps of the official `softmax_with_policy`
OFFICIAL_SOFTMAX_EPS = 1e-6
VARIABLE_LENGTH_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

AttentionFunction = Callable[..., torch.Tensor]


def sdpa_attention(query, key, value, attention_mask=None, is_causal=False) -> torch.Tensor:
    """
    Exact scaled dot-product attention over (B, H, S, head_dim) tensors; returns (B, H, S_query, head_dim).

    `attention_mask` is a boolean "may attend" mask broadcastable to (B, H, S_query, S_key); a query row without any
    visible key gets a zero output (nothing to attend to). `is_causal` applies only without a mask: giving both
    raises `ValueError`.
    """
    if attention_mask is not None and is_causal:
        raise ValueError("sdpa_attention takes either attention_mask or is_causal=True, not both")
    # token counts change with every batch: cuDNN attention builds a plan per shape, which made such workloads
    # erratic and up to 10x slower on H100; flash / memory-efficient kernels have no per-shape setup
    with sdpa_kernel(VARIABLE_LENGTH_SDPA_BACKENDS):
        if attention_mask is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
        has_keys = attention_mask.any(dim=-1, keepdim=True)
        attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask | ~has_keys)
    return attn_output * has_keys


def official_masked_softmax(scores: torch.Tensor, visibility: torch.Tensor, eps: float) -> torch.Tensor:
    """
    The official `softmax_with_policy`: not an exact masked softmax. The row maximum is taken over all keys, visible
    or not, and every key (invisible ones too) receives `eps / N`, so rows whose visible keys score far below the
    best invisible one drift towards uniform weights. Runs in float32 as the official code.
    """
    num_keys = scores.shape[-1]
    scores = scores.float()
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp() * visibility.float()
    return (weights + eps / num_keys) / (weights.sum(dim=-1, keepdim=True) + eps)


def official_leaky_attention(query, key, value, attention_mask=None, is_causal=False) -> torch.Tensor:
    """
    The official merger's attention (leaky masked softmax, [`official_masked_softmax`]) over (B, H, S, head_dim)
    tensors; returns (B, H, S_query, head_dim).

    `attention_mask` holds float visibility weights in [0, 1] broadcastable to (B, H, S_query, S_key) (`None`: every
    key visible); `is_causal` additionally hides the keys after each query, as the official causal attention does.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    visibility = scores.new_ones(()) if attention_mask is None else attention_mask
    if is_causal:
        visibility = visibility * torch.ones(scores.shape[-2:], device=scores.device).tril()
    weights = official_masked_softmax(scores, visibility, OFFICIAL_SOFTMAX_EPS)
    return torch.matmul(weights.to(value.dtype), value)


def split_heads(hidden_states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H * hd) -> (B, H, S, hd)."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    return hidden_states.view(batch_size, seq_len, num_heads, hidden_size // num_heads).transpose(1, 2)


def merge_heads(hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, H, S, hd) -> (B, S, H * hd)."""
    return hidden_states.transpose(1, 2).flatten(2)


class PaddedLayout:
    """
    Where packed variable-length tokens (T, D) sit in a right-padded batch (B, L, D). Linear layers and MLPs run on
    the packed tokens (no work on padding); only attention kernels see the padded form.
    """

    def __init__(self, lengths: torch.Tensor, max_length: int):
        self.valid = torch.arange(max_length, device=lengths.device) < lengths[:, None]  # (B, L)
        valid = self.valid.flatten()
        self.flat_index = valid.nonzero().squeeze(1)  # (T,) slot of each packed token
        # packed row shown in each slot; padding slots repeat row 0: attention masks them (keys) or their output is
        # dropped (queries), so a row gather is enough and no zero-filled scatter is needed
        self.source_index = (torch.cumsum(valid, dim=0) - 1).clamp(min=0) * valid

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, 1, 1, L) "may attend" mask for attention whose keys are these padded tokens."""
        return self.valid[:, None, None, :]

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed (T, D) -> padded (B, L, D); padding slots hold arbitrary rows."""
        if packed.shape[0] == 0:
            return packed.new_zeros(*self.valid.shape, packed.shape[-1])
        return packed.index_select(0, self.source_index).view(*self.valid.shape, packed.shape[-1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Padded (B, L, D) -> packed (T, D)."""
        return padded.flatten(0, 1).index_select(0, self.flat_index)


class LaVITSelfAttention(nn.Module):
    """Self-attention with a fused qkv projection (official `token_causal_attn` and decoder `self_attn`)."""

    def __init__(self, hidden_size: int, num_heads: int, is_causal: bool,
                 attention_function: AttentionFunction = sdpa_attention):
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.attention_function = attention_function
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, attention_mask=None, layout: PaddedLayout | None = None) -> torch.Tensor:
        """Dense (B, S, D), or packed (T, D) with its `layout` -> the same shape."""
        qkv = self.qkv(hidden_states)
        if layout is not None:
            qkv = layout.pad(qkv)  # packed (T, 3D) -> (B, L, 3D)
            # causal attention never reaches the right padding; otherwise padding slots must be hidden as keys
            if attention_mask is None and not self.is_causal:
                attention_mask = layout.key_mask
        query, key, value = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        attn_output = merge_heads(self.attention_function(query, key, value, attention_mask, self.is_causal))
        if layout is not None:
            attn_output = layout.unpad(attn_output)
        return self.out_proj(attn_output)


class LaVITCrossAttention(nn.Module):
    """Cross-attention with separate projections (official `token_cross_attn` and decoder `cross_attn`)."""

    def __init__(self, hidden_size: int, num_heads: int, attention_function: AttentionFunction = sdpa_attention):
        super().__init__()
        self.num_heads = num_heads
        self.attention_function = attention_function
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, context, attention_mask=None, layout: PaddedLayout | None = None):
        """Queries dense (B, S, D) or packed (T, D) with their `layout`; `context` always dense (B, L_context, D)."""
        query, key, value = self.q_proj(hidden_states), self.k_proj(context), self.v_proj(context)
        if layout is not None:
            query = layout.pad(query)
        query, key, value = (split_heads(t, self.num_heads) for t in (query, key, value))
        attn_output = merge_heads(self.attention_function(query, key, value, attention_mask))
        if layout is not None:
            attn_output = layout.unpad(attn_output)
        return self.out_proj(attn_output)


class LaVITMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class LaVITAttentionLayer(GradientCheckpointingLayer):
    """
    Pre-norm block shared by the merger and the decoder: self-attention, cross-attention to a dense context
    (B, L, D), MLP. `hidden_states` are dense (B, S, D), or packed (T, D) with their `PaddedLayout`. Both attentions
    use `attention_function`, so the masks mean what that function documents.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, eps, is_causal,
                 attention_function: AttentionFunction = sdpa_attention):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = LaVITSelfAttention(hidden_size, num_heads, is_causal, attention_function)
        self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.cross_attn = LaVITCrossAttention(hidden_size, num_heads, attention_function)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = LaVITMLP(hidden_size, intermediate_size)

    def forward(self, hidden_states, context, self_attn_mask=None, cross_attn_mask=None, layout=None):
        hidden_states = hidden_states + self.self_attn(self.self_attn_norm(hidden_states), self_attn_mask, layout)
        hidden_states = hidden_states + self.cross_attn(
            self.cross_attn_norm(hidden_states), context, cross_attn_mask, layout
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


__all__ = [
    "LaVITAttentionLayer",
    "LaVITCrossAttention",
    "LaVITMLP",
    "LaVITSelfAttention",
    "PaddedLayout",
    "official_leaky_attention",
    "sdpa_attention",
]
