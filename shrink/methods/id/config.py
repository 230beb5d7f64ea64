"""The keys of `method=id` and their choices."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import DictConfig

from ...config import FoldTarget, MethodConf
from ...errors import ShrinkError


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
    ridge_cv: int = 2  # ≥ 2: each fold's ridge cross-validated over this many groups of windows
    ffn: bool = True  # prune FFN neurons
    heads: bool = True  # prune attention (whole heads and/or value dims, see `attention`)
    attention: AttentionUnits = AttentionUnits.auto  # the attention units `id` removes (heads: STAT)
    dims_step: int = 8  # value (and query/key) dims per head are kept in multiples of this
    qk_dims: bool = False  # also thin query/key dims (rotary pairs) of every head; see README
    qk_probe_windows: int = 2  # calibration windows on which thinned q/k's output error is measured
    bias: bool = False  # affine fold: the next layer gets a bias carrying the dropped units' mean
    target: FoldTarget = FoldTarget.compressed  # what the fold fits (dense: error-correcting)
    batch_gram_fp32: bool = True  # each batch's XᵀX in float32, summed in float64 (stats.SecondMoment)


def check_keys(cfg: DictConfig, propagate: str = "compressed") -> None:
    """Combinations of `id`'s keys that cannot work, refused with one line before loading."""
    if cfg.attention != AttentionUnits.heads and cfg.selection == IDSelection.sketch_qr:
        raise ShrinkError(
            f"method.attention={AttentionUnits(cfg.attention).value} selects value dims from the Gram "
            "matrix; use method.selection=cholesky or method.attention=heads"
        )
    if cfg.attention in (AttentionUnits.dims, AttentionUnits.both) and not cfg.heads:
        raise ShrinkError(
            f"method.attention={AttentionUnits(cfg.attention).value} edits attention, which "
            "method.heads=false leaves alone; set method.heads=true or method.attention=heads"
        )
    if cfg.qk_dims and (cfg.attention == AttentionUnits.heads or not cfg.heads):
        raise ShrinkError(
            "method.qk_dims=true thins every head's queries and keys, which method.attention=heads "
            "or method.heads=false leaves whole; use method.attention=auto|dims|both, method.heads=true"
        )
    if int(cfg.qk_probe_windows) < 1:
        raise ShrinkError(
            f"method.qk_probe_windows={cfg.qk_probe_windows} must be a positive number of windows"
        )
    if int(cfg.ridge_cv) == 1 or int(cfg.ridge_cv) < 0:
        raise ShrinkError(
            f"method.ridge_cv={cfg.ridge_cv} must be 0 (the fixed method.ridge) or at least 2 groups "
            "of calibration windows"
        )
    if int(cfg.dims_step) < 1:
        raise ShrinkError(f"method.dims_step={cfg.dims_step} must be a positive number of value dims")
    if cfg.target == FoldTarget.dense and propagate == "dense":
        raise ShrinkError(
            "method.target=dense fits the dense model's activations, which with propagate=dense are "
            "the ones the block already sees; use propagate=compressed or method.target=compressed"
        )
