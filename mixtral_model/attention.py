"""Grouped-query self-attention with RoPE, a KV cache and three backends.

Backends, chosen by the config's attention implementation (`attn_implementation=` when loading):
`sdpa` (default, torch.nn.functional.scaled_dot_product_attention), `eager` (explicit softmax,
reference semantics) and `flash_attention_2` (flash-attn >= 2.3 on CUDA, fp16/bf16).
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_compat.transformers import attn_implementation

from .config import MixtralConfig
from .flash_attention import flash_attention
from .masks import AttentionLayout
from .rope import apply_rotary


def repeat_kv_heads(x_BKSH: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, H) -> (B, K * n_rep, S, H): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x_BKSH
    b, k, s, h = x_BKSH.shape
    return x_BKSH[:, :, None].expand(b, k, n_rep, s, h).reshape(b, k * n_rep, s, h)


def eager_attention(
    q_BNTH, k_BKSH, v_BKSH, layout: AttentionLayout, scale: float, dropout: float, training: bool
):
    n_rep = q_BNTH.shape[1] // k_BKSH.shape[1]
    k_BNSH, v_BNSH = repeat_kv_heads(k_BKSH, n_rep), repeat_kv_heads(v_BKSH, n_rep)
    scores_BNTS = torch.matmul(q_BNTH, k_BNSH.transpose(2, 3)) * scale
    allowed = layout.bool_mask(k_BKSH.shape[2], q_BNTH.device)
    # Additive (not masked_fill), as the reference: rows with no visible key stay differentiable.
    bias = torch.zeros((), dtype=scores_BNTS.dtype, device=scores_BNTS.device)
    scores_BNTS = scores_BNTS + bias.masked_fill(~allowed, torch.finfo(scores_BNTS.dtype).min)
    probs_BNTS = F.softmax(scores_BNTS, dim=-1, dtype=torch.float32).to(q_BNTH.dtype)
    probs_BNTS = F.dropout(probs_BNTS, p=dropout, training=training)
    return torch.matmul(probs_BNTS, v_BNSH).transpose(1, 2)


def sdpa_attention(
    q_BNTH, k_BKSH, v_BKSH, layout: AttentionLayout, scale: float, dropout: float, training: bool
):
    kv_len = k_BKSH.shape[2]
    is_causal = layout.is_plain_causal(kv_len) and layout.q_len > 1
    mask = None if is_causal or layout.sees_everything(kv_len) else layout.bool_mask(kv_len, q_BNTH.device)
    out_BNTH = F.scaled_dot_product_attention(
        q_BNTH,
        k_BKSH,
        v_BKSH,
        attn_mask=mask,
        dropout_p=dropout if training else 0.0,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q_BNTH.shape[1] != k_BKSH.shape[1],
    )
    return out_BNTH.transpose(1, 2)


ATTENTION_BACKENDS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention,
}


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BTD, rope_cos_sin, layout: AttentionLayout, cache=None) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q_BNTH = self.q_proj(x_BTD).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKTH = self.k_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTH = self.v_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos_BTH, sin_BTH = rope_cos_sin
        q_BNTH, k_BKTH = apply_rotary(q_BNTH, cos_BTH, sin_BTH), apply_rotary(k_BKTH, cos_BTH, sin_BTH)
        if cache is not None:
            k_BKTH, v_BKTH = cache.update(k_BKTH, v_BKTH, self.layer_idx)
        backend = ATTENTION_BACKENDS[attn_implementation(self.config)]
        out_BTNH = backend(
            q_BNTH, k_BKTH, v_BKTH, layout, self.scale, self.config.attention_dropout, self.training
        )
        return self.o_proj(out_BTNH.reshape(b, t, self.num_heads * self.head_dim))
