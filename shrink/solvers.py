"""The per-linear solvers of the sparsity and quantization steps: round-to-nearest,
GPTQ, SparseGPT and Wanda, on a layer's weight and the Gram matrix XᵀX of its calibration inputs
(the Hessian of the layer-wise objective ‖WX − ŴX‖²), in float64."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import NumericalError
from .linalg import truncated_svd, whitening


class Grid(NamedTuple):
    """A uniform integer grid per output row and group of `group_size` input columns (the last
    group may be shorter): w ≈ (q − zero)·scale with q in [qmin, qmax], the signed range of `bits`
    (symmetric grids have zero = 0), the convention compressed-tensors stores."""

    scale: torch.Tensor  # out × groups
    zero: torch.Tensor  # out × groups, integer-valued
    bits: int
    group_size: int

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def columns(self, n: int) -> torch.Tensor:
        """The group of each of `n` input columns."""
        return torch.arange(n, device=self.scale.device) // self.group_size


def grid_for(
    w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype | None = None, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (out × columns of one group), from its range with 0 included;
    with `scale_dtype` the scale is rounded to what the checkpoint stores, so the weights are
    quantized on exactly the grid that is saved (and dequantize bit-exactly on load). With `clip`
    each row's range is shrunk by the factor among 1, 0.99, …, 0.21 whose grid rounds the row
    with the least Σ|q(w) − w|^2.4 (the grid search of GPTQ's reference quantizer, `mse` in
    GPTAQ's): a few clipped outliers buy a finer grid for the rest."""
    lo = w.min(dim=1).values.clamp_max(0)
    hi = w.max(dim=1).values.clamp_min(0)
    scale, zero = _grid_of(lo, hi, bits, sym, scale_dtype)
    if not clip:
        return scale, zero
    best = _rounding_error(w, scale, zero, bits)
    for step in range(1, 80):
        shrink = 1 - step / 100
        candidate = _grid_of(lo * shrink, hi * shrink, bits, sym, scale_dtype)
        error = _rounding_error(w, *candidate, bits)
        better = error < best
        scale, zero = torch.where(better, candidate[0], scale), torch.where(better, candidate[1], zero)
        best = torch.where(better, error, best)
    return scale, zero


