"""LaVIT's dynamic visual tokenizer (paper section 3.1).

image -> frozen encoder -> patch features (B, N, D) -> token selector -> keep_mask (B, N)
      -> token merger -> kept features (T, D), T = sum(token_counts) -> vector quantizer -> code_ids (T,)
code_ids -> feature decoder -> reconstructed encoder features (B, N, D)

`LaVITTokenizerModel` runs these as four public stages, `encode_patches` -> `select` -> `merge` -> `quantize`; its
`forward` (training objective), `encode_features` and `tokenize` are compositions of them. Variants are fixed when
the model is built: the encoder's feature read-out (EVA or a transformers backbone) and the merger's attention
(`config.merger_attention`: exact or the official leaky softmax, see [`build_token_merger`]).

Variable-length tokens are stored packed: values of all images concatenated in batch order (raster order inside an
image) plus `token_counts` (B,). Kernels may pad internally; nothing is padded in what this module returns.
Preprocessing and drawing live in `image_processing_lavit.py`; conversion of official checkpoints in
`convert_original_lavit.py`.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, can_return_tuple

from .attention_lavit import LaVITAttentionLayer, PaddedLayout, official_leaky_attention, sdpa_attention
from .configuration_lavit import (  # noqa: F401 (SELECTION_RANGES, check_selection_arguments: their old home)
    SELECTION_RANGES,
    LaVITImageSelection,
    LaVITTokenizerConfig,
    check_selection_arguments,
)
from .modeling_eva_vit import LaVITEvaVisionModel
from .saving_lavit import SaveBesideSourcesMixin


@dataclass
class LaVITPackedTokensOutput(ModelOutput):
    """
    Base of the packed outputs: `values` of all images concatenated, split per image by `token_counts`.

    Args:
        token_counts (`torch.LongTensor` of shape `(B,)`): tokens per image; `T = token_counts.sum()`.
        keep_mask (`torch.BoolTensor` of shape `(B, N)`): which patches were kept (raster order).
        keep_probs (`torch.FloatTensor` of shape `(B, N)`): the selector's keep probability per patch.
    """

    token_counts: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    keep_probs: torch.FloatTensor | None = None

    def per_image(self) -> list[torch.Tensor]:
        """The packed values as one tensor per image."""
        return list(torch.split(self.packed_values(), self.token_counts.tolist()))

    def packed_values(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LaVITTokenizationOutput(LaVITPackedTokensOutput):
    """
    Discrete visual tokens of a batch of images; `token_counts`, `keep_mask`, `keep_probs` as in
    [`LaVITPackedTokensOutput`].

    Args:
        code_ids (`torch.LongTensor` of shape `(T,)`): codebook indices of all kept tokens (no LM offset).
    """

    code_ids: torch.LongTensor | None = None

    def packed_values(self) -> torch.Tensor:
        return self.code_ids


@dataclass
class LaVITFeaturesOutput(LaVITPackedTokensOutput):
    """
    Continuous merger outputs of the kept tokens (the LM-side input of LaVIT), packed like [`LaVITTokenizationOutput`];
    `token_counts`, `keep_mask`, `keep_probs` as in [`LaVITPackedTokensOutput`].

    Args:
        features (`torch.FloatTensor` of shape `(T, D)`): merged features of all kept tokens.
    """

    features: torch.FloatTensor | None = None

    def packed_values(self) -> torch.Tensor:
        return self.features


def kept_token_fields(keep_log_probs: torch.Tensor, keep_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fields every packed output shares, detached, from a selection: `token_counts` (B,), `keep_mask` (B, N)
    and `keep_probs` (B, N), given the selector's (B, N, 2) log-probabilities and the (B, N) 0/1 keep weights."""
    keep_mask = keep_weights.detach() > 0.5
    return {"token_counts": keep_mask.sum(dim=1), "keep_mask": keep_mask,
            "keep_probs": keep_log_probs[..., 0].detach().exp()}


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
        hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states`): the frozen encoder's embeddings and
            layer outputs, (B, S, D) each.
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
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
        """(B, N, D) patch features -> (B, N, 2) float32 log-probabilities; index 0 is "keep"."""
        hidden_states = F.gelu(self.in_proj(self.layer_norm(image_features)))
        local_part, global_part = hidden_states.chunk(2, dim=-1)
        global_part = global_part.mean(dim=1, keepdim=True).expand_as(global_part)
        hidden_states = torch.cat([local_part, global_part], dim=-1)
        hidden_states = F.gelu(self.fc2(F.gelu(self.fc1(hidden_states))))
        # the keep decision in float32 (as the codebook lookup): bf16 rounds a near-even pair of logits to exactly
        # (0.5, 0.5), which would drop every such patch (an untrained or early selector keeps one token an image)
        return F.log_softmax(self.classifier(hidden_states).float(), dim=-1)


class LaVITTokenMerger(nn.Module):
    """
    Token merger (paper section 3.1, official `TokenMerger`, state-dict prefix `causal_encoder.`). The residual
    stream starts from the raw encoder features of the kept tokens; each block applies causal self-attention among
    kept tokens (raster order), cross-attention from kept tokens to the normalised features of the dropped tokens,
    and an MLP; a final norm closes the stack. No positional embedding: order comes from the causal mask and the
    encoder's own position embeddings.

    This class computes true masked attention (`config.merger_attention="exact"`) on the kept tokens only: they stay
    packed and attention pads them per image. [`LaVITOfficialTokenMerger`] has the same modules and state-dict keys
    and reproduces the official arithmetic; [`build_token_merger`] picks one from the config.

    `keep_weights` (B, N) are 0/1 values; in training they are straight-through Gumbel samples whose gradient reaches
    the selector through this module (kept tokens scale the stream, dropped tokens scale the merged context).
    """

    attention_function = staticmethod(sdpa_attention)

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__()
        hidden_size = config.vision_hidden_size
        self.context_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            LaVITAttentionLayer(
                hidden_size,
                config.merger_num_heads,
                config.merger_intermediate_size,
                config.layer_norm_eps,
                is_causal=True,
                attention_function=self.attention_function,
            )
            for _ in range(config.merger_num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features and (B, N) keep weights -> (T, D) merged kept tokens, packed in batch order."""
        keep_mask = keep_weights > 0.5
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


class LaVITOfficialTokenMerger(LaVITTokenMerger):
    """
    The token merger with the official arithmetic (`config.merger_attention="official"`, needed for converted official
    weights): all N positions go through every block with the official leaky masked softmax
    ([`official_leaky_attention`]), and the kept positions are taken at the end. Same modules and state-dict keys as
    [`LaVITTokenMerger`].
    """

    attention_function = staticmethod(official_leaky_attention)

    def forward(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features and (B, N) keep weights -> (T, D) merged kept tokens, packed in batch order."""
        return self.forward_full_sequence(image_features, keep_weights)[keep_weights > 0.5]

    def forward_full_sequence(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """The official computation over all N positions, dropped ones included. Returns (B, N, D)."""
        keep = keep_weights.float()[:, None, None, :]  # (B, 1, 1, N) over keys
        eye = torch.eye(image_features.shape[1], device=keep.device)
        # kept tokens and the token itself (the layers' causal attention hides the later ones); the context is only
        # the dropped tokens
        self_attn_visibility = keep + (1.0 - keep) * eye
        cross_attn_visibility = 1.0 - keep
        context = self.context_norm(image_features)
        hidden_states = image_features
        for layer in self.layers:
            hidden_states = layer(hidden_states, context, self_attn_visibility, cross_attn_visibility)
        return self.norm(hidden_states)


TOKEN_MERGER_CLASSES = {"exact": LaVITTokenMerger, "official": LaVITOfficialTokenMerger}


def build_token_merger(config: LaVITTokenizerConfig) -> LaVITTokenMerger:
    """The token merger that `config.merger_attention` names: `"exact"` -> [`LaVITTokenMerger`], `"official"` ->
    [`LaVITOfficialTokenMerger`]. Both have the same state-dict keys."""
    return TOKEN_MERGER_CLASSES[config.merger_attention](config)


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


class LaVITTokenizerPreTrainedModel(SaveBesideSourcesMixin, PreTrainedModel):
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


def eva_patch_states(vision_model: nn.Module, pixel_values: torch.Tensor, output_hidden_states: bool = False
                     ) -> BaseModelOutput:
    """The official read-out of the EVA encoder: `last_hidden_state` is its last block's output, before the final
    norm (B, 1 + N, D); `hidden_states` its embeddings and every block's output when asked."""
    return vision_model(pixel_values, output_hidden_states=output_hidden_states)


def backbone_patch_states(vision_model: nn.Module, pixel_values: torch.Tensor, feature_layer: int,
                          output_hidden_states: bool = False) -> BaseModelOutput:
    """A transformers vision backbone (CLIP, SigLIP, ...): `last_hidden_state` is its hidden states number
    `feature_layer` (B, [1 +] N, D); `hidden_states` all of them when asked."""
    outputs = vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    return BaseModelOutput(last_hidden_state=outputs.hidden_states[feature_layer],
                           hidden_states=outputs.hidden_states if output_hidden_states else None)


def build_vision_encoder(config: LaVITTokenizerConfig):
    """The frozen encoder `config.vision_config` describes, and the function `(encoder, pixel_values) -> (B, S, D)`
    that reads its patch features: the EVA encoder's last block, or hidden state `config.vision_feature_layer` of a
    transformers backbone."""
    if config.uses_eva_encoder:
        return LaVITEvaVisionModel._from_config(config.vision_config), eva_patch_states
    encoder = AutoModel.from_config(config.vision_config)
    return encoder, partial(backbone_patch_states, feature_layer=config.vision_feature_layer)


class LaVITTokenizerModel(LaVITTokenizerPreTrainedModel):
    """
    LaVIT's dynamic visual tokenizer: frozen encoder, token selector, token merger, vector quantizer, feature decoder.

    Four public stages, `encode_patches` -> `select` -> `merge` -> `quantize`; `forward` (the training objective),
    `encode_features` and `tokenize` compose them. Images become `pixel_values` with [`LaVITImageProcessor`]
    (`LaVITImageProcessor.from_tokenizer_config(tokenizer.config)`: the official preprocessing).

    Example:

    ```python
    >>> from lavit import LaVITImageProcessor, LaVITTokenizerModel
    >>> tokenizer = LaVITTokenizerModel.from_pretrained("path/to/visual_tokenizer")
    >>> pixel_values = LaVITImageProcessor.from_tokenizer_config(tokenizer.config)(images)["pixel_values"]
    >>> tokens = tokenizer.tokenize(pixel_values)          # deterministic: same image, same tokens
    >>> tokens.code_ids.shape, tokens.token_counts        # (T,), (B,) with T = token_counts.sum()
    >>> budgeted = tokenizer.tokenize(pixel_values, max_tokens=64)
    ```
    """

    _auto_class = "AutoModel"  # the `auto_map` of its saved folders: they load with trust_remote_code=True

    # the typed selection settings (for callers that cannot import this folder, such as the processor)
    selection_class = LaVITImageSelection

    def __init__(self, config: LaVITTokenizerConfig):
        super().__init__(config)
        self.vision_model, self.read_patch_states = build_vision_encoder(config)
        # the encoder is frozen: it never receives gradients and stays in eval mode (see `train`)
        self.vision_model.requires_grad_(False)
        self.selector = LaVITTokenSelector(config)
        self.merger = build_token_merger(config)
        self.quantizer = LaVITVectorQuantizer(config)
        self.decoder = LaVITFeatureDecoder(config)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()
        return self

    # ----------------------------------------------------------------------------------------------- stages

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Stage 1 of 4, the frozen encoder: (B, C, H, W) normalised pixels -> (B, N, D) patch features, CLS dropped.

        Raises `ValueError` naming the problem when `pixel_values` is not a finite float tensor of shape
        (batch, channels, image_size, image_size).
        """
        return self.encode_image(pixel_values).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        """[`encode_patches`] as the encoder's output: `last_hidden_state` the (B, N, D) patch features, CLS dropped;
        with `output_hidden_states`, `hidden_states` the encoder's (embeddings, then every layer; (B, S, D) each)."""
        check_pixel_values(pixel_values, self.config.vision_config.num_channels, self.config.image_size)
        with torch.no_grad():
            outputs = self.read_patch_states(self.vision_model, pixel_values, output_hidden_states=output_hidden_states)
        # CLIP-style encoders put a CLS token first; SigLIP-style ones have none
        states = outputs.last_hidden_state
        outputs.last_hidden_state = states[:, states.shape[1] - self.config.num_patches :]
        return outputs

    def select(
        self,
        image_features: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        selection: LaVITImageSelection | dict | None = None,
        **selection_arguments,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2 of 4: encoder features (B, N, D) -> (selector log-probabilities (B, N, 2), keep weights (B, N)).

        An explicit `keep_mask` wins over the selector's decision; the selection as in [`select_tokens`]."""
        keep_log_probs = self.selector(image_features)
        if keep_mask is None:
            return keep_log_probs, self.select_tokens(keep_log_probs, selection, **selection_arguments)
        keep_mask = check_keep_mask(keep_mask, image_features.shape[0], self.config.num_patches)
        return keep_log_probs, keep_mask.to(self.device, keep_log_probs.dtype)

    def select_tokens(
        self,
        keep_log_probs: torch.Tensor,
        selection: LaVITImageSelection | dict | None = None,
        **selection_arguments,
    ) -> torch.Tensor:
        """
        Turns the selector's (B, N, 2) log-probabilities into (B, N) keep weights (0/1 values).

        In training: straight-through Gumbel-softmax samples (their gradient flows to the selector). At inference,
        `selection` ([`LaVITImageSelection`], a dict of its fields, or its fields as keyword arguments), in order of
        precedence: a budget (`max_tokens`: the `max_tokens` patches with the highest keep probability;
        `keep_ratio`: the top `round(keep_ratio * N)`), else `mode` (default `config.selection_mode`):
        `"deterministic"` keeps `p_keep > config.selector_threshold`, `"sample"` draws Bernoulli(p_keep) with
        `generator`. Every image keeps at least its most probable patch. Bad arguments raise `ValueError`.
        """
        selection = LaVITImageSelection.from_value(selection, **selection_arguments)
        mode, max_tokens, keep_ratio = selection.mode, selection.max_tokens, selection.keep_ratio
        keep_probs = keep_log_probs[..., 0].exp()
        if self.training:
            keep_weights = F.gumbel_softmax(keep_log_probs, tau=self.config.gumbel_temperature, hard=True)[..., 0]
        elif max_tokens is not None or keep_ratio is not None:
            budget = max_tokens if max_tokens is not None else round(keep_ratio * keep_probs.shape[1])
            keep_weights = top_k_keep_weights(keep_probs, budget)
        elif (mode or self.config.selection_mode) == "sample":
            keep_weights = torch.bernoulli(keep_probs.float(), generator=selection.generator).to(keep_probs.dtype)
        else:
            keep_weights = (keep_probs > self.config.selector_threshold).to(keep_probs.dtype)
        return keep_at_least_one(keep_weights, keep_probs)

    def merge(self, image_features: torch.Tensor, keep_weights: torch.Tensor) -> torch.Tensor:
        """Stage 3 of 4: features (B, N, D) + keep weights (B, N) -> merged kept tokens, packed (T, D)."""
        return self.merger(image_features, keep_weights)

    def quantize(self, merged_tokens: torch.Tensor) -> torch.LongTensor:
        """Stage 4 of 4: merged tokens (T, D) -> code ids (T,) of the nearest codebook entries (no codebook update)."""
        # a module call, not `lookup`: accelerate's offload hooks load the quantizer only for its own forward
        return self.quantizer(merged_tokens, fit=False).code_ids

    # ----------------------------------------------------------------------------------------------- compositions

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        use_quantizer: bool = True,
        output_hidden_states: bool | None = None,
    ) -> LaVITTokenizerOutput:
        """
        Runs the whole tokenizer and computes the training objective of paper eq. 4 (see [`loss_terms`]).

        `keep_mask` (B, N) overrides the selector. `use_quantizer=False` feeds the continuous (normalised) latents to
        the decoder: the first phase of the official training recipe, before VQ is switched on.
        `output_hidden_states` (argument or config) adds the frozen encoder's hidden states. `return_dict=False`
        (argument or config) returns a tuple of the non-`None` fields.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        encoder_outputs = self.encode_image(pixel_values, output_hidden_states=output_hidden_states)
        image_features = encoder_outputs.last_hidden_state  # (B, N, D)
        keep_log_probs, keep_weights = self.select(image_features, keep_mask)
        merged_tokens = self.merge(image_features, keep_weights)  # (T, D)
        quantizer_output = self.quantizer(merged_tokens, quantize=use_quantizer)
        kept = kept_token_fields(keep_log_probs, keep_weights)
        reconstructed = self.decoder(quantizer_output.quantized.to(merged_tokens.dtype), kept["token_counts"])
        cosine = F.cosine_similarity(reconstructed.float(), image_features.float(), dim=-1)  # (B, N)
        keep_ratios = keep_weights.float().mean(dim=1)
        commitment_loss = quantizer_output.commitment_loss if use_quantizer else cosine.new_zeros(())
        losses = self.loss_terms(cosine, keep_ratios, commitment_loss) if return_loss else {}
        return LaVITTokenizerOutput(
            **losses, reconstructed_features=reconstructed, image_features=image_features,
            code_ids=quantizer_output.code_ids, **kept, mean_keep_ratio=keep_ratios.mean().detach(),
            reconstruction_cosine=cosine.mean().detach(), perplexity=quantizer_output.perplexity,
            codebook_usage=quantizer_output.codebook_usage, hidden_states=encoder_outputs.hidden_states,
        )

    def loss_terms(self, cosine: torch.Tensor, keep_ratios: torch.Tensor, commitment_loss: torch.Tensor) -> dict:
        """
        The training objective of paper eq. 4, `loss = mean(1 - cos(x, x_rec)) + keep_ratio_weight * mean((rho -
        keep ratio)^2) + commitment_weight * commitment_loss`, and its terms before weighting, from the (B, N) cosine
        similarities of reconstruction and target, the (B,) per-image keep ratios and the commitment loss.
        """
        reconstruction_loss = (1 - cosine).mean()
        keep_ratio_loss = ((self.config.keep_ratio_target - keep_ratios) ** 2).mean()
        loss = (
            reconstruction_loss
            + self.config.keep_ratio_weight * keep_ratio_loss
            + self.config.commitment_weight * commitment_loss
        )
        return {"loss": loss, "reconstruction_loss": reconstruction_loss, "keep_ratio_loss": keep_ratio_loss,
                "commitment_loss": commitment_loss}

    @torch.no_grad()
    def encode_features(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        selection: LaVITImageSelection | dict | None = None,
        **selection_arguments,
    ) -> LaVITFeaturesOutput:
        """Continuous merger outputs of the kept tokens, packed (T, D). Selection arguments as in `tokenize`."""
        image_features = self.encode_patches(pixel_values)
        keep_log_probs, keep_weights = self.select(image_features, keep_mask, selection, **selection_arguments)
        return LaVITFeaturesOutput(features=self.merge(image_features, keep_weights),
                                   **kept_token_fields(keep_log_probs, keep_weights))

    @torch.no_grad()
    def tokenize(
        self,
        pixel_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        selection: LaVITImageSelection | dict | None = None,
        **selection_arguments,
    ) -> LaVITTokenizationOutput:
        """
        Images -> discrete visual tokens, packed: `code_ids` (T,), `token_counts` (B,), `keep_mask` (B, N).

        Selection: `keep_mask` if given, else `selection` ([`LaVITImageSelection`], a dict, or its fields as keyword
        arguments: `max_tokens=64`): a budget (`max_tokens` or `keep_ratio`), else `mode` (`"deterministic"` by
        default, or `"sample"` with an optional `generator`); see [`select_tokens`].
        """
        features = self.encode_features(pixel_values, keep_mask, selection, **selection_arguments)
        return LaVITTokenizationOutput(code_ids=self.quantize(features.features), token_counts=features.token_counts,
                                       keep_mask=features.keep_mask, keep_probs=features.keep_probs)

    @torch.no_grad()
    def decode_codes(self, code_ids: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        """Packed code ids (T,) + counts (B,) -> reconstructed encoder features (B, N, D)."""
        return self.decoder.decode_code_ids(self.quantizer.codebook, code_ids, token_counts)


# --------------------------------------------------------------------------------------------------- selection


def top_k_keep_weights(keep_probs: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, N) keep weights (0/1) of the `budget` most probable patches per image (clipped to [1, N])."""
    num_patches = keep_probs.shape[1]
    top_index = keep_probs.topk(min(max(budget, 1), num_patches), dim=1).indices
    return torch.zeros_like(keep_probs).scatter_(1, top_index, 1.0)


def keep_at_least_one(keep_weights: torch.Tensor, keep_probs: torch.Tensor) -> torch.Tensor:
    """`keep_weights` (B, N) where every image without a kept patch keeps its most probable one; straight-through,
    so the gradient of sampled weights stays intact."""
    most_probable = F.one_hot(keep_probs.argmax(dim=1), keep_probs.shape[1]).to(keep_weights.dtype)
    empty_images = (keep_weights.detach().sum(dim=1, keepdim=True) == 0).to(keep_weights.dtype)
    return keep_weights + (1 - keep_weights.detach()) * most_probable * empty_images


# --------------------------------------------------------------------------------------------------- input checks


def check_pixel_values(pixel_values, num_channels: int, image_size: int) -> None:
    """Raises `ValueError` unless `pixel_values` is a finite float tensor (batch >= 1, num_channels, size, size)."""
    expected = f"(batch, {num_channels}, {image_size}, {image_size})"
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating point tensor (normalised pixels), "
                         f"got dtype {pixel_values.dtype}")
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (num_channels, image_size, image_size):
        raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (0 images)")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contains NaN or infinite values")


def check_keep_mask(keep_mask, batch_size: int, num_patches: int) -> torch.BoolTensor:
    """`keep_mask` as a (batch_size, num_patches) bool tensor; `ValueError` for another shape, values other than 0/1,
    or an image that keeps no patch."""
    expected = (batch_size, num_patches)
    if not isinstance(keep_mask, torch.Tensor) or tuple(keep_mask.shape) != expected:
        got = tuple(keep_mask.shape) if isinstance(keep_mask, torch.Tensor) else type(keep_mask).__name__
        raise ValueError(f"keep_mask must be a tensor of shape {expected} (batch, num_patches), got {got}")
    if keep_mask.dtype != torch.bool and not ((keep_mask == 0) | (keep_mask == 1)).all():
        raise ValueError("keep_mask must be boolean or hold only 0 and 1")
    keep_mask = keep_mask.bool()
    empty = (~keep_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"keep_mask keeps no patch for image(s) {empty}; every image needs at least one token")
    return keep_mask


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


__all__ = [
    "LaVITFeatureDecoder",
    "LaVITFeaturesOutput",
    "LaVITOfficialTokenMerger",
    "LaVITPackedTokensOutput",
    "LaVITTokenMerger",
    "LaVITTokenSelector",
    "LaVITTokenizationOutput",
    "LaVITTokenizerModel",
    "LaVITTokenizerOutput",
    "LaVITTokenizerPreTrainedModel",
    "LaVITVectorQuantizer",
    "build_token_merger",
]
