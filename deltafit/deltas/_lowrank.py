"""Low-rank pieces shared by the LoRA family (composed by each method, not inherited)."""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA, which keeps updates stable as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LowRankUpdate(nn.Module):
    """x -> scale * B A dropout(x), with A (r x in) Kaiming-uniform and B (out x r) zero.

    B starts at zero so the adapted model starts exactly at the base. Parameters are fp32 whatever
    the base dtype: low-rank updates are tiny next to W0 and lose their signal in bf16.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, device=None):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.t()) @ self.B.t() * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update scale * B A, shaped like the host weight (out x in)."""
        return (self.B @ self.A) * self.scale


def fold_into(linear: nn.Linear, delta: torch.Tensor) -> None:
    """W <- W + delta, computed in fp32 and stored back in the weight's own dtype."""
    weight = linear.weight
    weight.copy_((weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype))
