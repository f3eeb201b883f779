"""LaVIT's dynamic visual tokenizer (paper section 3.1).

image -> frozen encoder -> patch features (B, N, D) -> token selector -> keep_mask (B, N)
      -> token merger -> kept features (T, D), T = sum(token_counts) -> vector quantizer -> code_ids (T,)
code_ids -> feature decoder -> reconstructed encoder features (B, N, D)

Variable-length tokens are stored packed: values of all images concatenated in batch order (raster order inside an
image) plus `token_counts` (B,). Kernels may pad internally; nothing is padded in what this module returns.
"""

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_lavit import LaVITTokenizerConfig
from .convert_original_lavit import convert_original_tokenizer_state_dict, original_tokenizer_config
from .modeling_eva_vit import LaVITEvaVisionModel

logger = logging.get_logger(__name__)

# eps of the official `softmax_with_policy`
OFFICIAL_SOFTMAX_EPS = 1e-6
VARIABLE_LENGTH_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class LaVITPackedTokensOutput(ModelOutput):
    """Base of the packed outputs: `values` of all images concatenated, split per image by `token_counts`."""

    def per_image(self) -> list[torch.Tensor]:
        """The packed values as one tensor per image."""
        return list(torch.split(self.packed_values(), self.token_counts.tolist()))

    def packed_values(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LaVITTokenizationOutput(LaVITPackedTokensOutput):
    """
    Discrete visual tokens of a batch of images.

    Args:
        code_ids (`torch.LongTensor` of shape `(T,)`): codebook indices of all kept tokens (no LM offset).
        token_counts (`torch.LongTensor` of shape `(B,)`): tokens per image; `T = token_counts.sum()`.
        keep_mask (`torch.BoolTensor` of shape `(B, N)`): which patches were kept (raster order).
        keep_probs (`torch.FloatTensor` of shape `(B, N)`): the selector's keep probability per patch.
    """

    code_ids: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    keep_probs: torch.FloatTensor | None = None

    def packed_values(self) -> torch.Tensor:
        return self.code_ids


@dataclass
class LaVITFeaturesOutput(LaVITPackedTokensOutput):
    """
    Continuous merger outputs of the kept tokens (the LM-side input of LaVIT), packed like [`LaVITTokenizationOutput`].

    Args:
        features (`torch.FloatTensor` of shape `(T, D)`): merged features of all kept tokens.
        token_counts (`torch.LongTensor` of shape `(B,)`), keep_mask (`torch.BoolTensor` of shape `(B, N)`),
        keep_probs (`torch.FloatTensor` of shape `(B, N)`): as in [`LaVITTokenizationOutput`].
    """

    features: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    keep_probs: torch.FloatTensor | None = None

    def packed_values(self) -> torch.Tensor:
        return self.features


@dataclass
class LaVITQuantizerOutput(ModelOutput):
    """
    Args:
        quantized (`torch.FloatTensor` of shape `(T, code_dim)`): codebook rows (straight-through in training).
        code_ids (`torch.LongTensor` of shape `(T,)`): nearest codebook row of each token.
        commitment_loss (`torch.FloatTensor` of shape `()`): mean squared distance of the inputs to their codes.
        perplexity (`torch.FloatTensor` of shape `()`): exp of the entropy of the code distribution in the batch.
        codebook_usage (`torch.FloatTensor` of shape `()`): fraction of the codebook used in the batch.
    """

    quantized: torch.FloatTensor | None = None
    code_ids: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None


@dataclass
class LaVITTokenizerOutput(ModelOutput):
    """
    Output of [`LaVITTokenizerModel.forward`]: the tokenizer training objective (paper eq. 4) and what produced it.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `reconstruction_loss + keep_ratio_weight * keep_ratio_loss +
            commitment_weight * commitment_loss` (`None` when `return_loss=False`).
        reconstruction_loss (`torch.FloatTensor`): mean over images and patches of `1 - cos(x, x_rec)`.
        keep_ratio_loss (`torch.FloatTensor`): mean over images of `(rho - mean keep)^2`, before the lambda weight.
        commitment_loss (`torch.FloatTensor`): quantizer commitment loss, before its weight (0 without quantizer).
        reconstructed_features (`torch.FloatTensor` of shape `(B, N, D)`): decoder output.
        image_features (`torch.FloatTensor` of shape `(B, N, D)`): frozen encoder features (the target).
        code_ids, token_counts, keep_mask, keep_probs: the tokens, as in [`LaVITTokenizationOutput`].
        mean_keep_ratio (`torch.FloatTensor`): fraction of patches kept in the batch.
        reconstruction_cosine (`torch.FloatTensor`): mean cosine similarity of reconstruction and target.
        perplexity, codebook_usage (`torch.FloatTensor`): codebook statistics of the batch.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    keep_ratio_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    reconstructed_features: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    code_ids: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    keep_probs: torch.FloatTensor | None = None
    mean_keep_ratio: torch.FloatTensor | None = None
    reconstruction_cosine: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None


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


def attend(query, key, value, mask=None, is_causal=False, leaky_softmax=False) -> torch.Tensor:
    """
    Scaled dot-product attention over (B, H, S, head_dim) tensors.

    `mask` is a boolean "may attend" mask for SDPA, or, with `leaky_softmax=True`, the float visibility weights of
    [`official_masked_softmax`]. A query row without any visible key gets a zero output (nothing to attend to).
    """
    if leaky_softmax:
        scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        weights = official_masked_softmax(scores, mask, OFFICIAL_SOFTMAX_EPS)
        return torch.matmul(weights.to(value.dtype), value)
    # token counts change with every batch: cuDNN attention builds a plan per shape, which made such workloads
    # erratic and up to 10x slower on H100; flash / memory-efficient kernels have no per-shape setup
    with sdpa_kernel(VARIABLE_LENGTH_SDPA_BACKENDS):
        if mask is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
        has_keys = mask.any(dim=-1, keepdim=True)
        attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask | ~has_keys)
    return attn_output * has_keys


def split_heads(hidden_states: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch_size, seq_len, hidden_size = hidden_states.shape
    return hidden_states.view(batch_size, seq_len, num_heads, hidden_size // num_heads).transpose(1, 2)


def merge_heads(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states.transpose(1, 2).flatten(2)  # (B, H, S, hd) -> (B, S, H * hd)


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
        if packed.shape[0] == 0:
            return packed.new_zeros(*self.valid.shape, packed.shape[-1])
        return packed.index_select(0, self.source_index).view(*self.valid.shape, packed.shape[-1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.flatten(0, 1).index_select(0, self.flat_index)


class LaVITSelfAttention(nn.Module):
    """Self-attention with a fused qkv projection (official `token_causal_attn` and decoder `self_attn`)."""

    def __init__(self, hidden_size: int, num_heads: int, is_causal: bool, leaky_softmax: bool):
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.leaky_softmax = leaky_softmax
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, attention_mask=None, layout: PaddedLayout | None = None) -> torch.Tensor:
        qkv = self.qkv(hidden_states)
        if layout is not None:
            qkv = layout.pad(qkv)  # packed (T, 3D) -> (B, L, 3D)
        query, key, value = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        attn_output = merge_heads(attend(query, key, value, attention_mask, self.is_causal, self.leaky_softmax))
        if layout is not None:
            attn_output = layout.unpad(attn_output)
        return self.out_proj(attn_output)


class LaVITCrossAttention(nn.Module):
    """Cross-attention with separate projections (official `token_cross_attn` and decoder `cross_attn`)."""

    def __init__(self, hidden_size: int, num_heads: int, leaky_softmax: bool):
        super().__init__()
        self.num_heads = num_heads
        self.leaky_softmax = leaky_softmax
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, context, attention_mask=None, layout: PaddedLayout | None = None):
        query, key, value = self.q_proj(hidden_states), self.k_proj(context), self.v_proj(context)
        if layout is not None:
            query = layout.pad(query)  # the context is always dense (B, L_context, D)
        query, key, value = (split_heads(t, self.num_heads) for t in (query, key, value))
        attn_output = merge_heads(attend(query, key, value, attention_mask, leaky_softmax=self.leaky_softmax))
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
    (B, L, D), MLP. `hidden_states` are dense (B, S, D), or packed (T, D) with their `PaddedLayout`.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, eps, is_causal, leaky_softmax=False):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = LaVITSelfAttention(hidden_size, num_heads, is_causal, leaky_softmax)
        self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.cross_attn = LaVITCrossAttention(hidden_size, num_heads, leaky_softmax)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = LaVITMLP(hidden_size, intermediate_size)

    def forward(self, hidden_states, context, self_attn_mask=None, cross_attn_mask=None, layout=None):
        hidden_states = hidden_states + self.self_attn(self.self_attn_norm(hidden_states), self_attn_mask, layout)
        hidden_states = hidden_states + self.cross_attn(
            self.cross_attn_norm(hidden_states), context, cross_attn_mask, layout
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class LaVITTokenSelector(nn.Module):
    """
    Token selector (paper section 3.1, official `TokenPredictor`, state-dict prefix `token_predictor.`): an MLP that
    predicts per patch log-probabilities of (keep, drop). Half of the channels stay per token ("local"); the other
    half is averaged over all patches ("global") and broadcast back, as in DynamicViT.
    """

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__()
        hidden_size = config.vision_hidden_size
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.in_proj = nn.Linear(hidden_size, hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_size // 2)
        self.fc2 = nn.Linear(hidden_size // 2, hidden_size // 4)
        self.classifier = nn.Linear(hidden_size // 4, 2)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch features -> (B, N, 2) log-probabilities; index 0 is "keep"."""
        hidden_states = F.gelu(self.in_proj(self.layer_norm(image_features)))
        local_part, global_part = hidden_states.chunk(2, dim=-1)
        global_part = global_part.mean(dim=1, keepdim=True).expand_as(global_part)
        hidden_states = torch.cat([local_part, global_part], dim=-1)
        hidden_states = F.gelu(self.fc2(F.gelu(self.fc1(hidden_states))))
        return F.log_softmax(self.classifier(hidden_states), dim=-1)


class LaVITTokenMerger(nn.Module):
    """
    Token merger (paper section 3.1, official `TokenMerger`, state-dict prefix `causal_encoder.`). The residual
    stream starts from the raw encoder features of the kept tokens; each block applies causal self-attention among
    kept tokens (raster order), cross-attention from kept tokens to the normalised features of the dropped tokens,
    and an MLP; a final norm closes the stack. No positional embedding: order comes from the causal mask and the
    encoder's own position embeddings.

    `keep_weights` (B, N) are 0/1 values; in training they are straight-through Gumbel samples whose gradient reaches
    the selector through this module (kept tokens scale the stream, dropped tokens scale the merged context).
    """

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__()
        hidden_size = config.vision_hidden_size
        self.leaky_softmax = config.merger_attention == "official"
        self.context_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            LaVITAttentionLayer(
                hidden_size,
                config.merger_num_heads,
                config.merger_intermediate_size,
                config.layer_norm_eps,
                is_causal=True,
                leaky_softmax=self.leaky_softmax,
            )
            for _ in range(config.merger_num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features and (B, N) keep weights -> (T, D) merged kept tokens, packed in batch order."""
        keep_mask = keep_weights > 0.5
        if self.leaky_softmax:
            return self.forward_full_sequence(image_features, keep_weights)[keep_mask]
        return self.forward_kept_tokens(image_features, keep_weights, keep_mask)

    def forward_full_sequence(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """The official arithmetic: all N positions with the leaky masked softmax. Returns (B, N, D)."""
        num_patches = image_features.shape[1]
        keep = keep_weights.float()[:, None, None, :]  # (B, 1, 1, N) over keys
        eye = torch.eye(num_patches, device=keep.device)
        causal = torch.ones(num_patches, num_patches, device=keep.device).tril()
        self_attn_visibility = (keep + (1.0 - keep) * eye) * causal  # kept earlier tokens, and the token itself
        cross_attn_visibility = 1.0 - keep  # only dropped tokens
        context = self.context_norm(image_features)
        hidden_states = image_features
        for layer in self.layers:
            hidden_states = layer(hidden_states, context, self_attn_visibility, cross_attn_visibility)
        return self.norm(hidden_states)

    def forward_kept_tokens(self, image_features, keep_weights, keep_mask) -> torch.Tensor:
        """True masked attention on the kept tokens only. Tokens stay packed; attention pads them per image."""
        num_patches = image_features.shape[1]
        kept_counts = keep_mask.sum(dim=1)
        dropped_counts = num_patches - kept_counts
        max_kept, max_dropped = (int(n) for n in torch.stack([kept_counts.max(), dropped_counts.max()]).tolist())
        kept_layout = PaddedLayout(kept_counts, max_kept)
        # an image without dropped tokens gets an all-masked context row: its cross-attention output is zero
        dropped_layout = PaddedLayout(dropped_counts, max(max_dropped, 1))

        weights = keep_weights.to(image_features.dtype)[..., None]
        # boolean selection over (B, N) is batch order, then raster order: the packed order
        hidden_states = (image_features * weights)[keep_mask]  # (T, D)
        # the context is the same in every layer: pad it once
        context = dropped_layout.pad((self.context_norm(image_features) * (1 - weights))[~keep_mask])
        for layer in self.layers:
            hidden_states = layer(hidden_states, context, None, dropped_layout.key_mask, kept_layout)
        return self.norm(hidden_states)


class LaVITVectorQuantizer(nn.Module):
    """
    Vector quantizer (paper eq. 3, official `quantize.` + `encode_task_layer.`): a projection to the code dimension,
    l2 normalisation and nearest-neighbour lookup in an l2-normalised codebook (distances in float32, also under
    autocast). Training uses a straight-through estimator, a commitment loss and EMA codebook updates, with
    spherical k-means initialisation on the first batch and restarts of dead codes (as vector-quantize-pytorch).
    The codebook and its statistics are buffers: no optimizer touches them, and ZeRO-3 does not partition them.
    """

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__()
        hidden_size = config.vision_hidden_size
        self.codebook_size = config.codebook_size
        self.decay = config.codebook_decay
        self.kmeans_init = config.kmeans_init
        self.kmeans_iters = config.kmeans_iters
        self.dead_code_threshold = config.dead_code_threshold
        self.project_in = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, config.code_dim)
        )
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.code_dim))
        self.register_buffer("ema_cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("ema_code_sum", torch.zeros(config.codebook_size, config.code_dim))
        self.register_buffer("initialized", torch.tensor(False))

    def lookup(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, code_dim) projected features -> (code ids (T,), l2-normalised float32 latents (T, code_dim))."""
        with torch.autocast(device_type=latents.device.type, enabled=False):
            normalized = F.normalize(latents.float(), dim=-1)
            codebook = self.codebook.float()
            distances = (
                normalized.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2 * normalized @ codebook.t()
            )
            return distances.argmin(dim=-1), normalized

    def forward(self, merged_tokens: torch.Tensor, quantize: bool = True, fit: bool = True) -> LaVITQuantizerOutput:
        """`fit=False` only looks codes up (tokenization), even in training mode: the codebook stays as it is."""
        latents = self.project_in(merged_tokens)
        # the codebook is fitted only while quantizing: k-means then runs on the warmed-up latents of the first
        # quantized step (the official recipe: train without VQ first, then switch it on)
        fits_codebook = self.training and quantize and fit
        if fits_codebook and self.kmeans_init and not bool(self.initialized):
            self.init_codebook_(F.normalize(latents.detach().float(), dim=-1))
        code_ids, normalized = self.lookup(latents)
        codes = self.codebook[code_ids]
        commitment_loss = F.mse_loss(normalized, codes)
        if fits_codebook:
            self.update_codebook_(normalized.detach(), code_ids)
        if not quantize:
            quantized = normalized  # stage-1 warm-up: the decoder reads the continuous latents
        elif self.training:
            quantized = normalized + (codes - normalized).detach()  # straight-through estimator
        else:
            quantized = codes
        usage = torch.bincount(code_ids, minlength=self.codebook_size).float()
        probs = usage / usage.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        codebook_usage = (usage > 0).float().mean()
        return LaVITQuantizerOutput(quantized, code_ids, commitment_loss, perplexity, codebook_usage)

    @torch.no_grad()
    def init_codebook_(self, samples: torch.Tensor):
        """Spherical k-means on the first training batch (computed on rank 0, shared with every rank)."""
        centroids = spherical_kmeans(samples, self.codebook_size, self.kmeans_iters)
        _broadcast_from_rank0(centroids)
        self.codebook.copy_(centroids)
        self.ema_code_sum.copy_(centroids)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_codebook_(self, samples: torch.Tensor, code_ids: torch.Tensor):
        """EMA of the per-code sums (the codebook is their direction) and counts, then dead-code restarts."""
        counts = torch.bincount(code_ids, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_code_sum).index_add_(0, code_ids, samples.to(self.ema_code_sum.dtype))
        _all_reduce_sum(counts, sums)
        self.ema_cluster_size.lerp_(counts.to(self.ema_cluster_size.dtype), 1 - self.decay)
        self.ema_code_sum.lerp_(sums, 1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_code_sum, dim=-1))
        dead_codes = self.ema_cluster_size < self.dead_code_threshold
        num_dead = int(dead_codes.sum())
        if num_dead:
            replacements = samples[torch.randint(samples.shape[0], (num_dead,), device=samples.device)]
            _broadcast_from_rank0(replacements)
            self.codebook[dead_codes] = replacements.to(self.codebook.dtype)
            self.ema_code_sum[dead_codes] = replacements.to(self.ema_code_sum.dtype)
            self.ema_cluster_size[dead_codes] = self.dead_code_threshold


def spherical_kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int) -> torch.Tensor:
    """k-means with cosine similarity on unit vectors; sampled with replacement when there are fewer samples."""
    num_samples = samples.shape[0]
    if num_samples >= num_clusters:
        start = torch.randperm(num_samples, device=samples.device)[:num_clusters]
    else:
        start = torch.randint(num_samples, (num_clusters,), device=samples.device)
    centroids = samples[start].clone()
    for _ in range(num_iters):
        assignment = (samples @ centroids.t()).argmax(dim=-1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, samples)
        counts = torch.bincount(assignment, minlength=num_clusters)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
    return centroids


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(*tensors: torch.Tensor):
    # every rank must apply the same codebook update, or data parallel replicas drift apart
    if _distributed():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def _broadcast_from_rank0(tensor: torch.Tensor):
    if _distributed():
        torch.distributed.broadcast(tensor, src=0)


