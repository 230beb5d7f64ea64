"""Uniform integer grids per row and group of input columns, the form every quantizer stores."""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def groups(n: int, group_size: int) -> int:
    return n if group_size <= 0 else group_size
