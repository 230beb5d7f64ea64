"""SparseGPT (Frantar & Alistarh, 2023): prune column by column, each removed weight's error
spread over the columns not yet visited through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ..linalg.hessian import inverse_hessian_factor
from . import SPARSIFIERS
from .base import Pruned, Sparsifier
from .patterns import nm_pattern


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    fraction: float,
    pattern: tuple[int, int] | None,
    dampening: float = 0.01,
    block: int = 128,
    where: str = "a linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023, Alg. 1): per block of `block` columns choose the mask
    by the OBS saliency w²/[H⁻¹]ᵢᵢ² (a `fraction` of the block's weights, or N:M within every M
    consecutive columns of each row), then zero the pruned weights column by column, spreading
    each column's error over the later columns as GPTQ does. Returns (pruned weight, keep mask)."""
    w = weight.detach().to(torch.float64).clone()
    rows, n = w.shape
    u, dead = inverse_hessian_factor(gram, dampening, where)
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype, device=w.device)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        if pattern is None:
            saliency = w1**2 / d[None, :] ** 2
            cut = int(saliency.numel() * fraction)
            if cut:
                threshold = saliency.flatten().kthvalue(cut).values
                keep[:, i1:i2] = saliency > threshold
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                span = slice(i, min(i + pattern[1], i2 - i1))
                saliency = w1[:, span] ** 2 / d[span][None, :] ** 2
                dropped = saliency.topk(pattern[1] - pattern[0], dim=1, largest=False).indices
                block_keep = torch.ones_like(saliency, dtype=torch.bool).scatter_(1, dropped, False)
                keep[:, i1 + span.start : i1 + span.stop] = block_keep
            column = w1[:, i] * keep[:, i1 + i]
            e = (w1[:, i] - column) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = column
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w * keep, keep


@SPARSIFIERS.register("sparsegpt")
class SparseGpt(Sparsifier):
    def sparsify(self, weight: torch.Tensor, gram: torch.Tensor, sparsity: DictConfig, where: str) -> Pruned:
        return sparsegpt(
            weight, gram, float(sparsity.fraction), nm_pattern(str(sparsity.pattern)),
            float(sparsity.dampening), where=where,
        )  # fmt: skip
