"""GPTQ (Frantar et al., 2023) and GPTAQ's asymmetric target: column by column, each rounding
error spread over the columns not yet quantized through the inverse Hessian of the layer's inputs;
and refitting the group scales to the calibration inputs once the codes are chosen."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ..linalg.hessian import damped_cholesky, damped_hessian, inverse_hessian_factor
from . import QUANTIZERS
from .base import LinearJob, Quantized, Quantizer
from .config import GptaqForm
from .grid import Grid, grid_for, groups, quantize


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
    gs = groups(n, group_size)
    gram = gram.to(torch.float64)
    order = torch.argsort(torch.diagonal(gram), descending=True) if act_order else torch.arange(n)
    order = order.to(w.device)
    u, dead = inverse_hessian_factor(gram[order][:, order], dampening, where)
    w[:, order[dead]] = 0
    shift = None
    if asymmetry is not None:
        a = asymmetry.to(torch.float64)[order][:, order]
        a[:, dead] = 0
        shift = alpha * torch.triu(a @ u.T, diagonal=1) @ u
    ngroups = -(-n // gs)
    scales = torch.zeros(rows, ngroups, dtype=w.dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    ready = torch.zeros(ngroups, dtype=torch.bool)
    if fixed is not None:
        scales, zeros = fixed.scale.to(w.dtype).clone(), fixed.zero.to(w.dtype).clone()
        ready[:] = True
    elif act_order:  # static groups: every grid from the weights as they are
        for g in range(ngroups):
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
    h, _ = damped_hessian(gram, dampening)
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
    factor, _ = damped_cholesky(gram, dampening, where)
    w = weight.to(torch.float64)
    rhs = w @ (cross.to(torch.float64) - gram.to(torch.float64))
    return w + alpha * torch.cholesky_solve(rhs.T, factor).T


@QUANTIZERS.register("gptq")
class Gptq(Quantizer):
    """GPTQ on the layer's own (compressed) inputs; with `quant.target=dense` the runner also hands
    over the dense model's inputs (`moments.cross`), and it is GPTAQ: the closed-form asymmetric
    target quantized by GPTQ (`gptaq_form=target`), or the paper's column recursion."""

    calibrated = True

    def quantize(self, job: LinearJob, quant: DictConfig) -> Quantized:
        gram, cross = job.moments.gram, job.moments.cross
        dampening, alpha = float(quant.dampening), float(quant.alpha)

        def corrected(w: torch.Tensor) -> torch.Tensor:  # GPTAQ's closed-form target of w
            return asymmetric_target(w, gram, cross, dampening, alpha, job.where)

        weight, asymmetry, target = job.weight, None, None
        if cross is not None and GptaqForm(quant.gptaq_form) == GptaqForm.recursion:
            asymmetry = cross - gram
        elif cross is not None:
            target = corrected(job.dense)
            weight = target if job.keep is None else corrected(job.weight)  # a pruned weight keeps its mask
        refit = int(quant.refit)  # the refit's target: under the recursion, the closed-form one
        fit_to = corrected(weight) if asymmetry is not None and refit else weight
        weight, grid = gptq_refitted(
            weight, gram, fit_to, refit, dampening, job.dtype, job.where,
            bits=int(quant.bits), group_size=int(quant.group_size), sym=bool(quant.sym),
            act_order=bool(quant.act_order), keep=job.keep, asymmetry=asymmetry, alpha=alpha,
            clip=bool(quant.clip),
        )  # fmt: skip
        if cross is None:
            return Quantized(weight, grid, lambda: job.dense)
        return Quantized(
            weight, grid, (lambda: target) if target is not None else (lambda: corrected(job.dense))
        )
