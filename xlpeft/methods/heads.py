"""Task heads on top of the encoder's last hidden states. Heads are always trained densely."""

from __future__ import annotations

import torch
from torch import nn

from xlpeft.errors import ConfigError

HEADS = ("token_classification", "sequence_classification")


class TokenClassificationHead(nn.Module):
    """Dropout + linear per token: (B, T, H) -> (B, T, L)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))  # (B, T, L)


class SequenceClassificationHead(nn.Module):
    """BERT/RoBERTa-style pooler on the first token: dense + tanh + dropout + linear, (B, T, H) -> (B, L)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.dense(self.dropout(hidden[:, 0])))  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, L)


def build_head(kind: str, hidden_size: int, num_labels: int, dropout: float = 0.1) -> nn.Module:
    if kind == "token_classification":
        return TokenClassificationHead(hidden_size, num_labels, dropout)
    if kind == "sequence_classification":
        return SequenceClassificationHead(hidden_size, num_labels, dropout)
    raise ConfigError(f"head should be one of {', '.join(HEADS)}; got {kind!r}")
