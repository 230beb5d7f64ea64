"""Wanda (Sun et al., 2024): prune by |weight| · input norm, per output row, no weight update."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from . import SPARSIFIERS
from .base import Pruned, Sparsifier
from .patterns import nm_pattern


def wanda(
    weight: torch.Tensor, gram: torch.Tensor, fraction: float, pattern: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al., 2024): score |Wᵢⱼ|·‖Xⱼ‖ and drop, in each output row, the lowest `fraction`
    of its weights (or all but N of every M consecutive inputs); no update of the rest."""
    w = weight.detach().to(torch.float64)
    norms = torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()
    score = w.abs() * norms[None, :]
    rows, n = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    if pattern is None:
        cut = int(n * fraction)
        if cut:
            dropped = score.topk(cut, dim=1, largest=False).indices
            keep.scatter_(1, dropped, False)
    else:
        kept_n, m = pattern
        groups = score.view(rows, n // m, m)
        dropped = groups.topk(m - kept_n, dim=2, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, dropped, False).view(rows, n)
    return w * keep, keep


@SPARSIFIERS.register("wanda")
class Wanda(Sparsifier):
    def sparsify(self, weight: torch.Tensor, gram: torch.Tensor, sparsity: DictConfig, where: str) -> Pruned:
        return wanda(weight, gram, float(sparsity.fraction), nm_pattern(str(sparsity.pattern)))
