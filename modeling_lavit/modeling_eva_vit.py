"""The EVA-CLIP vision transformer that LaVIT uses as its frozen encoder (EVA01-CLIP-g/14 by default).

Architecture of the official `EVAVisionTransformer` as configured by LaVIT: learned absolute position embeddings over
CLS + patches, pre-norm blocks, a fused qkv projection with separate q and v biases (the key has none), exact GELU,
no layer-scale, rel-pos bias, RoPE or sub-LN. LaVIT reads the output of the last block *before* the final norm, so
this module has no final norm and no CLIP head.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .configuration_lavit import LaVITEvaVisionConfig
from .saving_lavit import SaveBesideSourcesMixin


class LaVITEvaEmbeddings(nn.Module):
    def __init__(self, config: LaVITEvaVisionConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D), raster order
        cls_tokens = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        return torch.cat([cls_tokens, patches], dim=1) + self.position_embedding.to(patches.dtype)


class LaVITEvaAttention(nn.Module):
    def __init__(self, config: LaVITEvaVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.v_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_size = hidden_states.shape
        # EVA trains without a key bias: the fused projection gets zeros in the key slot
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        # the projection runs through its module (not F.linear on `.weight`): accelerate's offload hooks load the
        # weight only when the module itself is called
        qkv = self.qkv(hidden_states)
        qkv = qkv + qkv_bias.to(qkv.dtype)
        qkv = qkv.view(batch_size, seq_len, 3, self.num_heads, hidden_size // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, head_dim)
        attn_output = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attn_output.transpose(1, 2).reshape(batch_size, seq_len, hidden_size))


class LaVITEvaMLP(nn.Module):
    def __init__(self, config: LaVITEvaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class LaVITEvaLayer(GradientCheckpointingLayer):
    def __init__(self, config: LaVITEvaVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = LaVITEvaAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LaVITEvaMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class LaVITEvaPreTrainedModel(SaveBesideSourcesMixin, PreTrainedModel):
    config_class = LaVITEvaVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaVITEvaLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LaVITEvaEmbeddings):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            init.trunc_normal_(module.position_embedding, std=self.config.initializer_range)
        elif isinstance(module, LaVITEvaAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)


class LaVITEvaVisionModel(LaVITEvaPreTrainedModel):
    """EVA-CLIP ViT returning the output of its last block before the final norm, CLS token first (B, N + 1, D)."""

    def __init__(self, config: LaVITEvaVisionConfig):
        super().__init__(config)
        self.embeddings = LaVITEvaEmbeddings(config)
        self.layers = nn.ModuleList([LaVITEvaLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")
        hidden_states = self.embeddings(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


__all__ = ["LaVITEvaPreTrainedModel", "LaVITEvaVisionModel"]
