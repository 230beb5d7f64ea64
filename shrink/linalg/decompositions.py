"""Shared float64 linear algebra: truncated SVD, activation-weighted errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from scipy.linalg import lapack

from ..errors import NumericalError
from .moments import CrossMoment, SecondMoment


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` factors of `w` in float64, plus all singular values (for spectra).

    Returns (left, right, singular_values) with w ≈ left @ right, left = U_r Σ_r, right = V_rᵀ.
    """
    w64 = w.detach().to(torch.float64)
    if not torch.isfinite(w64).all():
        raise NumericalError("non-finite weights given to SVD")
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank], s


def _trace_form(left: torch.Tensor, moment: torch.Tensor | SecondMoment) -> torch.Tensor:
    """tr(L C Lᵀ); from a SecondMoment's XᵀX by row slabs (also while it is set aside)."""
    if isinstance(moment, SecondMoment):
        return moment.quadratic_form(left)
    return torch.einsum("ij,jk,ik->", left, moment.to(torch.float64), left)


def output_error(delta: torch.Tensor, weight: torch.Tensor, moment: torch.Tensor | SecondMoment) -> float:
    """Relative output error ‖ΔX‖/‖WX‖ over calibration inputs with second moment E[xxᵀ] (or any
    multiple of it, such as a SecondMoment's XᵀX: the ratio does not change).

    ‖ΔX‖²_F = tr(Δ C Δᵀ), so no activation matrix is needed.
    """
    d = delta.to(torch.float64)
    w = weight.to(torch.float64)
    num = _trace_form(d, moment).clamp_min(0)
    den = _trace_form(w, moment)
    if den <= 0:
        return float("nan")
    return float((num / den).sqrt())


def affine_output_error(
    delta: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor,
    moment: torch.Tensor | SecondMoment,
    mean: torch.Tensor,
    scale: float = 1.0,
) -> float:
    """Relative output error ‖ΔX + δ1ᵀ‖/‖WX‖ when the bias moves by δ too (centred factorisations):
    E‖Δx + δ‖² = tr(Δ C Δᵀ) + 2 δᵀΔμ + ‖δ‖² with C = scale·`moment` = E[xxᵀ], μ = E[x]."""
    if shift is None:
        return output_error(delta, weight, moment)
    d, mu, sh = (t.to(torch.float64) for t in (delta, mean, shift))
    w = weight.to(torch.float64)
    num = (scale * _trace_form(d, moment) + 2 * sh @ (d @ mu) + sh @ sh).clamp_min(0)
    den = scale * _trace_form(w, moment)
    return float((num / den).sqrt()) if den > 0 else float("nan")


def _ridged_cholesky(
    matrix: torch.Tensor, ridge: float, start: float, limit: float, what: str, owned: bool = False
) -> tuple[torch.Tensor, float, float]:
    """Cholesky factor of A + λI, λ = ridge·mean(diag A), with the ridge raised tenfold (from
    `start` when it is 0) while A + λI is not positive definite, up to `limit`·mean(diag).
    Returns the factor, the relative ridge used and mean(diag A). `owned`: the caller gives A up,
    so λ is added to its own diagonal (and taken off again) instead of to a copy.
    """
    scale = float(torch.diagonal(matrix).mean().clamp_min(1e-300))
    diagonal = torch.diagonal(matrix).clone()
    shifted = matrix if owned else matrix.clone()
    jitter = ridge
    while True:
        shifted.diagonal().copy_(diagonal).add_(jitter * scale)  # A + λI without an identity beside it
        chol, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            if owned:  # A is left as it was given
                matrix.diagonal().copy_(diagonal)
            return chol, jitter, scale
        jitter = max(jitter * 10, start)
        if jitter > limit:
            raise NumericalError(f"{what} is not positive definite even with a ridge of {limit:g}·mean(diag)")


