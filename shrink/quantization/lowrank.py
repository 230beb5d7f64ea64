"""A low-rank correction of a compressed layer's error, fitted on its calibration inputs (SLiM)."""

from __future__ import annotations

import torch

from ..linalg.decompositions import truncated_svd, whitening


def lowrank_correction(
    error: torch.Tensor, gram: torch.Tensor, rank: int, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiM's low-rank adapter of a compressed layer's error E = W − Ŵ (Mozaffari et al., 2025),
    in its optimal form: the rank-r LR that minimizes ‖X(E − LR)ᵀ‖, the truncated SVD of E·S with
    SSᵀ = XᵀX (+ a small ridge), mapped back by S⁻¹ (SLiM scales by input norms, the diagonal of
    this). Returns (L: out × r, R: r × in)."""
    whiten, _ = whitening(gram, ridge)
    left, right, _ = truncated_svd(error.to(torch.float64) @ whiten, rank)
    right = torch.linalg.solve_triangular(whiten.T, right.T, upper=True).T
    return left, right
