"""Weight quantization stacked on any method: integer grids, the quantizers (RTN, GPTQ/GPTAQ), a
low-rank correction, compressed-tensors packing and CPU kernels. Quantizers register in
`QUANTIZERS` where they are written; `quant=none` is no plug-in."""

from __future__ import annotations

from ..registry import Registry
from .base import LinearJob, Quantized, Quantizer
from .config import QuantConf

QUANTIZERS: Registry[type[Quantizer]] = Registry("quant", __name__, builtin=("none",))
QUANTIZERS.store("quant", QuantConf)

__all__ = ["QUANTIZERS", "LinearJob", "QuantConf", "Quantized", "Quantizer"]
