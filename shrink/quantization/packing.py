"""Quantized linears in compressed-tensors' pack-quantized layout.

A quantized linear keeps its dequantized weight for every evaluation and carries its grid as
buffers named as compressed-tensors names them (`weight_scale`, `weight_zero_point` when
asymmetric), so block files, resumed runs and streamed blocks hold the grid like any tensor. A
checkpoint stores it packed: compressed-tensors' own pack-quantized compressor turns `weight`
into `weight_packed` (int32 words of `bits`-bit integers) and `weight_shape`, and unpacks it on
load. The scales are rounded to the stored dtype before the solvers quantize, so the unpacked
weight equals the in-memory one bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ShrinkError
from .grid import Grid

if TYPE_CHECKING:  # compressed-tensors takes over a second to import: only a quantized run pays it
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

SCALE, ZERO = "weight_scale", "weight_zero_point"
PACKED = ("weight_packed", "weight_shape")
FORMAT = "pack-quantized"


def attach_grid(linear: nn.Linear, grid: Grid, sym: bool) -> None:
    """Give a quantized linear its grid as buffers: scales in the weight's dtype (what the solvers
    rounded them to) and, when asymmetric, int8 zero points; and its bits (`quant_bits`)."""
    for name in (SCALE, ZERO):
        linear._buffers.pop(name, None)
    linear.register_buffer(SCALE, grid.scale.to(linear.weight.dtype).contiguous())
    if not sym:
        linear.register_buffer(ZERO, grid.zero.to(torch.int8).contiguous())
    linear.quant_bits = grid.bits


def quantized_bits(linear: nn.Linear) -> int:
    """The bits of each stored integer of a quantized linear (weights, and packed zero points)."""
    return int(linear.quant_bits)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and SCALE in module._buffers


def register_grid(linear: nn.Linear, groups: int, zero_point: bool, bits: int) -> None:
    """Empty (meta) grid buffers of a quantized linear, for a checkpoint's tensors to fill."""
    linear.quant_bits = bits
    shape = (linear.out_features, groups)
    linear.register_buffer(SCALE, torch.empty(shape, device="meta", dtype=linear.weight.dtype))
    if zero_point:
        linear.register_buffer(ZERO, torch.empty(shape, device="meta", dtype=torch.int8))


def scheme(quant: dict[str, Any]) -> QuantizationScheme:
    """compressed-tensors' scheme of a run's `quant` config: signed integers, per group of input
    columns (per output channel for group_size -1), symmetric or with zero points."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = int(quant["group_size"])
    args = QuantizationArgs(
        num_bits=int(quant["bits"]),
        type="int",
        symmetric=bool(quant["sym"]),
        strategy="group" if group > 0 else "channel",
        group_size=group if group > 0 else None,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def quantization_config(quant: dict[str, Any], ignore: list[str]) -> QuantizationConfig:
    """The `quantization_config` transformers reads: one group for every Linear but `ignore`."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": scheme(quant)},
        format=FORMAT,
        quantization_status="compressed",
        ignore=ignore,
    )


def pack(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`tensors` with every quantized linear's weight (found by its `weight_scale`) packed."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    out = dict(tensors)
    chosen = scheme(quant)
    for prefix in _prefixes(tensors, SCALE):
        local = {n: out.pop(prefix + n) for n in ("weight", SCALE, ZERO) if prefix + n in out}
        packed = PackedQuantizationCompressor.compress(local, chosen)
        out |= {prefix + n: t.contiguous() for n, t in packed.items()}
    return out


def unpack(tensors: dict[str, torch.Tensor], quant: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """`tensors` with every packed weight restored (the grid buffers stay, unpacked)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    out = dict(tensors)
    chosen = scheme(quant)
    for prefix in _prefixes(tensors, "weight_packed"):
        local = {n: out.pop(prefix + n) for n in (*PACKED, SCALE, ZERO) if prefix + n in out}
        if SCALE not in local:
            raise ShrinkError(f"{where}: {prefix}weight_packed has no {SCALE}")
        local = PackedQuantizationCompressor.decompress(local, chosen)
        local.pop("weight_shape", None)
        out |= {prefix + n: t for n, t in local.items()}
    return out


def _prefixes(tensors: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return [name[: -len(suffix)] for name in tensors if name.endswith("." + suffix)]
