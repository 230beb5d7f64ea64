"""Value checks of the sparsity keys, before anything loads."""

from __future__ import annotations

from omegaconf import DictConfig

from ..errors import ShrinkError
from . import SPARSIFIERS
from .patterns import nm_pattern


def check(sparsity: DictConfig) -> None:
    SPARSIFIERS.check(sparsity.name)
    if sparsity.name == "none":
        return
    pattern = str(sparsity.pattern)
    try:
        nm = nm_pattern(pattern)
    except ValueError:
        nm = (0, 0)
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise ShrinkError(
            f"sparsity.pattern={pattern!r} is not a pattern; valid: unstructured, or N:M, 0 < N < M (2:4)"
        )
    if nm is None and not 0.0 < float(sparsity.fraction) < 1.0:
        raise ShrinkError(
            f"sparsity.fraction={sparsity.fraction} must be in (0, 1): the share of weights zeroed"
        )
    if float(sparsity.dampening) <= 0:
        raise ShrinkError(f"sparsity.dampening={sparsity.dampening} must be positive")
    SPARSIFIERS[sparsity.name]().check(sparsity)
