"""The fold's ridge chosen from the calibration data: K-fold cross-validation over calibration
windows, in closed form from the streamed moments.

A fold refits the next layer on the kept columns, T_D = (G_JJ + λI)⁻¹ G_JD. Fitted on all windows
but one part and scored on that part, its output error is

    tr(W_D H_DD W_Dᵀ) − 2 tr(W_D H_DJ V) + tr(Vᵀ H_JJ V),   V = T_D W_Dᵀ,

with H the held-aside part's Gram and W_D the next layer's columns of the dropped units. In the
eigenbasis of the fitting part's A_JJ = U diag(s) Uᵀ every λ is a diagonal scaling
d = 1/(s + λ): with B = Uᵀ A_JD W_Dᵀ, C = Uᵀ H_JD W_Dᵀ and P = Uᵀ H_JJ U, the error is
const − 2 Σᵢ dᵢ (C∘B)ᵢ· + dᵀ (P ∘ BBᵀ) d, so a whole grid of λ costs one eigendecomposition per
part. Only moments are needed, never the activations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# λ / mean(diag G_JJ) tried, as `method.ridge` is given (1e-2 is the fixed default)
RIDGE_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


class RidgeChoice(NamedTuple):
    ridge: float  # the relative ridge with the least held-aside error
    errors: list[float]  # held-aside output error per grid value, relative to the dropped energy


def cross_validated_ridge(
    parts: list[torch.Tensor],
    keep: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> RidgeChoice:
    """The relative ridge of `grid` whose fold, fitted on all `parts` but one, reconstructs the
    output of the dropped columns on the part left out best, summed over the parts. `parts` are
    the Grams ZᵀZ of disjoint groups of calibration windows; `weight` is the next layer's
    (out × in), whose columns weigh each input's error by where it goes."""
    d = parts[0].shape[0]
    dropped = torch.ones(d, dtype=torch.bool, device=parts[0].device)
    dropped[keep] = False
    drop = dropped.nonzero().flatten()
    if len(drop) == 0 or len(parts) < 2:
        raise ValueError("cross-validating a fold needs dropped columns and at least two parts")
    w_d = weight.to(torch.float64)[:, drop]
    rows = [part[keep] for part in parts]  # each part's kept rows, read once
    part_jj = [r[:, keep] for r in rows]
    part_jd = [r[:, drop] @ w_d.T for r in rows]
    total_jj, total_jd = sum(part_jj), sum(part_jd)
    errors = torch.zeros(len(grid), dtype=torch.float64)
    energy = 0.0
    for part, h_jj, h_jd in zip(parts, part_jj, part_jd, strict=True):
        a_jj = total_jj - h_jj
        scale = float(torch.diagonal(a_jj).mean().clamp_min(1e-300))
        s, u = torch.linalg.eigh(a_jj)
        b = u.T @ (total_jd - h_jd)
        quadratic = (u.T @ h_jj @ u) * (b @ b.T)
        linear = ((u.T @ h_jd) * b).sum(1)
        const = float(((w_d @ part[drop][:, drop]) * w_d).sum())
        energy += const
        s = s.clamp_min(0)
        for i, r in enumerate(grid):
            inv = 1.0 / (s + r * scale)
            errors[i] += const - 2 * float(inv @ linear) + float(inv @ quadratic @ inv)
    rel = (errors / max(energy, 1e-300)).tolist()
    best = min(range(len(grid)), key=lambda i: rel[i])
    return RidgeChoice(grid[best], rel)
