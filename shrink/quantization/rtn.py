"""Round-to-nearest (`quant=rtn`): each group's grid from its own range, no calibration."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from . import QUANTIZERS
from .base import LinearJob, Quantized, Quantizer
from .grid import Grid, grid_for, groups, quantize


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
    gs = groups(w.shape[1], group_size)
    scales, zeros, out = [], [], torch.empty_like(w)
    for c in range(0, w.shape[1], gs):
        scale, zero = grid_for(w[:, c : c + gs], bits, sym, scale_dtype, clip)
        out[:, c : c + gs] = quantize(w[:, c : c + gs], scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    return out, Grid(torch.stack(scales, 1), torch.stack(zeros, 1), bits, gs)


@QUANTIZERS.register("rtn")
class RoundToNearest(Quantizer):
    def quantize(self, job: LinearJob, quant: DictConfig) -> Quantized:
        weight, grid = rtn(
            job.weight, int(quant.bits), int(quant.group_size), bool(quant.sym), job.dtype, bool(quant.clip)
        )
        if job.keep is not None:
            weight = weight * job.keep
        return Quantized(weight, grid, lambda: job.dense)