def whitening(moment: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """Lower-triangular S with S Sᵀ = C + λI, λ = ridge·mean(diag C), raised tenfold (from 1e-10 when
    ridge is 0) until the Cholesky succeeds. Returns S and the λ/mean(diag) used."""
    chol, jitter, _ = _ridged_cholesky(moment.to(torch.float64), ridge, 1e-10, 1.0, "input second moment")
    return chol, jitter


def _all_finite(matrix: torch.Tensor, width: int = 256) -> bool:
    """Whether every entry is finite, checked `width` columns (or rows) at a time along the
    matrix's storage order: `isfinite` of the whole matrix builds a temporary as large as it
    (1 GB at 11008 wide in float64) besides its mask."""
    by_columns = matrix.dim() == 2 and matrix.stride(0) == 1 and matrix.stride(1) != 1
    slabs = matrix.T if by_columns else matrix
    return all(bool(torch.isfinite(slabs[i : i + width]).all()) for i in range(0, slabs.shape[0], width))


class Pivots(NamedTuple):
    """A greedy ID selection: what was picked, in order, and what each pick left behind."""

    order: torch.Tensor | list[int]  # columns (or column blocks) in selection order
    r_diag: torch.Tensor  # |R_jj| of each pick (block: residual norm of the block when picked)
    remaining: torch.Tensor  # ‖Z − P_J Z‖²_F before any pick and after each one (length picks+1)


def pivoted_cholesky(gram: torch.Tensor, k: int, rtol: float = 1e-12, consume: bool = False) -> Pivots:
    """Greedy column selection of the ID from the Gram matrix G = ZᵀZ.

    Picking, at each step, the column with the largest residual after projection onto the chosen
    ones is QR with column pivoting of Z, computed from G alone (pivoted Cholesky), so no
    activation matrix is needed. LAPACK's blocked `dpstrf` runs exactly this greedy rule (the
    largest remaining diagonal of the Schur complement). Returns the first `k` pivots in selection
    order, |R_jj| of each (the residual norm of that column when it was chosen), and the trace of
    the Schur complement before any pick and after each one, which is exactly the squared
    Frobenius error of the ID that keeps the first picks (the greedy schedule uses it). Columns
    already in the span of the chosen ones (residual ≤ rtol·max diag) follow in order of their
    residual, with |R_jj| = 0. `consume`: LAPACK may factor `gram` in place when it is a float64
    CPU matrix in column-major order (`column_major`), the caller's temporary, whose copy would be
    the largest allocation of a wide FFN (1 GB at 11008).
    """
    g = gram.detach().to("cpu", torch.float64)
    n = g.shape[0]
    k = min(k, n)
    diag = torch.diagonal(g).clamp_min(0)
    floor = rtol * float(diag.max()) if n else 0.0
    if not _all_finite(g):
        raise NumericalError("non-finite Gram matrix given to the pivoted Cholesky")
    factor, piv, rank, info = lapack.dpstrf(g.numpy(), lower=1, tol=floor, overwrite_a=consume)
    if info < 0:
        raise NumericalError(f"LAPACK dpstrf rejected argument {-info}")
    rank = min(int(rank), k)
    permutation = torch.from_numpy(piv.astype("int64") - 1)
    order = permutation[:rank]
    lower = torch.from_numpy(factor).tril_()  # in place: the upper part still holds G's entries
    rows = permutation.argsort()  # the factor's rows in the original column order
    picked_at = torch.full((n,), n, dtype=torch.long)  # the step at which each column was picked
    picked_at[order] = torch.arange(rank)
    r_diag = torch.zeros(k, dtype=torch.float64)
    r_diag[:rank] = torch.diagonal(lower)[:rank]
    remaining = torch.empty(k + 1, dtype=torch.float64)
    remaining[0] = diag.sum()
    residual = diag.clone()
    for start in range(0, rank, 256):  # the traces after each pick, 256 picks at a time
        steps = torch.arange(start, min(start + 256, rank))
        squares = lower[:, start : start + len(steps)][rows] ** 2  # 256 columns gathered at a time
        left = residual[:, None] - torch.cumsum(squares, 1)
        left[picked_at[:, None] <= steps[None, :]] = 0  # chosen columns leave no residual
        remaining[steps + 1] = left.clamp_min(0).sum(0)
        residual = residual - squares.sum(1)
    residual = residual.clamp_min(0)
    residual[order] = -1.0
    rest = torch.sort(residual, descending=True, stable=True).indices[: k - rank]
    remaining[rank + 1 :] = remaining[rank] - torch.cumsum(residual[rest], 0)
    return Pivots(torch.cat([order, rest]), r_diag, remaining)


def column_major(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """An empty float64 matrix stored column by column (what LAPACK factors without a copy)."""
    return torch.empty_strided(shape, (1, shape[0]), dtype=torch.float64, device=like.device)


def pivoted_qr(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Columns chosen by QR with column pivoting (modified Gram–Schmidt) of an explicit matrix.

    Used on a Gaussian row sketch ΩZ as an independent check of `pivoted_cholesky`.
    """
    a = matrix.to(torch.float64).clone()
    chosen = torch.zeros(a.shape[1], dtype=torch.bool)
    pivots = []
    for _ in range(min(k, a.shape[1])):
        norms = (a * a).sum(0)
        norms[chosen] = -1.0
        j = int(norms.argmax())
        pivots.append(j)
        chosen[j] = True
        q = a[:, j] / a[:, j].norm().clamp_min(1e-300)
        a -= torch.outer(q, q @ a)
    return torch.tensor(pivots, dtype=torch.long)


def interpolation_matrix(gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """T (k × n) with Z ≈ Z[:, keep] T by ridge regression: T = (G[J,J] + λI)⁻¹ G[J,:], T[:, J] = I.

    λ = `ridge`·mean(diag G[J,J]). Without it, a nearly collinear kept set (heads of one KV group
    standing in for a dropped group) gets coefficients in the hundreds that fit the calibration
    tokens and blow up on new text; 1e-2 costs < 0.5% of calibration error (README, id). When
    G[J,J] + λI is still not positive definite λ is raised tenfold, up to 10·mean(diag).
    """
    return _interpolation_from_rows(gram.to(torch.float64)[keep], keep, ridge)


def _interpolation_from_rows(
    rows: torch.Tensor, keep: torch.Tensor, ridge: float, chunk: int = 1024
) -> torch.Tensor:
    """`interpolation_matrix` from the kept rows G[J, :] alone, solved into `rows` itself (which
    the caller gives up) `chunk` columns at a time: at half of an 11008-wide FFN the system, its
    factor and a second |J| × d result would be 1 GB more."""
    system = rows[:, keep]
    chol = _ridged_cholesky(system, ridge, 1e-12, 10.0, "interpolation system", owned=True)[0]
    del system
    for start in range(0, rows.shape[1], chunk):
        rows[:, start : start + chunk] = torch.cholesky_solve(rows[:, start : start + chunk], chol)
    rows[:, keep] = torch.eye(len(keep), dtype=rows.dtype, device=rows.device)
    return rows


def _block_columns(
    g: torch.Tensor, factor: torch.Tensor, cols: torch.Tensor, floor: float
) -> torch.Tensor | None:
    """The Cholesky columns that a block of columns adds, all at once: with S = G[:, B] − F F[B]ᵀ
    (the Schur complement's columns) and L = chol(S[B, B]), they are S L⁻ᵀ, which is what adding
    the columns one by one gives when every pivot L_jj² stays above `floor`; None otherwise."""
    schur = g[:, cols] - factor @ factor[cols].T
    chol, info = torch.linalg.cholesky_ex(schur[cols])
    if int(info) != 0 or float(torch.diagonal(chol).min()) ** 2 <= floor:
        return None
    return torch.linalg.solve_triangular(chol, schur.T, upper=False).T


def unit_pivoted_cholesky(
    gram: torch.Tensor,
    units: torch.Tensor,
    count: int,
    eligible: Callable[[list[int]], torch.Tensor] | None = None,
    rtol: float = 1e-12,
) -> Pivots:
    """The ID's greedy selection over units of columns from G = ZᵀZ; `units` (n_units × size)
    holds each unit's column indices (disjoint; columns in no unit are never picked but their
    residual counts in the error).

    At each step the eligible unit with the largest residual energy (the squared Frobenius norm
    of what is left of it after projection onto every column chosen so far) is chosen and all its
    columns join the basis. `eligible(chosen)` returns a mask over units (constraints such as
    equal heads per KV group). Returns the chosen units in order, the residual norm of each when
    chosen, and the residual energy ‖Z − P_J Z‖²_F (over every column) before and after each pick.
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    units = units.to(g.device)
    n_units = units.shape[0]
    residual = torch.diagonal(g).clone().clamp_min(0)
    floor = rtol * float(residual.max().clamp_min(0)) if n else 0.0
    factor = torch.zeros(n, min(n, units.numel()), dtype=torch.float64, device=g.device)
    rank = 0
    chosen: list[int] = []
    scores, remaining = [], [float(residual.sum())]
    for _ in range(min(count, n_units)):
        energy = residual[units].sum(1)
        mask = eligible(chosen) if eligible is not None else torch.ones(n_units, dtype=torch.bool)
        mask[chosen] = False
        if not bool(mask.any()):
            break
        energy = torch.where(mask.to(energy.device), energy, torch.full_like(energy, -float("inf")))
        b = int(energy.argmax())
        chosen.append(b)
        scores.append(float(energy[b].clamp_min(0).sqrt()))
        cols = units[b]
        added = _block_columns(g, factor[:, :rank], cols, float(floor))
        if added is None:  # some column of the unit is (nearly) in the span: one at a time
            for j in cols.tolist():
                if residual[j] <= floor:
                    continue
                column = (g[:, j] - factor[:, :rank] @ factor[j, :rank]) / residual[j].sqrt()
                factor[:, rank] = column
                rank += 1
                residual = (residual - column**2).clamp_min(0)
                residual[j] = 0
        else:
            factor[:, rank : rank + added.shape[1]] = added
            rank += added.shape[1]
            residual = (residual - (added**2).sum(1)).clamp_min(0)
        residual[cols] = 0
        remaining.append(float(residual.sum()))
    return Pivots(
        chosen, torch.tensor(scores, dtype=torch.float64), torch.tensor(remaining, dtype=torch.float64)
    )


def block_pivoted_cholesky(
    gram: torch.Tensor,
    block_size: int,
    count: int,
    eligible: Callable[[list[int]], torch.Tensor] | None = None,
    rtol: float = 1e-12,
) -> Pivots:
    """`unit_pivoted_cholesky` over contiguous blocks of `block_size` columns (attention heads)."""
    n = gram.shape[0]
    units = torch.arange(n - n % block_size).view(-1, block_size)
    return unit_pivoted_cholesky(gram, units, count, eligible, rtol)


def balanced(groups: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
    """Eligibility that picks units in rounds: only units of the groups with the fewest picks so
    far, so that after r·(number of groups) picks every group holds exactly r (nested in r)."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0

    def eligible(chosen: list[int]) -> torch.Tensor:
        counts = (
            torch.bincount(groups[chosen], minlength=n_groups)
            if chosen
            else torch.zeros(n_groups, dtype=torch.long)
        )
        return counts[groups] == counts.min()

    return eligible


class Fold(NamedTuple):
    """Z_target ≈ Z[:, keep] T + 1 bᵀ: the interpolation T (k × n) and the shift b (n; None for a
    linear fold). The next layer W (out × n) becomes W Tᵀ (out × k) with bias W b added."""

    t: torch.Tensor
    shift: torch.Tensor | None


def _ridge_solve(
    system: torch.Tensor, rhs: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """(A + λI)⁻¹ (B + λ P) with λ = ridge·mean(diag A), raised tenfold until A + λI is positive
    definite: the ridge solution shrunk towards `prior` P (towards 0 when None)."""
    chol, jitter, scale = _ridged_cholesky(system, ridge, 1e-12, 10.0, "interpolation system")
    if prior is not None:
        rhs = rhs + jitter * scale * prior
    return torch.cholesky_solve(rhs, chol)


def fold(
    stats: SecondMoment, keep: torch.Tensor, ridge: float, affine: bool, cross: CrossMoment | None = None
) -> Fold:
    """The least-squares fold of the dropped columns into the kept ones, from streamed moments.

    x is what the edited block reads (`stats`), y the target: x itself, or with `cross` the dense
    model's activations at the same site on the same tokens (the fold then also corrects the error
    that earlier blocks left in x). Linear: T = (XⱼᵀXⱼ + λI)⁻¹ XⱼᵀY, and against dense targets
    T = (XⱼᵀXⱼ + λI)⁻¹ (XⱼᵀY + λE) with E the selection of the kept columns: the ridge pulls the
    kept columns towards passing through, not towards 0 (which would silence low-variance kept
    units), so with y = x it is exactly the plain fold. Affine (`affine`): the same on
    centred moments, and b = E[y] − Tᵀ E[xⱼ], so the fold also carries the mean of what is dropped
    (bias compensation). Kept columns pass through unchanged (T[:, keep] = I) only when the target
    is x itself; against dense targets they are refitted too.
    """
    n = stats.count
    rows = stats.rows(keep)  # only the kept rows of XᵀX are read (it may be set aside)
    mx = stats.mean()
    my = mx if cross is None else cross.sum_y / max(cross.count, 1)
    if affine:
        rows = rows / n - torch.outer(mx[keep], mx)
    if cross is None:
        t = _interpolation_from_rows(rows, keep, ridge)
    else:  # shrunk towards passing the kept columns through, so that it is STAT's fold when y = x
        gxy = cross.xty[keep] / n - torch.outer(mx[keep], my) if affine else cross.xty[keep]
        selection = torch.zeros(len(keep), rows.shape[1], dtype=rows.dtype, device=rows.device)
        selection[torch.arange(len(keep)), keep] = 1.0
        t = _ridge_solve(rows[:, keep], gxy, ridge, prior=selection)
    shift = my - t.T @ mx[keep] if affine else None
    return Fold(t, shift)


def refit_left(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, cross: CrossMoment, ridge: float
) -> torch.Tensor:
    """The left factor refitted against dense targets (SVD-LLM's closed-form update of one factor):
    with the right factor R fixed, L = argmin E‖W y − L R x‖² + λ‖L − L₀‖², i.e.
    Lᵀ = (R XᵀX Rᵀ + λI)⁻¹ (R XᵀY Wᵀ + λ L₀ᵀ), x the compressed model's input, y the dense one's.
    When y = x and L₀ is already the least-squares factor for R (rom's and svdllm's are), it
    returns L₀: only the error from the blocks below is corrected."""
    w, r = weight.to(torch.float64), right.to(torch.float64)
    system = r @ cross.x.xtx @ r.T
    rhs = r @ cross.xty @ w.T
    return _ridge_solve(system, rhs, ridge, prior=left.to(torch.float64).T).T


def fold_error(
    weight: torch.Tensor,
    folded: torch.Tensor,
    keep: torch.Tensor,
    shift: torch.Tensor | None,
    stats: SecondMoment,
    cross: CrossMoment | None = None,
) -> float:
    """Relative output error E‖W' xⱼ + W b − W y‖² / E‖W y‖² of the folded layer W' = W Tᵀ (with
    its added bias W b) against the layer on its target y (x itself, or the dense activations)."""
    w = weight.to(torch.float64)
    c = w @ shift if shift is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if cross is None:  # the target is the layer's own input: the error of the edited layer
        delta = w.clone()
        delta[:, keep] -= folded.to(torch.float64)
        # E[xxᵀ] as Σxxᵀ scaled inside, read by row slabs: no d×d copy (1 GB at 11008 wide)
        moved = -c if shift is not None else None
        return affine_output_error(delta, moved, w, stats, stats.mean(), 1.0 / stats.count)
    a = torch.zeros_like(w)
    a[:, keep] = folded.to(torch.float64)
    n = stats.count
    mx = stats.mean()  # XᵀX itself is read by row slabs (it may be set aside)
    gxy, gyy, my = cross.xty / n, cross.yty / n, cross.sum_y / n
    num = (
        stats.quadratic_form(a) / n
        - 2 * torch.einsum("ij,jk,ik->", a, gxy, w)
        + torch.einsum("ij,jk,ik->", w, gyy, w)
        + 2 * c @ (a @ mx - w @ my)
        + c @ c
    ).clamp_min(0)
    den = torch.einsum("ij,jk,ik->", w, gyy, w)
    return float((num / den).sqrt()) if den > 0 else float("nan")
