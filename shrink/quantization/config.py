"""The keys of the quantization step (`conf/quant/`), shared by every quantizer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING, DictConfig

from ..config import FoldTarget, StepConf

BITS = (8, 4, 3, 2)
GROUP_SIZES = (-1, 32, 64, 128)


class GptaqForm(str, Enum):
    target = "target"  # GPTQ of the closed-form target W + α·W·ΔXᵀX̃·H̃⁻¹ (all columns corrected)
    recursion = "recursion"  # the paper's: GPTQ's column recursion with the asymmetry term folded in


@dataclass
class QuantConf(StepConf):
    """Weight quantization after the method's edit: `none`, `rtn` or `gptq`."""

    name: str = MISSING
    bits: int = 4  # 8, 4, 3 or 2
    group_size: int = 64  # input columns sharing one scale: -1 (whole row), 32, 64 or 128
    sym: bool = True  # symmetric grid (zero point 0)
    clip: bool = False  # search each row and group's range for the least rounding error (`mse`)
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal (static groups)
    refit: int = 0  # gptq: rounds of refitting the group scales to the calibration inputs
    dampening: float = 0.01  # gptq: δ/mean diag H added to the Hessian's diagonal
    # gptq: fit the layer on the compressed model's inputs (GPTQ) or the dense model's (GPTAQ)
    target: FoldTarget = FoldTarget.compressed
    alpha: float = 0.25  # target=dense: scale of GPTAQ's asymmetry term (the authors' code: 0.25)
    gptaq_form: GptaqForm = GptaqForm.target  # target=dense: closed form (measured better), recursion
    lowrank: int = 0  # a rank-r full-precision correction of each quantized linear's error (SLiM)


def stored_bits(quant: DictConfig, dtype_bits: int) -> float:
    """What one weight of a block linear is stored in: the dtype, or once quantized its bits plus
    its share of its group's scale (in the dtype) and, when asymmetric, packed zero point."""
    if quant.name == "none":
        return float(dtype_bits)
    bits = int(quant.bits)
    return bits + (dtype_bits + (0 if bool(quant.sym) else bits)) / int(quant.group_size)