class LaVITFeatureDecoder(nn.Module):
    """
    Feature decoder (official `VQDecoder` trunk, checkpoint `tokenizer_decoder.bin`): N learned queries attend to
    themselves and to the quantized codes of one image (plus a position embedding of the index in the kept sequence),
    and reconstruct all N encoder features, whatever the number of codes.
    """

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__()
        hidden_size = config.decoder_hidden_size
        self.in_proj = nn.Linear(config.code_dim, hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches, hidden_size))
        self.query_embedding = nn.Parameter(torch.zeros(1, config.num_patches, hidden_size))
        self.layers = nn.ModuleList(
            LaVITAttentionLayer(
                hidden_size,
                config.decoder_num_heads,
                config.decoder_intermediate_size,
                config.layer_norm_eps,
                is_causal=False,
            )
            for _ in range(config.decoder_num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.project_out = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, config.vision_hidden_size)
        )

    def forward(self, quantized: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        """(T, code_dim) packed code vectors + (B,) counts -> (B, N, D) reconstructed encoder features."""
        batch_size = token_counts.shape[0]
        image_index = torch.repeat_interleave(torch.arange(batch_size, device=quantized.device), token_counts)
        offsets = torch.cumsum(token_counts, dim=0) - token_counts
        positions = torch.arange(quantized.shape[0], device=quantized.device) - offsets[image_index]
        codes = self.in_proj(quantized) + self.position_embedding[0, positions]  # (T, D), index in the kept sequence
        codes_layout = PaddedLayout(token_counts, int(token_counts.max()))
        context = codes_layout.pad(codes)
        hidden_states = self.query_embedding.to(codes.dtype).expand(batch_size, -1, -1)
        for layer in self.layers:
            hidden_states = layer(hidden_states, context, None, codes_layout.key_mask)
        return self.project_out(self.norm(hidden_states))

    def decode_code_ids(self, codebook: torch.Tensor, code_ids, token_counts) -> torch.Tensor:
        """Packed code ids (T,) + counts (B,), checked (`ValueError` naming the problem), looked up in `codebook`
        (codebook_size, code_dim) -> (B, N, D) reconstructed encoder features. The one codes -> features path of the
        tokenizer (`decode_codes`) and the detokenizer, which keeps its own copy of the codebook."""
        max_count = self.query_embedding.shape[1]
        code_ids, token_counts = check_packed_code_ids(code_ids, token_counts, codebook.shape[0], max_count,
                                                       codebook.device)
        return self(codebook[code_ids].to(self.in_proj.weight.dtype), token_counts)


class LaVITTokenizerPreTrainedModel(PreTrainedModel):
    config_class = LaVITTokenizerConfig
    base_model_prefix = "tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaVITAttentionLayer", "LaVITEvaLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LaVITFeatureDecoder):
            init.trunc_normal_(module.position_embedding, std=std)
            init.trunc_normal_(module.query_embedding, std=std)
        elif isinstance(module, LaVITVectorQuantizer):
            codebook = F.normalize(torch.randn_like(module.codebook, dtype=torch.float32), dim=-1)
            init.copy_(module.codebook, codebook)
            init.copy_(module.ema_code_sum, codebook)
            init.ones_(module.ema_cluster_size)
            init.zeros_(module.initialized)


class LaVITTokenizerModel(LaVITTokenizerPreTrainedModel):
    """
    LaVIT's dynamic visual tokenizer: frozen encoder, token selector, token merger, vector quantizer, feature decoder.

    Example:

    ```python
    >>> from lavit import LaVITTokenizerModel
    >>> tokenizer = LaVITTokenizerModel.from_pretrained("path/to/visual_tokenizer")
    >>> tokens = tokenizer.tokenize(pixel_values)          # deterministic: same image, same tokens
    >>> tokens.code_ids.shape, tokens.token_counts        # (T,), (B,) with T = token_counts.sum()
    >>> budgeted = tokenizer.tokenize(pixel_values, max_tokens=64)
    ```
    """

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__(config)
        if config.uses_eva_encoder:
            self.vision_model = LaVITEvaVisionModel._from_config(config.vision_config)
        else:
            self.vision_model = AutoModel.from_config(config.vision_config)
        # the encoder is frozen: it never receives gradients and stays in eval mode (see `train`)
        self.vision_model.requires_grad_(False)
        self.selector = LaVITTokenSelector(config)
        self.merger = LaVITTokenMerger(config)
        self.quantizer = LaVITVectorQuantizer(config)
        self.decoder = LaVITFeatureDecoder(config)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()
        return self

    # ----------------------------------------------------------------------------------------------- checks

    def _check_pixel_values(self, pixel_values) -> torch.Tensor:
        size = self.config.image_size
        channels = self.config.vision_config.num_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor of shape (batch, {channels}, {size}, {size}), "
                             f"got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating point tensor (normalised pixels), "
                             f"got dtype {pixel_values.dtype}")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(f"pixel_values must have shape (batch, {channels}, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (0 images)")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")
        return pixel_values

    def _check_keep_mask(self, keep_mask, batch_size: int) -> torch.Tensor:
        expected = (batch_size, self.config.num_patches)
        if not isinstance(keep_mask, torch.Tensor) or tuple(keep_mask.shape) != expected:
            got = tuple(keep_mask.shape) if isinstance(keep_mask, torch.Tensor) else type(keep_mask).__name__
            raise ValueError(f"keep_mask must be a tensor of shape {expected} (batch, num_patches), got {got}")
        if keep_mask.dtype != torch.bool and not ((keep_mask == 0) | (keep_mask == 1)).all():
            raise ValueError("keep_mask must be boolean or hold only 0 and 1")
        keep_mask = keep_mask.bool()
        empty = (~keep_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"keep_mask keeps no patch for image(s) {empty}; every image needs at least one token")
        return keep_mask.to(self.device)

    # ----------------------------------------------------------------------------------------------- steps

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Stage 1 of 4, the frozen encoder: (B, C, H, W) normalised pixels -> (B, N, D) patch features, CLS dropped.

        Raises `ValueError` naming the problem when `pixel_values` is not a finite float tensor of shape
        (batch, channels, image_size, image_size).
        """
        pixel_values = self._check_pixel_values(pixel_values)
        with torch.no_grad():
            if self.config.uses_eva_encoder:
                hidden_states = self.vision_model(pixel_values).last_hidden_state
            else:
                outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
                hidden_states = outputs.hidden_states[self.config.vision_feature_layer]
        # CLIP-style encoders put a CLS token first; SigLIP-style ones have none
        return hidden_states[:, hidden_states.shape[1] - self.config.num_patches :]

    def select_tokens(
        self,
        keep_log_probs: torch.Tensor,
        mode: str | None = None,
        max_tokens: int | None = None,
        keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Turns the selector's (B, N, 2) log-probabilities into (B, N) keep weights (0/1 values).

        In training: straight-through Gumbel-softmax samples (their gradient flows to the selector). At inference, in
        order of precedence: a budget (`max_tokens`: the `max_tokens` patches with the highest keep probability;
        `keep_ratio`: the top `round(keep_ratio * N)`), else `mode` (default `config.selection_mode`):
        `"deterministic"` keeps `p_keep > config.selector_threshold`, `"sample"` draws Bernoulli(p_keep) with
        `generator`. Every image keeps at least its most probable patch.
        """
        keep_probs = keep_log_probs[..., 0].exp()
        num_patches = keep_probs.shape[1]
        if max_tokens is not None and keep_ratio is not None:
            raise ValueError("give at most one of max_tokens and keep_ratio")
        if self.training:
            keep_weights = F.gumbel_softmax(keep_log_probs, tau=self.config.gumbel_temperature, hard=True)[..., 0]
        elif max_tokens is not None or keep_ratio is not None:
            if keep_ratio is not None and not 0 < keep_ratio <= 1:
                raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
            if max_tokens is not None and max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
            budget = max_tokens if max_tokens is not None else round(keep_ratio * num_patches)
            top_index = keep_probs.topk(min(max(budget, 1), num_patches), dim=1).indices
            keep_weights = torch.zeros_like(keep_probs).scatter_(1, top_index, 1.0)
        else:
            mode = mode or self.config.selection_mode
            if mode == "deterministic":
                keep_weights = (keep_probs > self.config.selector_threshold).to(keep_probs.dtype)
            elif mode == "sample":
                keep_weights = torch.bernoulli(keep_probs.float(), generator=generator).to(keep_probs.dtype)
            else:
                raise ValueError(f"mode must be 'deterministic' or 'sample', got {mode!r}")
        # at least one token per image: force the most probable patch (straight-through keeps gradients intact)
        most_probable = F.one_hot(keep_probs.argmax(dim=1), num_patches).to(keep_weights.dtype)
        empty_images = (keep_weights.detach().sum(dim=1, keepdim=True) == 0).to(keep_weights.dtype)
        return keep_weights + (1 - keep_weights.detach()) * most_probable * empty_images

    def select(
        self,
        image_features: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        mode: str | None = None,
        max_tokens: int | None = None,
        keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2 of 4: encoder features (B, N, D) -> (selector log-probabilities (B, N, 2), keep weights (B, N)).

        An explicit `keep_mask` wins over the selector's decision; other arguments as in [`select_tokens`]."""
        keep_log_probs = self.selector(image_features)
        if keep_mask is not None:
            keep_weights = self._check_keep_mask(keep_mask, image_features.shape[0]).to(keep_log_probs.dtype)
        else:
            keep_weights = self.select_tokens(keep_log_probs, mode, max_tokens, keep_ratio, generator)
        return keep_log_probs, keep_weights

    def merge(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """Stage 3 of 4: features (B, N, D) + keep weights (B, N) -> merged kept tokens, packed (T, D)."""
        return self.merger(image_features, keep_weights)

    def quantize(self, merged_tokens: torch.Tensor) -> torch.LongTensor:
        """Stage 4 of 4: merged tokens (T, D) -> code ids (T,) of the nearest codebook entries (no codebook update)."""
        # a module call, not `lookup`: accelerate's offload hooks load the quantizer only for its own forward
        return self.quantizer(merged_tokens, fit=False).code_ids

    # ----------------------------------------------------------------------------------------------- public API

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        use_quantizer: bool = True,
    ) -> LaVITTokenizerOutput:
        """
        Runs the whole tokenizer and computes the training objective of paper eq. 4:
        `mean(1 - cos(x, x_rec)) + keep_ratio_weight * (rho - mean keep)^2 + commitment_weight * commitment`.

        `keep_mask` (B, N) overrides the selector. `use_quantizer=False` feeds the continuous (normalised) latents to
        the decoder: the first phase of the official training recipe, before VQ is switched on. `return_dict=False`
        (argument or config) returns a tuple of the non-`None` fields.
        """
        image_features = self.encode_patches(pixel_values)  # (B, N, D)
        keep_log_probs, keep_weights = self.select(image_features, keep_mask, None, None, None, None)
        merged_tokens = self.merge(image_features, keep_weights)  # (T, D)
        quantizer_output = self.quantizer(merged_tokens, quantize=use_quantizer)
        token_counts = (keep_weights > 0.5).sum(dim=1)
        reconstructed = self.decoder(quantizer_output.quantized.to(merged_tokens.dtype), token_counts)

        cosine = F.cosine_similarity(reconstructed.float(), image_features.float(), dim=-1)  # (B, N)
        per_image_keep_ratio = keep_weights.float().mean(dim=1)
        loss = reconstruction_loss = keep_ratio_loss = commitment_loss = None
        if return_loss:
            reconstruction_loss = (1 - cosine).mean()
            keep_ratio_loss = ((self.config.keep_ratio_target - per_image_keep_ratio) ** 2).mean()
            commitment_loss = quantizer_output.commitment_loss if use_quantizer else cosine.new_zeros(())
            loss = (
                reconstruction_loss
                + self.config.keep_ratio_weight * keep_ratio_loss
                + self.config.commitment_weight * commitment_loss
            )
        return LaVITTokenizerOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            keep_ratio_loss=keep_ratio_loss,
            commitment_loss=commitment_loss,
            reconstructed_features=reconstructed,
            image_features=image_features,
            code_ids=quantizer_output.code_ids,
            token_counts=token_counts,
            keep_mask=keep_weights.detach() > 0.5,
            keep_probs=keep_log_probs[..., 0].detach().exp(),
            mean_keep_ratio=per_image_keep_ratio.mean().detach(),
            reconstruction_cosine=cosine.mean().detach(),
            perplexity=quantizer_output.perplexity,
            codebook_usage=quantizer_output.codebook_usage,
        )

    @torch.no_grad()
    def encode_features(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        mode: str | None = None,
        max_tokens: int | None = None,
        keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> LaVITFeaturesOutput:
        """Continuous merger outputs of the kept tokens, packed (T, D). Selection arguments as in `tokenize`."""
        image_features = self.encode_patches(pixel_values)
        keep_log_probs, keep_weights = self.select(image_features, keep_mask, mode, max_tokens, keep_ratio, generator)
        keep_mask = keep_weights > 0.5
        return LaVITFeaturesOutput(
            features=self.merge(image_features, keep_weights),
            token_counts=keep_mask.sum(dim=1),
            keep_mask=keep_mask,
            keep_probs=keep_log_probs[..., 0].exp(),
        )

    @torch.no_grad()
    def tokenize(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        mode: str | None = None,
        max_tokens: int | None = None,
        keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> LaVITTokenizationOutput:
        """
        Images -> discrete visual tokens, packed: `code_ids` (T,), `token_counts` (B,), `keep_mask` (B, N).

        Selection: `keep_mask` if given, else a budget (`max_tokens` or `keep_ratio`), else `mode`
        (`"deterministic"` by default, or `"sample"` with an optional `generator`); see [`select_tokens`].
        """
        features = self.encode_features(pixel_values, keep_mask, mode, max_tokens, keep_ratio, generator)
        return LaVITTokenizationOutput(
            code_ids=self.quantize(features.features),
            token_counts=features.token_counts,
            keep_mask=features.keep_mask,
            keep_probs=features.keep_probs,
        )

    @torch.no_grad()
    def decode_codes(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        """Packed code ids (T,) + counts (B,) -> reconstructed encoder features (B, N, D)."""
        return self.decoder.decode_code_ids(self.quantizer.codebook, code_ids, token_counts)

    def image_to_pixel_values(self, image) -> torch.Tensor:
        """The official preprocessing: RGB, bicubic resize to the encoder size (no crop), CLIP normalisation."""
        image = _load_rgb_image(image)
        size = self.config.image_size
        array = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        mean = np.asarray(self.config.image_mean, dtype=np.float32)
        std = np.asarray(self.config.image_std, dtype=np.float32)
        pixel_values = torch.from_numpy((array - mean) / std).permute(2, 0, 1)[None]
        return pixel_values.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def visualize(self, image, path, **selection_kwargs) -> torch.BoolTensor:
        """
        Writes a PNG of `image` (PIL image, file path, (H, W, C) uint8 array or (C, H, W) float tensor in [0, 1])
        showing which patches the selector keeps, readable on dark and light images alike: the patch grid, dropped
        patches washed towards grey and crossed out, and "n of N tokens" in the corner. Small images are enlarged
        (nearest neighbour) to at least 256 pixels. `selection_kwargs` go to [`tokenize`]. Returns the (N,) keep mask.
        """
        image = _load_rgb_image(image)
        keep_mask = self.tokenize(self.image_to_pixel_values(image), **selection_kwargs).keep_mask[0]
        scale = max(1, -(-256 // min(image.size)))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        save_png_atomically(draw_keep_mask(image, keep_mask.cpu(), self.config.image_size // self.config.patch_size),
                            path)
        return keep_mask

    # ----------------------------------------------------------------------------------------------- conversion

    @classmethod
    def from_original_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        *,
        decoder_state_dict: dict[str, torch.Tensor] | None = None,
        vision_num_heads: int = 16,
        merger_num_heads: int = 16,
        decoder_num_heads: int = 16,
        **config_overrides,
    ) -> "LaVITTokenizerModel":
        """
        Builds a tokenizer from the official key names (`DynamicVisualTokenizer` state dict: `encoder.*`,
        `token_predictor.*`, `causal_encoder.*`, `quantize.*`, `encode_task_layer.*`; optionally the feature decoder
        of `tokenizer_decoder.bin` / `highres_tokenizer_decoder.bin`). Every dimension but the head counts is read
        from tensor shapes; the merger uses the `official` attention. Unknown keys raise; the CLIP head and final norm
        of the encoder, `vit_proj` (LM side) and the decoder's UNet projections (detokenizer side) are not used here.
        """
        config = original_tokenizer_config(
            state_dict,
            decoder_state_dict,
            vision_num_heads=vision_num_heads,
            merger_num_heads=merger_num_heads,
            decoder_num_heads=decoder_num_heads,
            **config_overrides,
        )
        model = cls(config)
        converted = convert_original_tokenizer_state_dict(state_dict, decoder_state_dict)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        derived = {"quantizer.ema_code_sum", "quantizer.ema_cluster_size", "quantizer.initialized"}
        missing = [key for key in missing if key not in derived and (decoder_state_dict or "decoder." not in key)]
        if missing or unexpected:
            raise ValueError(f"official state dict does not fit: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            model.quantizer.ema_code_sum.copy_(model.quantizer.codebook)
            model.quantizer.ema_cluster_size.fill_(1.0)
            model.quantizer.initialized.fill_(True)
        if decoder_state_dict is None:
            logger.warning("no decoder_state_dict given: the feature decoder is randomly initialised")
        return model.eval()


def check_packed_code_ids(code_ids, token_counts, codebook_size: int, max_count: int, device):
    """Validates packed code ids (T,) + per-image counts (B,) and returns them as int64 tensors on `device`."""
    code_ids = torch.as_tensor(code_ids, device=device)
    token_counts = torch.as_tensor(token_counts, device=device)
    if code_ids.ndim != 1 or code_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"code_ids must be a 1-D integer tensor (packed over images), got shape "
                         f"{tuple(code_ids.shape)} and dtype {code_ids.dtype}")
    if token_counts.ndim != 1 or token_counts.numel() == 0:
        raise ValueError(f"token_counts must be a non-empty 1-D tensor, got shape {tuple(token_counts.shape)}")
    if int(token_counts.sum()) != code_ids.numel():
        raise ValueError(f"token_counts sum to {int(token_counts.sum())} but there are {code_ids.numel()} code ids")
    if int(token_counts.min()) < 1 or int(token_counts.max()) > max_count:
        raise ValueError(f"every token count must be in [1, {max_count}], got {token_counts.tolist()}")
    if int(code_ids.min()) < 0 or int(code_ids.max()) >= codebook_size:
        raise ValueError(f"code ids must be in [0, {codebook_size}), got values in "
                         f"[{int(code_ids.min())}, {int(code_ids.max())}]")
    return code_ids.long(), token_counts.long()


def draw_keep_mask(image: Image.Image, keep_mask: torch.BoolTensor, grid: int) -> Image.Image:
    """`image` with its `grid` x `grid` patch grid, dropped patches (keep_mask False, raster order) washed towards
    grey with a black-and-white cross, and the token count in the top-left corner."""
    from PIL import ImageDraw, ImageFont

    width, height = image.size
    rows = (np.arange(height) * grid // height)[:, None]
    columns = (np.arange(width) * grid // width)[None, :]
    dropped = ~keep_mask.view(grid, grid).numpy()[rows, columns]
    pixels = np.asarray(image, dtype=np.float32)
    pixels = np.where(dropped[..., None], 0.35 * pixels + 0.65 * 128, pixels)
    # grid lines shifted by half the value range: they contrast with any colour, dark or light
    lines = np.zeros((height, width), dtype=bool)
    lines[np.flatnonzero(np.diff(rows[:, 0])) + 1, :] = True
    lines[:, np.flatnonzero(np.diff(columns[0])) + 1] = True
    pixels = np.where(lines[..., None], (pixels + 128) % 256, pixels)
    drawn = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(drawn)
    for index in np.flatnonzero(~keep_mask.numpy()):
        row, column = divmod(int(index), grid)
        box = (column * width / grid + 2, row * height / grid + 2, (column + 1) * width / grid - 3,
               (row + 1) * height / grid - 3)
        for color, line_width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            draw.line((box[0], box[1], box[2], box[3]), fill=color, width=line_width)
            draw.line((box[0], box[3], box[2], box[1]), fill=color, width=line_width)
    label = f"{int(keep_mask.sum())} of {keep_mask.numel()} tokens"
    try:  # a scalable font where PIL has FreeType, else its small bitmap font
        font = ImageFont.load_default(size=max(10, min(width, height) // 20))
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((4, 4), label, font=font)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 255, 255), font=font)
    return drawn


def _load_rgb_image(image) -> Image.Image:
    """The tokenizer's own minimal reader (this file cannot import the processor's `to_rgb_image` in a Hub folder
    and in the package alike): files and PIL images get their EXIF orientation applied, as every viewer shows them."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image file {os.fspath(image)!r}: {error}") from error
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4) uint8 arrays, "
                             f"got shape {image.shape} and dtype {image.dtype}")
        image = Image.fromarray(image[..., :3])
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise ValueError(f"tensor images must be float (C, H, W) in [0, 1] with C in (1, 3), "
                             f"got shape {tuple(image.shape)} and dtype {image.dtype}")
        array = (image.expand(3, -1, -1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image).convert("RGB")
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError("image is empty (0 pixels)")
    return image


def save_png_atomically(image: Image.Image, path):
    """Writes `image` as a PNG to a temporary file beside `path`, then renames it: a crash never leaves half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(handle)
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


__all__ = [
    "LaVITFeatureDecoder",
    "LaVITFeaturesOutput",
    "LaVITTokenMerger",
    "LaVITTokenSelector",
    "LaVITTokenizationOutput",
    "LaVITTokenizerModel",
    "LaVITTokenizerOutput",
    "LaVITTokenizerPreTrainedModel",
    "LaVITVectorQuantizer",
    "save_png_atomically",
]
