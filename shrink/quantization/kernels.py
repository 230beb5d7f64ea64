"""Weight-only integer kernels for quantized linears, used by `eval=speed`.

A quantized linear keeps a dequantized float weight so that every evaluator sees exactly the
checkpoint's numbers; that is as slow as the dense model. Timing what 4 or 8 bits buy needs the
kernels that read the integers: torch's CPU weight-only kernels (the int4 one is what torchao's
`Int4CPULayout` wraps), fed with the linear's *own* grid rather than a grid fitted again:

- 4 bits, groups of 32/64/128/256, outputs a multiple of 16: `_weight_int4pack_mm_for_cpu`
  ("tinygemm": w = (u − 8)·s + z per group, u the unsigned code), so u = q + 8 and z = −zero·s
  reproduce (q − zero)·s;
- 8 bits, symmetric, one scale per output row (`group_size=-1`), inputs a multiple of 8:
  `_weight_int8pack_mm`.

Both kernels take bfloat16 activations and scales (their float32 paths are slower than a float32
matmul on the CPUs measured), so the swapped model's logits differ from the checkpoint's by
bfloat16 rounding; `eval.speed` reports that difference beside the timing. Other grids (8 bits in
groups, zero points at 8 bits, other devices) keep their float weight and are counted as such.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..modeling_shrink import HeadPaddedLinear, HeadSlicedLinear, replace_submodule
from .packing import SCALE, ZERO, is_quantized, quantized_bits

INT4_GROUPS = (32, 64, 128, 256)
KERNEL_DTYPE = torch.bfloat16


def integer_codes(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a quantized linear, q the signed integers with weight = (q − zero)·scale
    per row and group, recovered from the dequantized weight and its grid buffers."""
    scale = linear._buffers[SCALE].to(torch.float32)
    zero = linear._buffers.get(ZERO)
    zero = torch.zeros_like(scale) if zero is None else zero.to(torch.float32)
    group = linear.in_features // scale.shape[1]
    bits = quantized_bits(linear)
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
    q = torch.round(linear.weight.detach().to(torch.float32) / expand(scale)) + expand(zero)
    return q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int32), scale, zero


class Int4WeightOnlyLinear(nn.Module):
    """A 4-bit grouped linear run by torch's CPU int4 weight-only kernel on its own grid."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale, zero = integer_codes(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = linear.in_features // scale.shape[1]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q + 8, 1)
        offsets = -zero * scale
        self.register_buffer("weight_int4", packed)
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale.T, offsets.T], dim=-1).to(KERNEL_DTYPE).contiguous()
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = kernel(flat, self.weight_int4, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group_size}"


class Int8WeightOnlyLinear(nn.Module):
    """An 8-bit symmetric per-row linear run by torch's CPU int8 weight-only kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale, _ = integer_codes(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scale[:, 0].to(KERNEL_DTYPE).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def kernel_for(linear: nn.Module, device: torch.device) -> type[nn.Module] | None:
    """The kernel class that runs this quantized linear on `device`, or None. Head-padded and
    head-sliced linears are plain linears in a thin attention; where they pad or slice (an
    attention that computes at head_dim) they keep their float path."""
    plain = type(linear) is nn.Linear or (
        isinstance(linear, (HeadPaddedLinear, HeadSlicedLinear)) and linear.thin
    )
    if device.type != "cpu" or not plain or not is_quantized(linear):
        return None
    bits, groups = quantized_bits(linear), linear._buffers[SCALE].shape[1]
    group = linear.in_features // groups
    # the kernels' own shape limits: int4 packs outputs in 16s; int8 reads inputs in 8s (other
    # widths crash the process or return garbage in torch 2.13 rather than raise)
    if bits == 4 and group in INT4_GROUPS and linear.out_features % 16 == 0:
        return Int4WeightOnlyLinear
    if bits == 8 and groups == 1 and ZERO not in linear._buffers and linear.in_features % 8 == 0:
        return Int8WeightOnlyLinear
    return None


@contextmanager
def weight_only_kernels(model: nn.Module, device: torch.device) -> Iterator[dict[str, Any]]:
    """Run every quantized linear a kernel supports through that kernel inside the block, and put
    the float linears back after it. Yields {"kernel_linears": n, "quantized_linears": m}."""
    quantized = [(path, m) for path, m in model.named_modules() if is_quantized(m)]
    swapped: list[tuple[str, nn.Module]] = []
    with torch.no_grad():
        for path, module in quantized:
            kernel = kernel_for(module, device)
            if kernel is not None:
                swapped.append((path, replace_submodule(model, path, kernel(module))))
    try:
        yield {"kernel_linears": len(swapped), "quantized_linears": len(quantized)}
    finally:
        for path, original in swapped:
            replace_submodule(model, path, original)
