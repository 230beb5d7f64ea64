"""Weight-only integer kernels (shrink/quantization/kernels.py): they compute the quantized linear on its own
grid, swap in only where a kernel fits, and put the float linears back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.evaluation.suite import speed_ratios
from shrink.modeling_shrink import HeadSlicedLinear
from shrink.quantization.kernels import (
    KERNEL_DTYPE,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    integer_codes,
    kernel_for,
    weight_only_kernels,
)
from shrink.quantization.packing import attach_grid
from shrink.quantization.rtn import rtn

CPU = torch.device("cpu")


def _quantized(bits: int, group: int, sym: bool, linear: nn.Linear | None = None) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96) if linear is None else linear
    weight, grid = rtn(linear.weight, bits, group, sym, torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight.to(torch.float32))
    attach_grid(linear, grid, sym)
    return linear


def _kernel_reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The linear with what the kernels round: bfloat16 inputs and scales (and offsets)."""
    q, scale, zero = integer_codes(linear)
    group = linear.in_features // scale.shape[1]
    stored = scale.to(KERNEL_DTYPE).float().repeat_interleave(group, 1)
    offset = (-zero * scale).to(KERNEL_DTYPE).float().repeat_interleave(group, 1)
    weight = q.float() * stored + offset if zero.any() else q.float() * stored
    return x.to(KERNEL_DTYPE).float() @ weight.T + linear.bias


@pytest.mark.parametrize("bits, group, sym", [(4, 64, True), (4, 32, False), (4, 128, True), (8, -1, True)])
def test_a_kernel_computes_the_linear_on_its_own_grid(bits, group, sym):
    linear = _quantized(bits, group, sym)
    q, scale, zero = integer_codes(linear)
    width = linear.in_features // scale.shape[1]
    rebuilt = (q - zero.repeat_interleave(width, 1)) * scale.repeat_interleave(width, 1)
    assert torch.equal(rebuilt, linear.weight.detach())  # the codes are the checkpoint's integers
    kernel = kernel_for(linear, CPU)
    assert kernel is (Int4WeightOnlyLinear if bits == 4 else Int8WeightOnlyLinear)
    x = torch.randn(3, 7, 128)
    y = kernel(linear)(x)
    assert y.shape == (3, 7, 96) and y.dtype == x.dtype
    expected = _kernel_reference(linear, x.reshape(-1, 128)).reshape(3, 7, 96)
    scale_of_y = expected.abs().max()
    assert (y - expected).abs().max() / scale_of_y < 1e-2  # the kernel's bfloat16 output rounding
    assert (y - linear(x)).abs().max() / scale_of_y < 2e-2
    shifted = linear.weight.detach() + 8 * scale.repeat_interleave(width, 1)  # codes off by int4's offset
    assert (y - x @ shifted.T - linear.bias).abs().max() / scale_of_y > 5e-2


def test_only_grids_and_layers_a_kernel_fits_are_swapped():
    assert kernel_for(_quantized(8, 64, True), CPU) is None  # 8 bits in groups: no kernel
    assert kernel_for(_quantized(8, -1, False), CPU) is None  # 8 bits with zero points
    assert kernel_for(_quantized(4, 64, True), torch.device("meta")) is None  # CPU kernels only
    assert kernel_for(nn.Linear(128, 96), CPU) is None  # not quantized
    # shapes the kernels cannot take (they would crash the process or return garbage)
    assert kernel_for(_quantized(4, 64, True, nn.Linear(128, 24)), CPU) is None  # int4: outputs in 16s
    assert kernel_for(_quantized(8, -1, True, nn.Linear(36, 96)), CPU) is None  # int8: inputs in 8s
    assert kernel_for(_quantized(8, -1, True, nn.Linear(40, 7)), CPU) is Int8WeightOnlyLinear
    sliced = _quantized(4, 64, True, HeadSlicedLinear(heads=4, width=32, head_dim=48, out_features=96))
    assert kernel_for(sliced, CPU) is None  # moves its input itself


def test_kernels_are_swapped_in_and_the_float_linears_put_back():
    model = nn.Sequential(_quantized(4, 64, True), nn.ReLU(), nn.Sequential(_quantized(8, 64, True)))
    first, nested = model[0], model[2][0]
    x = torch.randn(2, 128)
    with weight_only_kernels(model, CPU) as swapped:
        assert swapped == {"kernel_linears": 1, "quantized_linears": 2}
        assert isinstance(model[0], Int4WeightOnlyLinear) and model[2][0] is nested
        model[0](x)
    assert model[0] is first and model[2][0] is nested
    with pytest.raises(RuntimeError), weight_only_kernels(model, CPU):
        raise RuntimeError("a failed timing")
    assert model[0] is first


def test_a_kernel_or_decode_speedup_beyond_the_byte_and_mac_ratios_is_flagged():
    def table(decode_ms: float, kernel_ms: float) -> dict:
        dense = {"latency_ms": 10.0, "decode_ms_per_token": 10.0, "block_macs_per_token": 100}
        dense |= {"model_macs_per_token": 1000, "weight_bytes": 1000}
        comp = dense | {"decode_ms_per_token": decode_ms, "weight_bytes": 1000}
        comp["kernels"] = {"latency_ms": 10.0, "decode_ms_per_token": kernel_ms, "weight_bytes": 250}
        return {"dense": dense, "compressed": comp}

    plausible = speed_ratios(table(10.0, 3.0))  # 3.3x at a quarter of the bytes
    assert plausible["kernel_weight_bytes_ratio"] == 0.25
    assert plausible["kernel_decode_speedup_reliable"] and plausible["decode_speedup_reliable"]
    noisy = speed_ratios(table(5.0, 2.0))  # 2x with as many bytes and MACs; 5x at a quarter
    assert not noisy["decode_speedup_reliable"] and not noisy["kernel_decode_speedup_reliable"]
