"""Rotary position embedding (RoPE, rotate-half convention of the hub checkpoints)."""

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies theta^(-2i/head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_parameters: dict):
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"rope_parameters.rope_type={rope_type!r} is not supported; Mixtral uses 'default'"
            )
        self.head_dim = head_dim
        self.theta = rope_parameters["rope_theta"]
        self.inv_freq = nn.Buffer(rope_inverse_frequencies(head_dim, self.theta), persistent=False)

    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, head_dim) in x's dtype; the angles are computed in fp32."""
        freqs_BTF = position_ids_BT[..., None].float() * self.inv_freq.to(
            device=x.device, dtype=torch.float32
        )
        angles_BTH = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
        return angles_BTH.cos().to(x.dtype), angles_BTH.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x_BNTH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTH.unsqueeze(1), sin_BTH.unsqueeze(1)
    return x_BNTH * cos + rotate_half(x_BNTH) * sin
