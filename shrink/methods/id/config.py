"""The keys of `method=id` and their choices."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ...config import FoldTarget, MethodConf


class IDSelection(str, Enum):
    cholesky = "cholesky"  # pivoted Cholesky of the streamed Gram matrix (default)
    sketch_qr = "sketch_qr"  # pivoted QR of a streamed Gaussian row sketch ΩZ (exact check)


class AttentionUnits(str, Enum):
    auto = "auto"  # dims; whole heads only when thinning cannot reach the budget (default)
    heads = "heads"  # drop whole heads / KV groups (STAT)
    dims = "dims"  # keep every head, thin each KV head's value dims (and o_proj's inputs)
    both = "both"  # the plan chooses heads kept and value dims per head together


@dataclass
class IDConf(MethodConf):
    name: str = "id"
    selection: IDSelection = IDSelection.cholesky
    sketch_oversample: float = 2.0  # sketch_qr: rows of ΩZ per column of Z
    weight_by_outgoing: bool = True  # scale column j of Z by ‖W_next[:, j]‖ before selecting
    ridge: float = 1e-2  # λ/mean(diag G[J,J]) of the ridge fit of T (always on; see linalg)
    ridge_cv: int = 0  # ≥ 2: each fold's ridge cross-validated over this many groups of windows
    ffn: bool = True  # prune FFN neurons
    heads: bool = True  # prune attention (whole heads and/or value dims, see `attention`)
    attention: AttentionUnits = AttentionUnits.auto  # the attention units `id` removes (heads: STAT)
    dims_step: int = 8  # value (and query/key) dims per head are kept in multiples of this
    qk_dims: bool = False  # also thin query/key dims (rotary pairs) of every head; see README
    qk_probe_windows: int = 2  # calibration windows on which thinned q/k's output error is measured
    bias: bool = False  # affine fold: the next layer gets a bias carrying the dropped units' mean
    target: FoldTarget = FoldTarget.compressed  # what the fold fits (dense: error-correcting)
    batch_gram_fp32: bool = True  # each batch's XᵀX in float32, summed in float64 (stats.SecondMoment)
