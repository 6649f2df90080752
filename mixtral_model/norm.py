"""RMSNorm as Mixtral uses it: normalise in fp32, scale in the input dtype."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        input_dtype = x_BTD.dtype
        x_fp32 = x_BTD.to(torch.float32)
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(input_dtype)
