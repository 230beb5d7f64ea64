"""Value checks of the quantization keys, before anything loads."""

from __future__ import annotations

from omegaconf import DictConfig

from ..errors import ShrinkError
from . import QUANTIZERS
from .config import BITS, GROUP_SIZES


def check(cfg: DictConfig, factorises: bool = False) -> None:
    """`cfg.quant` against the valid values; `factorises`: the method leaves factor pairs."""
    q = cfg.quant
    QUANTIZERS.check(q.name)
    if q.name == "none":
        return
    quantizer = QUANTIZERS[q.name]
    if int(q.bits) not in BITS:
        raise ShrinkError(f"quant.bits={q.bits} is not supported; valid: {', '.join(map(str, BITS))}")
    if int(q.group_size) not in GROUP_SIZES:
        valid = ", ".join(map(str, GROUP_SIZES))
        raise ShrinkError(f"quant.group_size={q.group_size} is not supported; valid: {valid}")
    if float(q.dampening) <= 0:
        raise ShrinkError(f"quant.dampening={q.dampening} must be positive")
    if int(q.refit) < 0:
        raise ShrinkError(f"quant.refit={q.refit} is a number of rounds: 0 (none) or more")
    calibrated = ", ".join(f"quant={n}" for n, p in QUANTIZERS.items() if p.calibrated)
    if int(q.refit) and not quantizer.calibrated:
        raise ShrinkError(
            f"quant.refit fits scales to the calibration inputs; quant={q.name} has no calibration: "
            f"use {calibrated}"
        )
    if q.target == "dense" and not quantizer.calibrated:
        raise ShrinkError(
            f"quant.target=dense calibrates GPTQ (GPTAQ); quant={q.name} has no calibration: use {calibrated}"
        )
    if not 0 < float(q.alpha) <= 1:
        raise ShrinkError(f"quant.alpha={q.alpha} scales GPTAQ's asymmetry term: a value in (0, 1]")
    if int(q.lowrank) < 0:
        raise ShrinkError(f"quant.lowrank={q.lowrank} must be a rank: 0 (no correction) or more")
    if int(q.lowrank) > 0 and factorises:
        raise ShrinkError(
            f"quant.lowrank corrects plain linears; method={cfg.method.name} leaves rank-r factor pairs, "
            "whose own rank is the place to spend those parameters: raise the budget instead"
        )
    if cfg.budget_unit == "bytes" and int(q.group_size) <= 0:
        raise ShrinkError(
            "budget_unit=bytes prices a quantized weight at its bits plus a share of its group's "
            f"scale; with quant.group_size={q.group_size} the per-row scale does not shrink with "
            "the kept widths: use quant.group_size 32, 64 or 128"
        )
    quantizer().check(q)
