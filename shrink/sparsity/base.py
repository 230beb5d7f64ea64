"""What a sparsifier is: given one linear's weight and input moment, a pruned weight and its mask."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from omegaconf import DictConfig

Pruned = tuple[torch.Tensor, torch.Tensor]  # (pruned weight, keep mask)


class Sparsifier(ABC):
    """A sparsity step (`sparsity=<name>`), registered with `@SPARSIFIERS.register(name)`; its keys
    are `SparsityConf`'s."""

    def check(self, sparsity: DictConfig) -> None:  # noqa: B027  (optional: most have nothing to add)
        """Checks of its own, before anything loads (after the keys every sparsifier shares)."""

    @abstractmethod
    def sparsify(self, weight: torch.Tensor, gram: torch.Tensor, sparsity: DictConfig, where: str) -> Pruned:
        """The pruned weight (float64) and its keep mask, under `sparsity.pattern` (N:M or unstructured)."""