def _grid_of(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2) if sym else (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
    if scale_dtype is not None:
        stored = scale.to(scale_dtype)
        scale = torch.where(stored > 0, stored, torch.finfo(scale_dtype).tiny).to(scale.dtype)
    zero = (qmin - lo / scale).round().clamp(qmin, qmax) if not sym else torch.zeros_like(scale)
    return scale, zero


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (quantize(w, scale[:, None], zero[:, None], bits) - w).abs().pow(2.4).sum(dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The grid point nearest to each entry of `w` (broadcasting scale and zero), dequantized."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return ((w / scale).round() + zero).clamp(qmin, qmax).sub(zero).mul(scale)


def _groups(n: int, group_size: int) -> int:
    return n if group_size <= 0 else group_size


def rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype | None = None,
    clip: bool = False,
) -> tuple[torch.Tensor, Grid]:
    """Round-to-nearest: each group's grid from its own range (searched, with `clip`: see
    `grid_for`), every weight to its nearest point."""
    w = weight.detach().to(torch.float64)
    gs = _groups(w.shape[1], group_size)
    scales, zeros, out = [], [], torch.empty_like(w)
    for c in range(0, w.shape[1], gs):
        scale, zero = grid_for(w[:, c : c + gs], bits, sym, scale_dtype, clip)
        out[:, c : c + gs] = quantize(w[:, c : c + gs], scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    return out, Grid(torch.stack(scales, 1), torch.stack(zeros, 1), bits, gs)


def _damped_hessian(gram: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + δI, δ = `dampening`·mean diag H (GPTQ's damping), with the diagonal of dead inputs
    (never nonzero on the calibration tokens) set to 1; and their mask."""
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += dampening * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead


def _damped_cholesky(gram: torch.Tensor, dampening: float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of the damped Hessian (`_damped_hessian`); and the dead inputs' mask."""
    h, dead = _damped_hessian(gram, dampening)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise NumericalError(f"{where}: the damped Hessian is not positive definite; raise dampening")
    return factor, dead


def _inverse_hessian_factor(
    gram: torch.Tensor, dampening: float, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's U with UᵀU = (H + δI)⁻¹ (upper Cholesky factor of the damped inverse), H = XᵀX / n
    from the streamed moment; and the mask of dead inputs, whose weights are zeroed."""
    factor, dead = _damped_cholesky(gram, dampening, where)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead


def gptq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    dampening: float = 0.01,
    keep: torch.Tensor | None = None,
    block: int = 128,
    where: str = "a linear",
    scale_dtype: torch.dtype | None = None,
    asymmetry: torch.Tensor | None = None,
    alpha: float = 0.25,
    clip: bool = False,
    fixed: Grid | None = None,
) -> tuple[torch.Tensor, Grid]:
    """GPTQ (Frantar et al., 2023, Alg. 1): quantize one input column at a time and spread its
    rounding error over the columns not yet quantized, in proportion to the inverse Hessian's row
    (the optimal update of the layer-wise objective ‖WX − QX‖², H = XᵀX), in lazy blocks of
    `block` columns. `act_order` visits columns by decreasing H diagonal, with each group's grid
    fixed from the weights before any update (static groups, so the stored layout stays
    contiguous). `keep` (a 0/1 mask from a sparsity step) holds pruned weights at zero.
    `scale_dtype`, `clip`: as in `grid_for`; `fixed`: quantize on this grid instead.

    With `asymmetry` = ΔXᵀX̃ (ΔX = X − X̃, X the dense model's inputs, X̃ the compressed model's,
    whose Gram matrix `gram` is), GPTAQ (Li et al., 2025): the objective becomes ‖QX̃ − WX‖², and
    each column w_i, as it is quantized, also moves the later columns by w_i·P_i,>i with
    P = α·triu₁(ΔXᵀX̃·Uᵀ)·U (UᵀU = H̃⁻¹): the part of its own input shift w_i·Δx_i that the later
    columns can still take up. α (`alpha`, the authors' code uses 0.25) scales that term; α = 1
    takes all of it (still short of the least-squares target: the columns already rounded keep
    their share)."""
    w = weight.detach().to(torch.float64).clone()
    rows, n = w.shape
    gs = _groups(n, group_size)
    gram = gram.to(torch.float64)
    order = torch.argsort(torch.diagonal(gram), descending=True) if act_order else torch.arange(n)
    order = order.to(w.device)
    u, dead = _inverse_hessian_factor(gram[order][:, order], dampening, where)
    w[:, order[dead]] = 0
    shift = None
    if asymmetry is not None:
        a = asymmetry.to(torch.float64)[order][:, order]
        a[:, dead] = 0
        shift = alpha * torch.triu(a @ u.T, diagonal=1) @ u
    n_groups = -(-n // gs)
    scales = torch.zeros(rows, n_groups, dtype=w.dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    ready = torch.zeros(n_groups, dtype=torch.bool)
    if fixed is not None:
        scales, zeros = fixed.scale.to(w.dtype).clone(), fixed.zero.to(w.dtype).clone()
        ready[:] = True
    elif act_order:  # static groups: every grid from the weights as they are
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid_for(w[:, g * gs : (g + 1) * gs], bits, sym, scale_dtype, clip)
        ready[:] = True
    w = w[:, order]
    mask = None if keep is None else keep.to(w.dtype)[:, order]
    q = torch.zeros_like(w)
    columns = order.tolist()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype, device=w.device)
        before = w1.clone() if shift is not None else None  # each column as it is quantized
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = columns[i1 + i] // gs
            if not ready[g]:  # the group's grid, from its columns as updated so far
                scales[:, g], zeros[:, g] = grid_for(
                    torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :gs], bits, sym, scale_dtype, clip
                )
                ready[g] = True
            column = quantize(w1[:, i], scales[:, g], zeros[:, g], bits)
            if mask is not None:
                column = column * mask[:, i1 + i]
            q[:, i1 + i] = column
            e = (w1[:, i] - column) / u1[i, i]
            if shift is not None:
                before[:, i] = w1[:, i]
                w1[:, i + 1 :] += w1[:, i : i + 1] * shift[i1 + i, i1 + i + 1 : i2][None, :]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
        if shift is not None:
            w[:, i2:] += before @ shift[i1:i2, i2:]
    if act_order:
        q = q[:, torch.argsort(order)]
    return q, Grid(scales, zeros, bits, gs)


def refit_scales(
    quantized: torch.Tensor,
    grid: Grid,
    target: torch.Tensor,
    gram: torch.Tensor,
    dampening: float,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, Grid]:
    """With GPTQ's integer codes c fixed, each row's group scales s refitted together to the
    least ‖X̃(Ŵ − T)ᵀ‖² (`target` T, H̃ = X̃ᵀX̃ damped as GPTQ damps it): a G × G least-squares
    system per row (G groups), M s = b with M_gh = c_gᵀH̃c_h and b_g = c_gᵀH̃t. The codes were
    chosen column by column against scales fixed beforehand (from the weights' ranges); these
    scales are the best the calibration inputs allow for those codes, in the layer objective, as
    llama.cpp's importance-weighted scale fits do with a diagonal H̃. A scale that would not be
    positive and finite (a group of zero codes, say) keeps its old value."""
    h, _ = _damped_hessian(gram, dampening)
    q = quantized.to(torch.float64)
    rows, n = q.shape
    groups = grid.columns(n).to(q.device)
    count = grid.scale.shape[1]
    old = grid.scale.to(torch.float64)
    codes = (q / old[:, groups]).round()
    system = torch.zeros(rows, count, count, dtype=q.dtype, device=q.device)
    for g in range(count):
        cols = (groups == g).nonzero().squeeze(1)
        system[:, :, g] = torch.zeros(rows, count, dtype=q.dtype, device=q.device).index_add_(
            1, groups, (codes[:, cols] @ h[cols]) * codes
        )
    rhs = torch.zeros(rows, count, dtype=q.dtype, device=q.device).index_add_(
        1, groups, (target.to(torch.float64) @ h) * codes
    )
    diagonal = torch.diagonal(system, dim1=1, dim2=2)
    ridge = 1e-6 * diagonal + 1e-12 * diagonal.mean(dim=1, keepdim=True).clamp_min(1e-30)
    scale = torch.linalg.solve(system + torch.diag_embed(ridge), (rhs + ridge * old).unsqueeze(-1))[..., 0]
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(torch.float64)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, old)
    return codes * scale[:, groups], Grid(scale, grid.zero, grid.bits, grid.group_size)


def gptq_refitted(
    weight: torch.Tensor,
    gram: torch.Tensor,
    target: torch.Tensor,
    rounds: int,
    dampening: float,
    scale_dtype: torch.dtype | None = None,
    where: str = "a linear",
    **settings,
) -> tuple[torch.Tensor, Grid]:
    """GPTQ (`settings` as `gptq` takes them, `weight` its input), then `rounds` times: the
    scales refitted to the codes (`refit_scales`, against `target`), and from the second round on
    GPTQ run again on the refitted grid first, so the codes follow the scales. The quantized
    weight with the least layer error ‖X̃(Ŵ − T)ᵀ‖² among them is returned: never worse than
    GPTQ's own."""
    settings |= {"dampening": dampening, "scale_dtype": scale_dtype, "where": where}
    quantized, grid = gptq(weight, gram, **settings)
    if rounds == 0:
        return quantized, grid
    t = target.to(torch.float64)
    h = gram.to(torch.float64)

    def error(q: torch.Tensor) -> float:
        d = q - t
        return float(torch.einsum("ij,jk,ik->", d, h, d))

    best = (error(quantized), quantized, grid)
    for round_ in range(rounds):
        if round_:
            quantized, grid = gptq(weight, gram, fixed=grid, **settings)
        quantized, grid = refit_scales(quantized, grid, t, gram, dampening, scale_dtype)
        if (e := error(quantized)) < best[0]:
            best = (e, quantized, grid)
    return best[1], best[2]


def asymmetric_target(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    dampening: float,
    alpha: float = 1.0,
    where: str = "a linear",
) -> torch.Tensor:
    """What GPTAQ's quantized weight stands in for: W* = W + α·W·ΔXᵀX̃·H̃⁻¹ (ΔXᵀX̃ = `cross` − H̃,
    `cross` = XᵀX̃, H̃ = X̃ᵀX̃ damped as GPTQ damps it). At α = 1 (and no damping) it is the
    least-squares solution of ‖X̃W*ᵀ − XWᵀ‖², which splits that objective into a constant plus
    ‖X̃(Q − W*)ᵀ‖²; the low-rank correction fits the error Q leaves against it."""
    factor, _ = _damped_cholesky(gram, dampening, where)
    w = weight.to(torch.float64)
    rhs = w @ (cross.to(torch.float64) - gram.to(torch.float64))
    return w + alpha * torch.cholesky_solve(rhs.T, factor).T


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


def nm_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an 'N:M' pattern (N kept of every M consecutive inputs), None for unstructured."""
    if pattern == "unstructured":
        return None
    n, m = (int(p) for p in pattern.split(":"))
    return n, m


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
    u, dead = _inverse_hessian_factor(gram, dampening, where)
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
