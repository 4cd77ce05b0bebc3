"""The bottleneck MLP shared by sequential adapters and invertible adapters."""

from __future__ import annotations

import torch
from torch import nn

from xlpeft.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """x -> up(act(down(x))), with ``up`` zero-initialised so that a residual around it starts as identity.

    The bottleneck width is ``int(in_features // reduction_factor)`` (at least 1), as in
    Houlsby et al. (2019) and Pfeiffer et al. (2020).
    """

    def __init__(self, in_features: int, reduction_factor: float, non_linearity: str = "relu") -> None:
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity should be one of {', '.join(ACTIVATIONS)}; got {non_linearity!r}")
        width = max(1, int(in_features // reduction_factor))
        self.down = nn.Linear(in_features, width)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, in_features)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))  # (..., in_features)
