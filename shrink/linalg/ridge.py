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

from collections.abc import Callable
from typing import NamedTuple

import scipy.linalg
import torch

# λ / mean(diag G_JJ) tried, as `method.ridge` is given (1e-2 is the fixed default)
RIDGE_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


class RidgeChoice(NamedTuple):
    ridge: float  # the relative ridge with the least held-aside error
    errors: list[float]  # held-aside output error per grid value, relative to the dropped energy


class HeldAside(NamedTuple):
    """What cross-validation reads of one group's Gram H: H_JJ, H_JD W_Dᵀ and tr(W_D H_DD W_Dᵀ)."""

    jj: torch.Tensor
    jd: torch.Tensor
    const: float


# rows `index` of group `group`'s Gram (SecondMoment.part_rows)
PartRows = Callable[[int, torch.Tensor], torch.Tensor]


def held_aside_pieces(
    part_rows: PartRows, groups: int, keep: torch.Tensor, weight: torch.Tensor, chunk: int = 1024
) -> list[HeldAside]:
    """Each group's pieces, read `chunk` rows at a time: a wide FFN's parts are never copied whole
    (at 11008 wide a part is 1 GB, the pieces of half of it kept about 0.4 GB)."""
    d = weight.shape[1]
    dropped = torch.ones(d, dtype=torch.bool, device=keep.device)
    dropped[keep] = False
    drop = dropped.nonzero().flatten()
    if len(drop) == 0 or groups < 2:
        raise ValueError("cross-validating a fold needs dropped columns and at least two parts")
    w_d = weight.to(torch.float64)[:, drop]
    pieces = []
    for group in range(groups):
        jj = torch.empty(len(keep), len(keep), dtype=torch.float64, device=w_d.device)
        jd = torch.empty(len(keep), w_d.shape[0], dtype=torch.float64, device=w_d.device)
        for start in range(0, len(keep), chunk):
            rows = part_rows(group, keep[start : start + chunk])
            jj[start : start + len(rows)] = rows[:, keep]
            jd[start : start + len(rows)] = rows[:, drop] @ w_d.T
        const = 0.0
        for start in range(0, len(drop), chunk):  # tr(W_D H_DD W_Dᵀ), a slab of H_DD at a time
            rows = part_rows(group, drop[start : start + chunk])[:, drop]
            const += float(((rows @ w_d.T) * w_d[:, start : start + chunk].T).sum())
        pieces.append(HeldAside(jj, jd, const))
    return pieces


def ridge_from_pieces(
    pieces: list[HeldAside], grid: tuple[float, ...] = RIDGE_GRID, chunk: int = 1024
) -> RidgeChoice:
    """The relative ridge of `grid` whose fold, fitted on all groups but one, reconstructs the
    output of the dropped columns on the group left out best, summed over the groups. The
    quadratic term P ∘ BBᵀ is formed `chunk` rows at a time, so beside the pieces only the
    eigenvectors, B and one slab are alive (at half of an 11008-wide FFN, 0.7 GB less than whole)."""
    errors = torch.zeros(len(grid), dtype=torch.float64)
    energy = sum(p.const for p in pieces)
    for held in pieces:
        a_jj = sum(p.jj for p in pieces if p is not held)
        scale = float(torch.diagonal(a_jj).mean().clamp_min(1e-300))
        s, u = _eigh_in_place(a_jj)
        del a_jj
        b = u.T @ sum(p.jd for p in pieces if p is not held)
        linear = ((u.T @ held.jd) * b).sum(1)
        ridges = torch.tensor(grid, dtype=torch.float64, device=s.device) * scale
        inv = 1.0 / (s.clamp_min(0)[:, None] + ridges)  # one column per λ of the grid
        quadratic = torch.zeros(len(grid), dtype=torch.float64, device=s.device)
        for start in range(0, len(s), chunk):  # Σ over row slabs of dᵀ (P ∘ BBᵀ)[slab] d
            rows = slice(start, start + chunk)
            slab = (u[:, rows].T @ held.jj) @ u
            slab.mul_(b[rows] @ b.T)
            quadratic += ((slab @ inv) * inv[rows]).sum(0)
        del u, b
        errors += (held.const - 2 * (linear @ inv) + quadratic).cpu()
    rel = (errors / max(energy, 1e-300)).tolist()
    best = min(range(len(grid)), key=lambda i: rel[i])
    return RidgeChoice(grid[best], rel)


def _eigh_in_place(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix the caller gives up: on a CPU, LAPACK's
    MRRR driver (`dsyevr`) factors it in place with O(n) workspace, where `torch.linalg.eigh`'s
    divide and conquer needs two more n×n matrices (1 GB at half of an 11008-wide FFN)."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    values, vectors = scipy.linalg.eigh(
        matrix.T.numpy(), overwrite_a=True, driver="evr", check_finite=False
    )  # the transpose is the same symmetric matrix in the column order LAPACK factors in place
    return torch.from_numpy(values), torch.from_numpy(vectors)


def cross_validated_ridge(
    parts: list[torch.Tensor],
    keep: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> RidgeChoice:
    """The cross-validated ridge from explicit Grams ZᵀZ of disjoint groups of calibration
    windows; `weight` is the next layer's (out × in), whose columns weigh each input's error by
    where it goes."""
    pieces = held_aside_pieces(lambda group, index: parts[group][index], len(parts), keep, weight)
    return ridge_from_pieces(pieces, grid)
