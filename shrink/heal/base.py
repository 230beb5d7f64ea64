"""What a healer is: the loss the compressed model is trained on, and whether it needs the dense
model beside it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from omegaconf import DictConfig
from torch import nn


class Healer(ABC):
    needs_teacher: bool = False

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module | None
    ) -> torch.Tensor:
        """The mean loss of one micro-batch: `batch["input_ids"]` (windows × seq_len) and whatever
        else the windows carry (a cached teacher's targets)."""


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's prediction of the next token, in float32."""
    predicted = logits[:, :-1].float()
    return nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids[:, 1:].reshape(-1))
