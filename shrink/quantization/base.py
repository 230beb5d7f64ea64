"""What a quantizer is: given one linear's weight and input moments, a weight on an integer grid."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from omegaconf import DictConfig

from ..linalg.moments import Moments
from .grid import Grid


@dataclass(frozen=True)
class LinearJob:
    """One linear as the steps hand it over: its weight before the steps (`dense`), after the
    sparsity step (`weight`, with the `keep` mask; both float64), its input moments, and the
    dtype the model stores it in (grids are rounded to it)."""

    where: str
    dense: torch.Tensor
    weight: torch.Tensor
    keep: torch.Tensor | None
    moments: Moments
    dtype: torch.dtype


class Quantized(NamedTuple):
    weight: torch.Tensor  # dequantized, float64; pruned weights stay zero
    grid: Grid
    # what the weight stands in for on the layer's inputs: a low-rank correction fits target − weight
    target: Callable[[], torch.Tensor]


class Quantizer(ABC):
    """A quantization step (`quant=<name>`), registered with `@QUANTIZERS.register(name)`; its keys
    are `QuantConf`'s."""

    calibrated: ClassVar[bool] = False  # fits the calibration inputs (refit and target=dense need it)

    def check(self, quant: DictConfig) -> None:  # noqa: B027  (optional: most have nothing to add)
        """Checks of its own, before anything loads (after the keys every quantizer shares)."""

    @abstractmethod
    def quantize(self, job: LinearJob, quant: DictConfig) -> Quantized: ...
