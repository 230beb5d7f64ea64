"""Shared float64 linear algebra: truncated SVD, activation-weighted errors."""

from __future__ import annotations

import torch

from .errors import NumericalError


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` factors of `w` in float64, plus all singular values (for spectra).

    Returns (left, right, singular_values) with w ≈ left @ right, left = U_r Σ_r, right = V_rᵀ.
    """
    w64 = w.detach().to(torch.float64)
    if not torch.isfinite(w64).all():
        raise NumericalError("non-finite weights given to SVD")
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank], s


def output_error(delta: torch.Tensor, weight: torch.Tensor, moment: torch.Tensor) -> float:
    """Relative output error ‖ΔX‖/‖WX‖ over calibration inputs with second moment E[xxᵀ].

    ‖ΔX‖²_F = tr(Δ C Δᵀ), so no activation matrix is needed.
    """
    d = delta.to(torch.float64)
    w = weight.to(torch.float64)
    c = moment.to(torch.float64)
    num = torch.einsum("ij,jk,ik->", d, c, d).clamp_min(0)
    den = torch.einsum("ij,jk,ik->", w, c, w)
    if den <= 0:
        return float("nan")
    return float((num / den).sqrt())
