"""Invertible adapters (MAD-X, Pfeiffer et al., EMNLP 2020, Sec. 2.3).

A NICE additive coupling block (Dinh et al., 2015) on the embedding layer's output; its exact
inverse is applied to the hidden states just before the tied MLM decoder, so the embedding
matrix shared by input and output stays frozen while the token representation space adapts
to the target language.
"""

from __future__ import annotations

import torch
from torch import nn

from xlpeft.errors import ConfigError
from xlpeft.methods.bottleneck import Bottleneck


class InvertibleAdapter(nn.Module):
    """NICE coupling: split x = [x1, x2]; y1 = x1 + F(x2); y2 = x2 + G(y1).

    F and G are bottleneck MLPs from H/2 to H/2 with zero-initialised output layers, so an
    untrained adapter is the identity.
    """

    def __init__(self, hidden_size: int, reduction_factor: float = 2.0, non_linearity: str = "relu") -> None:
        super().__init__()
        if hidden_size % 2:
            raise ConfigError(f"invertible adapters split the hidden vector in halves; hidden size {hidden_size} is odd")
        half = hidden_size // 2
        self.F = Bottleneck(half, reduction_factor, non_linearity)
        self.G = Bottleneck(half, reduction_factor, non_linearity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, H/2) each
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=-1)  # (B, T, H)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y.chunk(2, dim=-1)  # (..., H/2) each
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=-1)
